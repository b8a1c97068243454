"""Refit the Triton backward's rate in a profile to recorded backward times — on CPU (block maps
are built here; nothing runs on a GPU).

    python benchmarks/refit_backward.py [--profile h200]

The times (B4 H16 N8192 D128 bf16, dK/dV 64x128/8/3 + dQ 128x64/8/3) are forward+backward minus
forward, as recorded in benchmarks/results: the suite after the fused delta pass
(2026-12-02-nvidia-h200-suite-delta.md, effective TFLOP/s, converted with the patterns' live
pairs) and `python benchmarks/fa4_native.py --patterns prefixlm2048,sinks`'s hooks way on
2026-12-02 (ms; Triton backward on FA4's forward). The rate is fitted to FIT, the others are held
out; the PARTIAL factor and prologue are kept. Prints the table and the rate.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import attncc as ac  # noqa: E402
from attncc.compiler import cost  # noqa: E402
from attncc.compiler.codegen import BackwardTiles, TileConfig  # noqa: E402
from attncc.runtime.inputs import Shapes  # noqa: E402
from attncc.runtime.kernel import META_CACHE  # noqa: E402
from benchmarks.patterns import build  # noqa: E402

B, H, N, D = 4, 16, 8192, 128
TILES = BackwardTiles(TileConfig(64, 128, 8, 3), TileConfig(128, 64, 8, 3))
RECORDED = [  # (pattern, "tflops" fwd / fwd+bwd effective TFLOP/s | "ms" fwd / fwd+bwd ms, source)
    ("swa1024", "tflops", 457, 312, "suite-delta"),
    ("document", "tflops", 427, 319, "suite-delta"),
    ("prefixlm2048", "tflops", 613, 427, "suite-delta"),
    ("prefixlm2048", "ms", 1.918, 9.467, "fa4_native hooks"),
    ("sinks", "ms", 0.622, 3.326, "fa4_native hooks"),
]
FIT = {("swa1024", "suite-delta"), ("document", "suite-delta"), ("prefixlm2048", "suite-delta")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="h200")
    args = ap.parse_args()
    profile = cost.load_profile(args.profile)
    s, cpu = Shapes(B, H, H, N, N, D, D), torch.device("cpu")
    rows = []
    for name, unit, fwd, both, source in RECORDED:
        pattern = build(name, N, H, "cpu").attncc
        if unit == "tflops":
            flops = 4 * D * cost.live_pairs(pattern, ac.create_block_mask(pattern, B, H, N, N, 128), B, H, N, N)[0]
            ms = (3.5 * flops / both - flops / fwd) / 1e9
        else:
            ms = both - fwd
        rows.append((name, source, pattern, ms))

    def predicted(pattern, tflops: float) -> float:
        triton = profile.backends["triton"]
        trial = replace(profile, backends={**profile.backends,
                                           "triton": {**triton, "backward": {**triton["backward"], "tflops": tflops}}})
        return cost.simulate_backward(META_CACHE.backward(pattern, s, TILES.dkdv, cpu),
                                      META_CACHE.get(pattern, s, TILES.dq, cpu)[1], B, H, H, D, TILES, trial)

    def error(tflops: float) -> float:
        fit = [math.log(predicted(p, tflops) / ms) ** 2 for name, source, p, ms in rows if (name, source) in FIT]
        return math.sqrt(sum(fit) / len(fit))

    shipped = profile.backends["triton"]["backward"]["tflops"]
    best = min(range(300, 901, 5), key=error)
    print(f"rate {shipped} -> {best} TFLOP/s, rms log error {error(shipped):.3f} -> {error(best):.3f} (in sample)\n")
    print("| pattern | source | measured ms | predicted, shipped | predicted, refitted | |\n|---|---|---:|---:|---:|---|")
    for name, source, p, ms in rows:
        print(f"| {name} | {source} | {ms:.3f} | {predicted(p, shipped):.3f} | {predicted(p, best):.3f} | "
              f"{'fit' if (name, source) in FIT else 'held out'} |")


if __name__ == "__main__":
    main()
