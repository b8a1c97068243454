"""Decode: a few new queries per sequence against a long KV cache, as effective bandwidth (bytes of
the keys and values a call must read / time), beside the device's copy bandwidth, FlexAttention's
decode path and SDPA, in one process — a benchmark, not a test.

    python benchmarks/decode.py [--batches 1,16,64] [--kv 8192,32768,131072] [--q-lens 1,8]
                                [--patterns causal,sinks,document] [--splits 1,4,16] [--out-dir DIR] [--smoke]

Rows: attncc on a dense cache (kernel_options kv_splits for each --splits value; the fastest is
reported with its S) and on a paged cache (ac.KVCache, page_size 64: today the used pages are
gathered first, so it pays one copy), FlexAttention (torch.compile'd flex_attention, which
dispatches decode shapes to its flex_decoding kernel), SDPA (causal only, cuDNN / flash). Every
attncc output is checked against FlexAttention's (or the float64 oracle on CPU) first. Shapes:
Hq 32 / Hkv 8, D 128, bf16 on CUDA; --smoke: tiny shapes on CPU (the times mean nothing).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import attncc as ac  # noqa: E402
from attncc.runtime.calibrate import time_ms  # noqa: E402
from benchmarks.report import write_table  # noqa: E402


def decode_patterns(name: str, kv: int, q_len: int, device):
    """(pattern over positions within the sequence, for paged calls; the same pattern for the dense
    call, whose queries are indices 0..q_len-1 sitting at the cache's last q_len positions, and its
    mask_mod for FlexAttention)."""
    if name == "causal":
        def native(b, h, q, k):
            return q >= k
    elif name == "sinks":
        def native(b, h, q, k):
            return (q >= k) & ((k < 4) | (q - k <= 1024))
    elif name == "document":
        ids = ac.patterns.lengths_to_ids([kv // 4, kv // 2, kv - kv // 4 - kv // 2], device=device)

        def native(b, h, q, k):
            return (ids[q] == ids[k]) & (q >= k)
    else:
        raise ValueError(f"unknown decode pattern {name!r}")
    offset = kv - q_len

    def dense(b, h, q, k):
        return native(b, h, q + offset, k)
    return ac.Pattern(native, name=name), ac.Pattern(dense, name=name), dense


def bandwidth(ms: float, nbytes: int) -> float:
    return nbytes / (ms * 1e-3) / 1e12  # TB/s


def run_row(name, B, KV, q_len, splits, device, dtype, flex) -> dict:
    Hq, Hkv, D = (32, 8, 128) if device.type == "cuda" else (4, 2, 16)
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, Hq, q_len, D, device=device, dtype=dtype, generator=g)
    k, v = (torch.randn(B, Hkv, KV, D, device=device, dtype=dtype, generator=g) for _ in range(2))
    nbytes = 2 * k.numel() * k.element_size()
    native, pattern, mask_mod = decode_patterns(name, KV, q_len, device)
    row = {"pattern": name, "B": B, "KV": KV, "Q_LEN": q_len}
    copy = torch.empty_like(k)
    row["copy_tbps"] = bandwidth(time_ms(lambda: copy.copy_(k), device), 2 * k.numel() * k.element_size())
    want = ac.reference(q[:1], k[:1], v[:1], pattern) if device.type != "cuda" else None
    if flex is not None:
        from torch.nn.attention.flex_attention import create_block_mask

        bm = create_block_mask(mask_mod, None, None, q_len, KV, device=device)
        out = flex(q, k, v, block_mask=bm, enable_gqa=True)
        want = out[:1].double()
        row["flex_tbps"] = bandwidth(time_ms(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True), device), nbytes)
    if name == "causal" and q_len == 1:
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
        row["sdpa_tbps"] = bandwidth(time_ms(sdpa, device), nbytes)
    best = None
    for S in splits:
        options = {"kv_splits": S} if S > 1 else None
        out = ac.attention(q, k, v, pattern, kernel_options=options)
        err = ((out[:1].double() - want).norm() / want.norm()).item()
        if err > 2e-2:
            row[f"attncc_S{S}"] = f"FAILED (rel err {err:.1e})"
            continue
        tbps = bandwidth(time_ms(lambda: ac.attention(q, k, v, pattern, kernel_options=options), device), nbytes)
        row[f"attncc_S{S}_tbps"] = tbps
        best = max(best or (0, 0), (tbps, S))
    row["attncc_best"] = best
    cache = ac.KVCache(B * -(-KV // 64), 64, Hkv, D, batch=B, dtype=dtype, device=device)
    cache.append(k, v)
    paged = cache.attention(q, native)
    err = ((paged[:1].double() - want).norm() / want.norm()).item()
    row["paged_tbps"] = (bandwidth(time_ms(lambda: cache.attention(q, native), device), nbytes)
                         if err <= 2e-2 else f"FAILED (rel err {err:.1e})")
    return row


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--kv", default="8192,32768,131072")
    ap.add_argument("--q-lens", default="1,8")
    ap.add_argument("--patterns", default="causal,sinks,document")
    ap.add_argument("--splits", default="1,4,16")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Triton's interpreter)")
    args = ap.parse_args(argv)
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batches, kvs, q_lens = (ints(args.batches), ints(args.kv), ints(args.q_lens)) if not args.smoke \
        else ([1], [96], [1])
    flex = None
    if device.type == "cuda":
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    rows = [run_row(name, B, KV, ql, ints(args.splits), device, dtype, flex)
            for name in args.patterns.split(",") for B in batches for KV in kvs for ql in q_lens]
    fmt = lambda x: f"{x:.2f}" if isinstance(x, float) else ("—" if x is None else str(x))  # noqa: E731
    lines = ["| pattern | B | KV | Q_LEN | copy TB/s | attncc best (S) | paged | flex | sdpa |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        best = r["attncc_best"]
        lines.append(f"| {r['pattern']} | {r['B']} | {r['KV']} | {r['Q_LEN']} | {fmt(r['copy_tbps'])} | "
                     f"{fmt(best[0]) + f' (S={best[1]})' if best else 'FAILED'} | {fmt(r['paged_tbps'])} | "
                     f"{fmt(r.get('flex_tbps'))} | {fmt(r.get('sdpa_tbps'))} |")
    print("\n".join(lines))
    write_table(args.out_dir, "decode", rows, lines)
    return rows


if __name__ == "__main__":
    main()
