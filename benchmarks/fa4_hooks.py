"""The fa4 backend's hooks with buffers, timed — a benchmark, not a test.

    python benchmarks/fa4_hooks.py [--D 128] [--patterns alibi,t5,...] [--backward] [--out-dir DIR]

Per pattern (B4 H16 N8192, bf16, every one forced onto the fa4 backend): the forward's do_bench
median (and forward+backward's with --backward), after checking the output at B1 N777 (a ragged
last tile: the hooks' clamped reads) against the float64 reference. The patterns read buffers in
the ways compiler/cute.py passes them: at h only (alibi's slopes, per_head's head groups), at q
and kv (global tokens' flags, T5's bucket table), beside a causal mask and softcap without any.
For an A/B of a change to the hooks, run it at both commits on one warm machine.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import attncc as ac  # noqa: E402
from benchmarks.report import write_table  # noqa: E402

B, H, N = 4, 16, 8192
FA4 = {"backend": "fa4"}


def patterns(device) -> dict:
    flags = torch.arange(N, device=device) % 997 == 0
    return {
        "causal": ac.patterns.causal(),
        "softcap": ac.patterns.softcap(30.0),
        "alibi": ac.patterns.alibi(H, device=device),
        "per_head": ac.patterns.per_head([ac.patterns.causal() if h % 2 else ac.patterns.sinks(4, 1024)
                                          for h in range(H)]),
        "global_softcap": ac.patterns.global_tokens(flags, window=512, causal=True)
        & ac.patterns.softcap(30.0, causal=False),
        "t5": ac.patterns.relative_bias(torch.randn(32, H, device=device) * 0.1, num_buckets=32) & ac.patterns.causal(),
    }


def checked(pattern, q, k, v) -> float:
    """The fa4 output's relative error against the float64 reference at B1 N777."""
    part = (slice(0, 1), slice(None), slice(0, 777))
    qs, ks, vs = q[part], k[part], v[part]
    ref = ac.reference(qs.double(), ks.double(), vs.double(), pattern)
    out = ac.attention(qs, ks, vs, pattern, kernel_options=FA4)
    return ((out.double() - ref).norm() / ref.norm()).item()


def main(argv=None) -> dict:
    import triton

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--patterns", default=None, help="comma list (default: all)")
    ap.add_argument("--backward", action="store_true", help="also time forward+backward")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, N, args.D, device=device, dtype=torch.bfloat16, generator=g) for _ in range(3))
    chosen = patterns(device)
    names = args.patterns.split(",") if args.patterns else list(chosen)
    rows = {}
    lines = [f"fa4 forward{' and forward+backward' if args.backward else ''} ms, B{B} H{H} N{N} D{args.D} bf16, "
             f"{torch.cuda.get_device_name()}", "", "| pattern | forward ms | forward+backward ms | rel err (N777) |",
             "|---|---:|---:|---:|"]
    for name in names:
        pattern = chosen[name]
        err = checked(pattern, q, k, v)
        if err > 2e-2:
            raise AssertionError(f"{name}: fa4 output off the reference by {err:.2e}")
        kern = ac.compile(pattern, q, k, v, kernel_options=FA4)
        fwd = triton.testing.do_bench(lambda: kern(q, k, v), warmup=25, rep=100)
        both = float("nan")
        if args.backward:
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            dout = torch.randn_like(q)
            both = triton.testing.do_bench(lambda: torch.autograd.grad(kern(*leaves), leaves, dout), warmup=10, rep=60)
        rows[name] = {"forward_ms": fwd, "forward_backward_ms": both, "rel_err": err}
        lines.append(f"| {name} | {fwd:.3f} | {both:.3f} | {err:.1e} |")
        print(lines[-1], flush=True)
    write_table(args.out_dir, "fa4-hooks", rows, lines)
    return rows


if __name__ == "__main__":
    main()
