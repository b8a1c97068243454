"""Quickstart: README's ten-line example, runnable.

A sliding-window causal pattern with soft-capped scores, written as FlexAttention-style
mask_mod / score_mod functions, run by attncc's compiled kernel (`ac.attention`) and compared
with the float64 oracle (`ac.reference`); then the window param is rebound (same kernel, new
block mask) and compared again.

    python examples/quickstart.py            # GPU (bf16, B=2 H=8 N=4096 D=128) if there is one
    python examples/quickstart.py --small    # tiny CPU run in Triton's interpreter (also ATTNCC_EXAMPLE_SMALL=1)
"""
import argparse
import os

import torch

import attncc as ac


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny CPU-sized run (also ATTNCC_EXAMPLE_SMALL=1)")
    args = parser.parse_args(argv)
    small = args.small or os.environ.get("ATTNCC_EXAMPLE_SMALL") == "1" or not torch.cuda.is_available()
    device, dtype = ("cpu", torch.float32) if small else ("cuda", torch.bfloat16)
    B, H, N, D, window, narrow = (1, 2, 200, 32, 48, 16) if small else (2, 8, 4096, 128, 1024, 256)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4  # relative error bound (ac.testing.TOLERANCE)

    # --- the README example
    W = ac.param("W", window)                      # a runtime scalar: rebinding never recompiles
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= W)
    def score_mod(score, b, h, q_idx, kv_idx):
        return 30.0 * torch.tanh(score / 30.0)

    pat = ac.Pattern(mask_mod, score_mod)           # traced into the IR; print(pat) shows the DSL
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(3))
    out, lse = ac.attention(q, k, v, pat, return_lse=True)          # the compiled kernel
    out2 = ac.attention(q, k, v, pat.bind(W=narrow))                 # same kernel, new block mask
    # ---

    print(f"pattern, as the DSL prints it:\n{pat}\n")
    print(f"q, k, v: {tuple(q.shape)} {dtype} on {device}")
    ref, ref_lse = ac.reference(q, k, v, pat, return_lse=True)       # the float64 oracle
    ref2 = ac.reference(q, k, v, pat.bind(W=narrow))
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    results = {"out_err": rel(out, ref), "lse_err": rel(lse, ref_lse), "rebound_err": rel(out2, ref2),
               "tolerance": tol}
    print(f"W = {window}: relative error vs ac.reference: out {results['out_err']:.2e}, lse {results['lse_err']:.2e}")
    print(f"W = {narrow} (pat.bind): relative error {results['rebound_err']:.2e}")
    ok = max(results["out_err"], results["lse_err"], results["rebound_err"]) < tol
    print(f"{'OK' if ok else 'FAILED'}: all within {tol:.0e}")
    return results


if __name__ == "__main__":
    main()
