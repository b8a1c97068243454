"""attncc's backward kernels on the GPU: tile configurations swept per pattern, backward alone.

    python benchmarks/backward_sweep.py [--patterns swa1024,document] [--D 128] [--flex]

For each pattern the dK/dV kernel's tiles are swept with the dQ kernel's fixed at the current
default, then the dQ kernel's with the best dK/dV found (the two kernels run one after the other,
so their times add). Effective TFLOP/s of the backward = 2.5 * 4 * D * live pairs / time.
Every configuration's gradients (batch 0) are checked against the float64 oracle (rel err < 2e-2)
before it is timed; a configuration that fails says BAD.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import attncc as ac  # noqa: E402
from attncc.runtime.inputs import check_qkv  # noqa: E402
from attncc.runtime.choices import choose_backward_tiles, tile_tuple  # noqa: E402
from benchmarks.patterns import build, count_live_pairs  # noqa: E402

OURS = {"backend": "triton"}
CANDIDATES = {  # head dim -> candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) of the dK/dV kernel
    64: [(64, 64, 4, 3), (32, 128, 4, 3), (64, 128, 4, 3), (64, 128, 8, 3), (128, 128, 8, 2)],
    128: [(64, 64, 4, 3), (64, 64, 4, 2), (32, 128, 4, 3), (64, 128, 4, 3), (64, 128, 8, 3), (32, 128, 8, 3),
          (128, 64, 8, 2), (32, 64, 4, 3), (32, 64, 4, 2), (64, 32, 4, 2),  # these three: short sparse rows
          (32, 32, 4, 2), (32, 32, 4, 3)],  # 32-key boxes of 3-D neighbourhood bricks
    256: [(64, 64, 8, 1), (64, 64, 4, 2), (32, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2)],
}


def transpose(t: tuple) -> tuple:
    """The dQ candidate of a dK/dV one: the same tile with rows and columns swapped."""
    return (t[1], t[0], t[2], t[3])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patterns", default="swa1024,document,causal,softcap,alibi,dilated,prefixlm2048")
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--N", type=int, default=8192)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--flex", action="store_true", help="also time FlexAttention's backward")
    ap.add_argument("--no-dq", dest="dq", action="store_false", help="sweep the dK/dV kernel's tiles only")
    args = ap.parse_args()
    dev = torch.device("cuda")
    B, H, N, D = args.B, args.H, args.N, args.D
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), warmup=300, rep=300)
    default = choose_backward_tiles(check_qkv(q, k, v), q.dtype, dev, {})
    print(f"{torch.cuda.get_device_name()} B={B} H={H} N={N} D={D} bf16; default {default}", flush=True)
    table = []
    for name in args.patterns.split(","):
        bp = build(name, N, H, device=dev)
        live = count_live_pairs(bp.mask_mod, 1, 1, N, N, device=dev)[0] * B * H
        tflops = lambda ms: 2.5 * 4 * D * live / (ms * 1e-3) / 1e12  # noqa: E731

        q1, k1, v1 = (t[:1].detach().double().requires_grad_() for t in (q, k, v))
        ref = torch.autograd.grad(ac.reference(q1, k1, v1, bp.attncc), (q1, k1, v1), dout[:1].double())

        def measure(opts: dict):
            out = ac.attention(q, k, v, bp.attncc, kernel_options={**OURS, **opts})
            grads = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
            err = max(((a[:1].double() - b).norm() / b.norm()).item() for a, b in zip(grads, ref))
            if not err < 2e-2:
                return None, f"BAD rel err {err:.1e}"
            ms = triton.testing.do_bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
                                         warmup=25, rep=100)
            return grads, tflops(ms)

        _, base = measure({})
        if isinstance(base, str):
            print(f"{name}: default {base}", flush=True)
            continue
        print(f"{name}: default {base:.0f}", flush=True)
        best_dkdv, best = tile_tuple(default.dkdv), base
        for cand in CANDIDATES[D]:
            try:
                _, r = measure({"dkdv_tiles": cand, "dq_tiles": tile_tuple(default.dq)})
            except Exception as e:  # noqa: BLE001 - out of resources etc.
                r = f"failed {type(e).__name__}"
            print(f"  dkdv {cand}: {r if isinstance(r, str) else f'{r:.0f}'}", flush=True)
            if not isinstance(r, str) and r > best:
                best_dkdv, best = cand, r
        best_dq = tile_tuple(default.dq)
        for cand in map(transpose, CANDIDATES[D] if args.dq else []):
            try:
                _, r = measure({"dkdv_tiles": best_dkdv, "dq_tiles": cand})
            except Exception as e:  # noqa: BLE001
                r = f"failed {type(e).__name__}"
            print(f"  dq {cand} (dkdv {best_dkdv}): {r if isinstance(r, str) else f'{r:.0f}'}", flush=True)
            if not isinstance(r, str) and r > best:
                best_dq, best = cand, r
        flex = None
        if args.flex:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            bm = create_block_mask(bp.mask_mod, None, None, N, N, device=dev) if bp.mask_mod else None
            fo = torch.compile(flex_attention)(q, k, v, score_mod=bp.score_mod, block_mask=bm)
            flex = tflops(triton.testing.do_bench(
                lambda: torch.autograd.grad(fo, (q, k, v), dout, retain_graph=True), warmup=25, rep=100))
        table.append((name, base, best, best_dkdv, best_dq, flex))
    print("\n| pattern | default | best | dkdv | dq | flex bwd |\n|---|---|---|---|---|---|")
    for name, base, best, dk, dq, flex in table:
        print(f"| {name} | {base:.0f} | {best:.0f} | {dk} | {dq} | {'-' if flex is None else f'{flex:.0f}'} |")


if __name__ == "__main__":
    main()
