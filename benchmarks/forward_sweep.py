"""attncc forward on the GPU: correctness in bf16 at real sizes, then effective TFLOP/s against
FlexAttention (torch.compile'd) and SDPA cuDNN in the same process.

    python benchmarks/forward_sweep.py [--patterns causal,full,...] [--sweep] [--no-flex]

Effective TFLOP/s = 4 * D * live pairs / time (BENCHMARKS.md). attncc is forced onto its own
kernel (kernel_options={"backend": "triton"}), also with TMA descriptors for K/V; cuDNN
is listed beside full and causal.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import attncc as ac  # noqa: E402
from benchmarks.patterns import build, count_live_pairs  # noqa: E402

OURS = {"backend": "triton"}
SWEEP = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
         for m in (64, 128) for n in (64, 128) for w in (4, 8) for s in (2, 3)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=300)


def check(name: str, pat, q, k, v) -> str:
    """Relative errors of out and lse vs the float64 oracle on batch 0 (all heads)."""
    out, lse = ac.attention(q, k, v, pat, return_lse=True, kernel_options=OURS)
    ref, ref_lse = ac.reference(q[:1], k[:1], v[:1], pat, return_lse=True)
    finite = torch.isfinite(ref_lse)
    e_out = rel(out[:1], ref)
    e_lse = rel(lse[:1][finite], ref_lse[finite])
    ok = e_out < 2e-2 and e_lse < 2e-2 and not out.isnan().any() and torch.equal(lse[:1].isinf(), ~finite)
    return f"{'ok ' if ok else 'BAD'} out {e_out:.1e} lse {e_lse:.1e}"


def flex_fn(bp, q, k, v):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    N = q.shape[2]
    compiled = torch.compile(flex_attention)
    bm = create_block_mask(bp.mask_mod, None, None, N, N, device=q.device) if bp.mask_mod else None
    return lambda: compiled(q, k, v, score_mod=bp.score_mod, block_mask=bm)


def recompile_check(q, k, v) -> str:
    """A new param value (W=1024 -> 1023) must reuse the compiled Triton kernel."""
    pat = ac.patterns.sliding_window(1024)
    kern = ac.compile(pat, q, k, v, kernel_options=OURS)
    fn = kern.module.attention_forward
    ac.attention(q, k, v, pat, kernel_options=OURS)
    before = sum(len(c[0]) for c in fn.device_caches.values())
    ac.attention(q, k, v, pat.bind(W=1023), kernel_options=OURS)
    ac.attention(q, k, v, pat.bind(W=999), kernel_options=OURS)
    after = sum(len(c[0]) for c in fn.device_caches.values())
    return f"triton kernel cache entries: {before} before, {after} after rebinding W twice"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patterns", default="full,causal,swa1024,prefixlm2048,document,dilated,alibi,softcap")
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--H", type=int, default=16)
    ap.add_argument("--N", type=int, default=8192)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--sweep", default="", help="patterns to sweep tile configs on")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    dev = torch.device("cuda")
    B, H, N, D = args.B, args.H, args.N, args.D
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} "
          f"B={B} H={H} N={N} D={D} bf16", flush=True)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    # a fresh process meets the GPU at idle clocks: the first pattern measured 30% low without this
    triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), warmup=500, rep=500)
    print(recompile_check(q, k, v), flush=True)
    rows = []
    for name in args.patterns.split(","):
        bp = build(name, N, H, device=dev)
        pat = bp.attncc
        live = count_live_pairs(bp.mask_mod, 1, 1, N, N, device=dev)[0] * B * H
        tflops = lambda ms: 4 * D * live / (ms * 1e-3) / 1e12
        t0 = time.time()
        status = "" if args.no_check else check(name, pat, q, k, v)
        first = time.time() - t0
        kern = ac.compile(pat, q, k, v, kernel_options=OURS)
        ours = bench(lambda: ac.attention(q, k, v, pat, kernel_options=OURS))
        tma = bench(lambda: ac.attention(q, k, v, pat, kernel_options={**OURS, "tma": True}))
        row = {"pattern": name, "attncc": tflops(ours), "tma": tflops(tma), "check": status, "cfg": str(kern.tiles)}
        if not args.no_flex:
            try:
                row["flex"] = tflops(bench(flex_fn(bp, q, k, v)))
            except Exception as e:  # noqa: BLE001 - report and go on
                row["flex"] = float("nan")
                print(f"flex failed on {name}: {type(e).__name__}: {e}", flush=True)
        if bp.sdpa_causal is not None:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                f = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=bp.sdpa_causal)
                row["cudnn"] = tflops(bench(f))
            row["auto"] = tflops(bench(lambda: ac.attention(q, k, v, pat)))
            row["auto_path"] = ac.compile(pat, q, k, v).config["backend"]
        print(f"{name}: {row}  (check+compile {first:.1f}s)", flush=True)
        rows.append(row)
        if name in args.sweep.split(","):
            for opts in SWEEP:
                try:
                    ms = bench(lambda: ac.attention(q, k, v, pat, kernel_options={**OURS, **opts}))
                    print(f"  sweep {name} {opts}: {tflops(ms):.0f} TFLOP/s", flush=True)
                except Exception as e:  # noqa: BLE001 - out of resources etc.
                    print(f"  sweep {name} {opts}: failed {type(e).__name__}", flush=True)
    print("\n| pattern | attncc | attncc, TMA | flex | attncc/flex | cuDNN | auto (path) | tiles | check |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        flex = r.get("flex", float("nan"))
        auto = f"{r['auto']:.0f} ({r['auto_path']})" if "auto" in r else "-"
        cudnn = f"{r['cudnn']:.0f}" if "cudnn" in r else "-"
        print(f"| {r['pattern']} | {r['attncc']:.0f} | {r['tma']:.0f} | {flex:.0f} | {r['attncc'] / flex:.2f} | {cudnn} | {auto} "
              f"| {r['cfg']} | {r['check']} |")


if __name__ == "__main__":
    main()
