"""A serving loop's decode steps over an ac.KVCache, host time included — a benchmark, not a test.

    python benchmarks/serving_loop.py [--batches 16] [--kv 8192] [--steps 200] [--layers 8]
                                      [--patterns causal,sinks] [--out-dir DIR] [--smoke]

Per row: B sequences with KV-token prompts in a KVCache (pages of 64, Hq 32 / Hkv 8, D 128, bf16
on CUDA); each step appends one token per sequence and runs `layers` attention calls over the
cache (a model's layers share lengths and page table). Wall time per step over `steps` steps
after a warm-up (one synchronisation at the end), beside the same number of calls on unchanged
inputs (`repeat`: launches and kernels only, no new lengths): their difference is what a new
step costs beyond its kernels (checks, tile lists, the appends); then as many steps again
counting and timing the tile-list builds (runtime/decode.build_meta). --smoke: tiny sizes on CPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import attncc as ac  # noqa: E402
from benchmarks.report import write_table  # noqa: E402

PATTERNS = {"causal": lambda: ac.patterns.causal(), "sinks": lambda: ac.patterns.sinks(4, 1024)}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_row(name: str, B: int, KV: int, steps: int, layers: int, device, dims) -> dict:
    Hq, Hkv, D, page = dims
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    pages = B * (-(-(KV + 2 * steps + 8) // page))
    cache = ac.KVCache(num_pages=pages, page_size=page, heads=Hkv, head_dim=D, batch=B, dtype=dtype, device=device)
    cache.append(*(torch.randn(B, Hkv, KV, D, device=device, dtype=dtype, generator=g) for _ in range(2)))
    pattern = PATTERNS[name]()
    q = torch.randn(B, Hq, 1, D, device=device, dtype=dtype, generator=g)
    new = [torch.randn(B, Hkv, 1, D, device=device, dtype=dtype, generator=g) for _ in range(2)]

    def step():
        cache.append(*new)
        for _ in range(layers):
            cache.attention(q, pattern)

    def repeat():
        for _ in range(layers):
            cache.attention(q, pattern)

    out = {"pattern": name, "B": B, "KV": KV, "layers": layers, "steps": steps}
    for label, fn in (("step", step), ("repeat", repeat)):
        for _ in range(3):  # warm-up: compile, first lists
            fn()
        sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        out[f"{label}_ms"] = (time.perf_counter() - t) * 1e3 / steps
    out["new_step_ms"] = out["step_ms"] - out["repeat_ms"]
    out["builds"], out["build_ms"] = timed_builds(step, steps, device)
    return out


def timed_builds(step, steps: int, device) -> tuple[int, float]:
    """(tile-list builds in `steps` more steps, mean ms of one, synchronised before and after):
    what of a new step's extra the lists rebuilt once per DECODE_SPAN steps explain. A separate
    pass, since the synchronisations change the steps' timing."""
    from attncc.runtime import decode

    real, times = decode.build_meta, []

    def build_meta(*args, **kwargs):
        sync(device)
        t = time.perf_counter()
        meta = real(*args, **kwargs)
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
        return meta
    decode.build_meta = build_meta
    try:
        for _ in range(steps):
            step()
    finally:
        decode.build_meta = real
    return len(times), sum(times) / max(1, len(times))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="16")
    ap.add_argument("--kv", default="8192")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--patterns", default="causal,sinks")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (Triton's interpreter)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dims = (32, 8, 128, 64) if device.type == "cuda" else (4, 2, 16, 16)
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    batches, kvs = (ints(args.batches), ints(args.kv)) if not args.smoke else ([2], [40])
    steps, layers = (args.steps, args.layers) if not args.smoke else (3, 2)
    rows = [run_row(name, B, KV, steps, layers, device, dims)
            for name in args.patterns.split(",") for B in batches for KV in kvs]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"Decode steps over an ac.KVCache on {gpu}, torch {torch.__version__}: ms per step", "",
             "| pattern | B | KV | layers | step | repeat (no new lengths) | new step's extra | list builds "
             "in as many steps | ms per build |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['pattern']} | {r['B']} | {r['KV']} | {r['layers']} | {r['step_ms']:.3f} | {r['repeat_ms']:.3f} | "
              f"{r['new_step_ms']:.3f} | {r['builds']} | {r['build_ms']:.1f} |" for r in rows]
    print("\n".join(lines))
    write_table(args.out_dir, "serving_loop", rows, lines)
    return rows


if __name__ == "__main__":
    main()
