"""Ways to run one pattern, in one process (bf16, main shape): kernel_options side by side, each
way's output and gradients checked against float64 on a slice (batch 0, two heads) and against
the first way's, then timed (forward, forward+backward).

The fa4 backend's ways with a band or segment mask (the default --ways):
- native: FA4's own local / varlen kernels (compiler/bands.py), deterministic backward (default);
- native-nondet: the same kernels, FA4's nondeterministic backward (deterministic=False);
- hooks: mask_mod + block lists forward, attncc's deterministic Triton backward (fa4_native=False);
- hooks-nondet: the same forward, FA4's nondeterministic block-sparse backward (what FlexAttention's
  FLASH backend runs; fa4_native=False, deterministic=False).
A dilated mask's (`--patterns dilated --ways auto,layout,fold-triton,fold-fa4`): the automatic
choice, attncc's Triton kernels in the residue layout (fold=False), and the residue fold
(runtime/fold.py) on Triton and on fa4.

    python benchmarks/ways.py [--patterns swa1024,prefixlm2048,document,sinks,chunked] [--ways ...]

Prints forward and forward+backward ms per way, a table last. fa4 ways need FlashAttention-4.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import attncc as ac  # noqa: E402
from benchmarks.patterns import SHAPES, build  # noqa: E402

WAYS = {"native": {"backend": "fa4"}, "native-nondet": {"backend": "fa4", "deterministic": False},
        "hooks": {"backend": "fa4", "fa4_native": False},
        "hooks-nondet": {"backend": "fa4", "fa4_native": False, "deterministic": False},
        "auto": {}, "layout": {"fold": False}, "fold-triton": {"backend": "triton"}, "fold-fa4": {"backend": "fa4"}}


def oracle_errors(pattern, q, k, v, dout, out, grads) -> tuple[float, float]:
    """(out, max gradient) relative errors against float64 on batch 0, heads 0-1 (MHA)."""
    leaves = [t[:1, :2].detach().double().requires_grad_() for t in (q, k, v)]
    ref = ac.reference(*leaves, pattern)
    want = torch.autograd.grad(ref, leaves, dout[:1, :2].double())
    return rel(out[:1, :2], ref), max(rel(a[:1, :2], b) for a, b in zip(grads, want))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def main() -> None:
    import triton.testing

    ap = argparse.ArgumentParser()
    ap.add_argument("--patterns", default="swa1024,prefixlm2048,document,sinks,chunked")
    ap.add_argument("--shape", default="main", choices=sorted(SHAPES))
    ap.add_argument("--ways", default="native,native-nondet,hooks,hooks-nondet", help=f"comma list of {sorted(WAYS)}")
    args = ap.parse_args()
    sh = SHAPES[args.shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(sh.B, sh.Hq, sh.N, sh.D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(sh.B, sh.Hkv, sh.N, sh.D, device="cuda", dtype=torch.bfloat16, generator=gen)
            for _ in range(2))
    dout = torch.randn_like(q)
    bench = lambda f: float(triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median"))  # noqa: E731
    rows = []
    for name in args.patterns.split(","):
        pattern = build(name, sh.N, sh.Hq, "cuda").attncc
        results = {}
        for way in args.ways.split(","):
            options = WAYS[way]
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]

            def step():
                for t in leaves:
                    t.grad = None
                ac.attention(*leaves, pattern, kernel_options=options).backward(dout)
            step()
            grads = [t.grad.clone() for t in leaves]
            out = ac.attention(q, k, v, pattern, kernel_options=options)
            config = ac.compile(pattern, q, k, v, kernel_options=options).config
            fwd = bench(lambda: ac.attention(q, k, v, pattern, kernel_options=options))
            errors = oracle_errors(pattern, q, k, v, dout, out, grads) if sh.Hq == sh.Hkv else (math.nan,) * 2
            results[way] = (fwd, bench(step), out, grads, errors)
            print(name, way, f"{fwd:.3f} / {results[way][1]:.3f} ms", config, flush=True)
        base = next(iter(results.values()))
        for way, (fwd, both, out, grads, errors) in results.items():
            rows.append((name, way, fwd, both, *errors, rel(out, base[2]),
                         max(rel(a, b) for a, b in zip(grads, base[3]))))
    print(f"\n{sh.label()} bf16; ms, do_bench medians; errors against float64 (batch 0, heads 0-1) and the "
          f"first way\n")
    print("| pattern | way | fwd ms | fwd+bwd ms | out err | grad err | out vs first | grad vs first |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|")
    for name, way, fwd, both, *errs in rows:
        print(f"| {name} | {way} | {fwd:.3f} | {both:.3f} | " + " | ".join(f"{e:.1e}" for e in errs) + " |")


if __name__ == "__main__":
    main()
