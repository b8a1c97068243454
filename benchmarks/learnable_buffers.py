"""The backward with and without learnable buffers (their exact gradient pass), on the GPU.

    python benchmarks/learnable_buffers.py [--N 8192]

Times torch.autograd.grad of attncc's output (bf16, B=4 H=16 D=128, sliding window 1024) for the
plain pattern, with learnable ALiBi-style slopes, and with a learnable relative-position table.
"""
from __future__ import annotations

import argparse

import torch
import triton

import attncc as ac


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, default=8192)
    N = ap.parse_args().N
    B, H, D = 4, 16, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    slopes = torch.rand(H, device="cuda").requires_grad_()
    table = torch.randn(2 * N - 1, device="cuda").requires_grad_()

    def window(b, h, q, kv):
        return (q >= kv) & (q - kv < 1024)
    cases = {
        "plain": (ac.Pattern(window), ()),
        "learnable slopes": (ac.Pattern(window, lambda s, b, h, q, kv: s + slopes[h] * (kv - q) / 256), (slopes,)),
        "learnable relative table": (ac.Pattern(window, lambda s, b, h, q, kv: s + table[q - kv + N - 1]), (table,)),
    }
    for name, (pat, bufs) in cases.items():
        out = ac.attention(q, k, v, pat)
        step = lambda: torch.autograd.grad(out, (q, k, v, *bufs), do, retain_graph=True)  # noqa: E731
        step()
        print(f"swa1024, {name}: backward {triton.testing.do_bench(step, warmup=10, rep=50):.2f} ms", flush=True)


if __name__ == "__main__":
    main()
