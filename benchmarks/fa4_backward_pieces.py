"""FA4's own backward, one band at a time (the calibration of cost.simulate_fa4_backward):

    python benchmarks/fa4_backward_pieces.py

Times flash_attn.cute.interface._flash_attn_bwd alone (do_bench medians, ms) on the slices
q[q0:q1], kv[k0:k1] with each band's FA4 window (compiler/bands.Band.window), deterministic and
not, at B4 H16 N8192 D128 bf16 (out and LSE from a causal forward: the time does not depend on
their values), beside the model's prediction from the h200 profile. Needs a GPU with FA4.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from attncc.compiler import cost  # noqa: E402
from attncc.compiler.bands import Band  # noqa: E402

B, H, N, D, P = 4, 16, 8192, 128, 2048
BANDS = {  # name: (q0, q1, k0, k1, lo, hi), lo <= kv - q <= hi
    "dense N": (0, N, 0, N, None, None),
    "causal N": (0, N, 0, N, None, 0),
    "prefix LM by columns: q all x kv < P": (0, N, 0, P, None, None),
    "prefix LM by columns: q, kv >= P, causal": (P, N, P, N, None, 0),
    "prefix LM by rows: q, kv < P": (0, P, 0, P, None, None),
    "prefix LM by rows: q >= P x kv all, causal": (P, N, 0, N, None, 0),
    "sinks' window: q, kv >= 4, kv - q in [-1024, 0]": (4, N, 4, N, -1024, 0),
    "sinks' sink columns: q all x kv < 4, causal": (0, N, 0, 4, None, 0),
}


def main() -> None:
    import triton.testing
    from flash_attn.cute import interface as fi

    scale = D ** -0.5
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    out, lse, *_ = fi._flash_attn_fwd(t(q), t(k), t(v), softmax_scale=scale, causal=True, return_lse=True)
    out = t(out)
    profile = cost.load_profile("h200")
    rows = []
    for name, spec in BANDS.items():
        band = Band(*spec)
        left, right = band.window()
        r, c = slice(band.q0, band.q1), slice(band.k0, band.k1)
        times = []
        for det in (True, False):
            def call():
                fi._flash_attn_bwd(t(q[:, :, r]), t(k[:, :, c]), t(v[:, :, c]), t(out[:, :, r]), t(dout[:, :, r]),
                                   lse[:, :, r].contiguous(), scale, False, window_size_left=left,
                                   window_size_right=right, deterministic=det)
            times.append(float(triton.testing.do_bench(call, warmup=10, rep=50, return_mode="median")))
        predicted = [cost.simulate_fa4_backward([(band,)], B, H, H, D, profile, det) for det in (True, False)]
        rows.append((name, *times, *predicted))
        print(rows[-1], flush=True)
    print(f"\nB{B} H{H} N{N} D{D} bf16, FA4 backward alone, ms\n")
    print("| band | deterministic | predicted | nondeterministic | predicted |\n|---|---:|---:|---:|---:|")
    for name, det, nondet, p_det, p_nondet in rows:
        print(f"| {name} | {det:.3f} | {p_det:.3f} | {nondet:.3f} | {p_nondet:.3f} |")


if __name__ == "__main__":
    main()
