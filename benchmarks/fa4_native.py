"""The fa4 backend's three ways to run a band or segment mask, in one process (bf16, main shape):

- native: FA4's own local / varlen kernels (compiler/bands.py), deterministic backward (default);
- native-nondet: the same kernels, FA4's nondeterministic backward (deterministic=False);
- hooks: mask_mod + block lists forward, attncc's deterministic Triton backward (fa4_native=False);
- hooks-nondet: the same forward, FA4's nondeterministic block-sparse backward (what FlexAttention's
  FLASH backend runs; fa4_native=False, deterministic=False).

    python benchmarks/fa4_native.py [--patterns swa1024,prefixlm2048,document,sinks,chunked]

Prints forward and forward+backward ms per way, and each way's output and gradients against the
default's (relative error), a table last. Needs a GPU with FlashAttention-4.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import attncc as ac  # noqa: E402
from benchmarks.patterns import SHAPES, build  # noqa: E402

WAYS = {"native": {"backend": "fa4"}, "native-nondet": {"backend": "fa4", "deterministic": False},
        "hooks": {"backend": "fa4", "fa4_native": False},
        "hooks-nondet": {"backend": "fa4", "fa4_native": False, "deterministic": False}}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def main() -> None:
    import triton.testing

    ap = argparse.ArgumentParser()
    ap.add_argument("--patterns", default="swa1024,prefixlm2048,document,sinks,chunked")
    ap.add_argument("--shape", default="main", choices=sorted(SHAPES))
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
        for way, options in WAYS.items():
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
            results[way] = (fwd, bench(step), out, grads, config)
            print(name, way, f"{fwd:.3f} / {results[way][1]:.3f} ms", config.get("fa4_kernel"),
                  config.get("fa4_native", "-"), config["backward"], flush=True)
        base = results["native"]
        for way, (fwd, both, out, grads, _) in results.items():
            rows.append((name, way, fwd, both, rel(out, base[2]), max(rel(a, b) for a, b in zip(grads, base[3]))))
    print(f"\n{sh.label()} bf16; ms, do_bench medians; errors relative to the native way\n")
    print("| pattern | way | fwd ms | fwd+bwd ms | out rel err | max grad rel err |\n|---|---|---:|---:|---:|---:|")
    for name, way, fwd, both, e_out, e_grad in rows:
        print(f"| {name} | {way} | {fwd:.3f} | {both:.3f} | {e_out:.1e} | {e_grad:.1e} |")


if __name__ == "__main__":
    main()
