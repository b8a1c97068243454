"""The cost model's pick of the backward's tiles, validated: each candidate pair timed per pattern.

    python benchmarks/backward_pick.py [--patterns swa1024,document,sinks,causal,natten2d,...]

For each pattern (B4 H16 N8192 D128 bf16 on the GPU; --D another head dim), attncc's Triton backward
alone at every pair of runtime/choices.BACKWARD_CANDIDATES of the head dim's class (forced through kernel_options, gradients of batch 0
checked against float64 first), beside the profile's predictions (choices.triton_backward_ms)
and the pair model_backward_tiles picks. Prints ms and whether the pick was the faster, a table
last. 2026-12-03's run: benchmarks/results/2026-12-03-nvidia-h200-backward-tiles.md.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import attncc as ac  # noqa: E402
from attncc.compiler import cost  # noqa: E402
from attncc.runtime import calibrate, choices  # noqa: E402
from attncc.runtime.inputs import check_qkv  # noqa: E402
from benchmarks.patterns import build  # noqa: E402

DEFAULT = "swa1024,document,sinks,dilated,chunked,causal,prefixlm2048,global_tokens,strided_heads,natten2d,natten3d"


def main() -> None:
    import triton.testing

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patterns", default=DEFAULT)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--N", type=int, default=8192)
    ap.add_argument("--D", type=int, default=128)
    args = ap.parse_args()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, dout = (torch.randn(args.B, args.H, args.N, args.D, device=dev, dtype=torch.bfloat16, generator=g)
                     for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    s = check_qkv(q, k, v)
    profile = calibrate.profile_for(dev)
    table = choices.choose_backward_tiles(s, q.dtype, dev, {})
    pairs = choices.BACKWARD_CANDIDATES[cost.head_dim_class(args.D)]
    print(f"{torch.cuda.get_device_name()} {s}; profile {profile.key!r}", flush=True)
    rows = []
    for name in args.patterns.split(","):
        pattern = build(name, args.N, args.H, dev).attncc
        kp = pattern.kernel_pattern
        q1, k1, v1 = (t[:1].detach().double().requires_grad_() for t in (q, k, v))
        ref = torch.autograd.grad(ac.reference(q1, k1, v1, pattern), (q1, k1, v1), dout[:1].double())
        picked = choices.model_backward_tiles(kp, s, dev, profile, table)
        timed = []
        for pair in pairs:
            opts = {"backend": "triton", "dkdv_tiles": choices.tile_tuple(pair.dkdv),
                    "dq_tiles": choices.tile_tuple(pair.dq)}
            out = ac.attention(q, k, v, pattern, kernel_options=opts)
            grads = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
            err = max(((a[:1].double() - b).norm() / b.norm()).item() for a, b in zip(grads, ref))
            if not err < 2e-2:
                raise SystemExit(f"{name} at {pair}: gradient rel err {err:.1e}")
            ms = float(triton.testing.do_bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
                                               warmup=25, rep=100))
            predicted = choices.triton_backward_ms(kp, s, pair, dev, profile)
            timed.append((ms, predicted, pair))
            print(f"{name} {pair}: {ms:.3f} ms measured, {predicted:.3f} predicted, rel err {err:.1e}", flush=True)
        best = min(timed, key=lambda t: t[0])
        chosen = next(t for t in timed if t[2] == picked)
        rows.append((name, timed, chosen[0] / best[0]))
    print(f"\n{s}, backward alone, ms (do_bench medians); the pick: choices.model_backward_tiles on {profile.key!r}\n")
    heads = " | ".join(f"{p.dkdv.BLOCK_M}x{p.dkdv.BLOCK_N} + {p.dq.BLOCK_M}x{p.dq.BLOCK_N} measured / predicted"
                       for p in pairs)
    print(f"| pattern | {heads} | pick / best |\n|---|" + "---:|" * (len(pairs) + 1))
    for name, timed, ratio in rows:
        print(f"| {name} | " + " | ".join(f"{ms:.3f} / {pr:.3f}" for ms, pr, _ in timed) + f" | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
