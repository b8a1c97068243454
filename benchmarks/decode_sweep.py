"""The decode kernel's tiles and splits swept on the GPU — a benchmark, not a test.

    python benchmarks/decode_sweep.py [--out-dir DIR]

Per row (pattern, B, KV, Q_LEN; Hq 32 / Hkv 8, D 128, bf16, a paged cache of 64-key pages as in
benchmarks/decode.py): effective bandwidth (live KV bytes / time, TB/s, CUDA graphs) of each
(BLOCK_N, num_warps, num_stages) in TILES at the splits the cost model picks and at one split,
and of the default tiles at every S in SPLITS; each output's relative difference from the first
configuration's is recorded beside it (a configuration must agree with the default, which the
GPU tests check against the float64 oracle). What runtime/choices.choose_decode_tiles and
compiler/cost.decode_splits choose came from this sweep.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import attncc as ac  # noqa: E402
from benchmarks.decode import bandwidth, live_keys, native_mask, paged_copy, timed  # noqa: E402
from benchmarks.report import write_table  # noqa: E402

HQ, HKV, D = 32, 8, 128
ROWS = [("causal", 1, 8192, 1), ("causal", 1, 8192, 8), ("causal", 16, 8192, 8), ("causal", 64, 8192, 1),
        ("causal", 64, 8192, 8), ("causal", 1, 131072, 8), ("sinks", 1, 8192, 1), ("causal", 16, 131072, 8)]
TILES = [(64, 4, 3), (32, 4, 3), (128, 4, 3), (128, 8, 3), (64, 4, 4), (64, 8, 3), (64, 4, 2)]
SPLITS = [2, 4, 8, 16, 32, 64]


def sweep_row(name: str, B: int, KV: int, q_len: int, device) -> dict:
    """{label: (TB/s, rel diff from the first configuration)} for one row."""
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, HQ, q_len, D, device=device, dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(B, HKV, KV, D, device=device, dtype=torch.bfloat16, generator=g) for _ in range(2))
    native = native_mask(name, KV, device)
    nbytes = B * HKV * live_keys(native, q_len, KV, device) * 2 * D * k.element_size()
    table, caches = paged_copy(k, v, g)
    del k, v
    lens = torch.full((B,), KV, dtype=torch.int32, device=device)
    pattern = ac.Pattern(native, name=name)
    configs = [(t, None) for t in TILES] + [(t, 1) for t in TILES] + [(TILES[0], S) for S in SPLITS]
    first, out = None, {}
    for (bn, warps, stages), S in configs:
        options = {"BLOCK_N": bn, "num_warps": warps, "num_stages": stages} | ({} if S is None else {"kv_splits": S})
        kern = ac.compile(pattern, q, *caches, page_table=table, kv_lens=lens, kernel_options=options)
        o = kern(q, *caches, page_table=table, kv_lens=lens).float()
        first = o if first is None else first
        ms, _ = timed(lambda: kern(q, *caches, page_table=table, kv_lens=lens), device, rep=30)
        label = f"{bn}/{warps}/{stages} S={kern.config['kv_splits']}{'' if S is None else ' forced'}"
        out[label] = (round(bandwidth(ms, nbytes), 2), float(f"{((o - first).norm() / first.norm()).item():.1e}"))
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("decode_sweep.py measures a GPU: no CUDA device")
    device = torch.device("cuda")
    rows = []
    for name, B, KV, q_len in ROWS:
        rows.append({"row": [name, B, KV, q_len], "results": sweep_row(name, B, KV, q_len, device)})
        torch.cuda.empty_cache()
    lines = [f"TB/s (live KV bytes / time), BLOCK_N/warps/stages S=splits, on {torch.cuda.get_device_name(device)}", ""]
    for r in rows:
        best = max(r["results"].items(), key=lambda kv: kv[1][0])
        lines.append(f"- {' '.join(map(str, r['row']))}: best {best[0]} {best[1][0]}; " +
                     ", ".join(f"{k} {v[0]}" for k, v in r["results"].items()))
    print("\n".join(lines))
    write_table(args.out_dir, "decode_sweep", rows, lines)
    return rows


if __name__ == "__main__":
    main()
