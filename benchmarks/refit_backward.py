"""Refit the Triton backward's rate in a profile to recorded backward times — on CPU (block maps
are built here; nothing runs on a GPU).

    python benchmarks/refit_backward.py [--profile h200] [--tiles]

--tiles: fit the small-tile candidate (choices.BACKWARD_CANDIDATES[128]: dK/dV 32x64/4/3 + dQ 64x64/4/2)
and the mask operator cost instead, to the 2026-12-03 tile sweeps (SWEEP below); see fit_tiles.

The times (B4 H16 N8192 D128 bf16, dK/dV 64x128/8/3 + dQ 128x64/8/3) are forward+backward minus
forward, as recorded in benchmarks/results: the suite after the fused delta pass
(2026-12-02-nvidia-h200-suite-delta.md, effective TFLOP/s, converted with the patterns' live
pairs) and `python benchmarks/ways.py --patterns prefixlm2048,sinks`'s hooks way on
2026-12-02 (ms; Triton backward on FA4's forward). The rate is fitted to FIT, the others are held
out; the PARTIAL factor and prologue are kept. Prints the table and the rate.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import attncc as ac  # noqa: E402
from attncc.compiler import cost  # noqa: E402
from attncc.compiler.codegen import BackwardTiles, TileConfig  # noqa: E402
from attncc.runtime.choices import tile_tuple, triton_backward_ms  # noqa: E402
from attncc.runtime.inputs import Shapes  # noqa: E402
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


LARGE, SMALL = ((64, 128, 8, 3), (128, 64, 8, 3)), ((32, 64, 4, 3), (64, 64, 4, 2))  # (dK/dV, dQ) tiles
SWEEP = [  # (pattern, dK/dV tiles, dQ tiles, backward-alone effective TFLOP/s = 2.5*4*D*live / time),
    # benchmarks/results/2026-12-03-nvidia-h200-backward-sweep-natten.md; ("suite", fwd, fwd+bwd) rows:
    # 2026-12-03-nvidia-h200-natten-bwd-tiles.md (forward from the sweep session's 112 / 152)
    ("full", LARGE[0], LARGE[1], 414), ("full", SMALL[0], LARGE[1], 381), ("full", LARGE[0], SMALL[1], 393),
    ("natten2d", LARGE[0], LARGE[1], 68), ("natten2d", SMALL[0], LARGE[1], 102), ("natten2d", SMALL[0], SMALL[1], 110),
    ("natten3d", LARGE[0], LARGE[1], 63), ("natten3d", SMALL[0], LARGE[1], 66),
    ("natten3d", SMALL[0], SMALL[1], ("suite", 112, 74)), ("natten2d", SMALL[0], SMALL[1], ("suite", 152, 121)),
] + [  # held out: measured after the fit and after the pick was predicted (.probe A/B run, backward alone, ms)
    (name, *pair, ("ms", ms)) for name, a, b in (
        ("swa1024", 2.308, 2.200), ("document", 2.659, 2.603), ("sinks", 2.728, 2.401), ("dilated", 2.236, 2.102),
        ("chunked", 1.397, 1.348), ("causal", 7.031, 7.775), ("prefixlm2048", 7.583, 8.124),
        ("global_tokens", 8.859, 5.509), ("strided_heads", 9.330, 8.982))
    for pair, ms in ((LARGE, a), (SMALL, b))]


def fit_tiles(profile) -> None:
    """Fit, in order, each to the data that isolates it: the small dK/dV and dQ tiles' rates to
    full attention (no PARTIAL tile: rates alone), the backward's mask operator cost to natten2d
    and natten3d at the large tiles (PARTIAL factor 1.6 kept: it was fitted to band and document
    masks, whose PARTIAL tiles evaluate two or three operators), then the small tiles' PARTIAL
    factors to natten2d (dK/dV alone small, then both); natten3d with both small, and the suite's
    forward+backward rows, are held out. Prints the spec and a table."""
    s, cpu = Shapes(B, H, H, N, N, D, D), torch.device("cpu")
    triton = profile.backends["triton"]
    large = BackwardTiles(TileConfig(*LARGE[0]), TileConfig(*LARGE[1]))  # the large tiles' fit is kept
    spec = {field: {"default": cost.backward_field(triton["backward"], field, "dkdv", large.dkdv)}
            for field in ("tflops", "partial_factor", "program_us")}
    rows = []
    for name, dkdv, dq, measured in SWEEP:
        pattern = build(name, N, H, "cpu").attncc.kernel_pattern
        flops = 4 * D * cost.live_pairs(pattern, ac.create_block_mask(pattern, B, H, N, N, 128), B, H, N, N)[0]
        if isinstance(measured, tuple) and measured[0] == "ms":
            ms = measured[1]
        elif isinstance(measured, tuple):
            _, fwd, both = measured
            ms = (3.5 * flops / both - flops / fwd) / 1e9
        else:
            ms = 2.5 * flops / measured / 1e9
        rows.append((name, BackwardTiles(TileConfig(*dkdv), TileConfig(*dq)), pattern, ms, isinstance(measured, tuple)))

    def predicted(row, trial: dict) -> float:
        _, tiles, pattern, _, _ = row
        prof = replace(profile, backends={**profile.backends, "triton": {**triton, "backward": trial}})
        return triton_backward_ms(pattern, s, tiles, cpu, prof)

    def fit(field: str, key: str | None, grid, chosen):
        def error(x):
            trial = {**spec, field: {**spec[field], key: x}} if key else {**spec, field: x}
            errs = [math.log(predicted(r, trial) / r[3]) ** 2 for r in chosen]
            return math.sqrt(sum(errs) / len(errs))
        best = min(grid, key=error)
        if key:
            spec[field] = {**spec[field], key: best}
        else:
            spec[field] = best
        return best, error(best)

    def pick(name, dkdv, dq):
        return [r for r in rows if r[0] == name and (tile_tuple(r[1].dkdv), tile_tuple(r[1].dq)) == (dkdv, dq)
                and not r[4]]

    small_k, small_q = (f"{kernel} {cost.shape_key(TileConfig(*t))}" for kernel, t in zip(("dkdv", "dq"), SMALL))
    mask_op = fit("mask_op", None, [x / 1000 for x in range(0, 301, 5)], pick("natten2d", *LARGE) + pick("natten3d", *LARGE))
    print(f"mask_op: {mask_op[0]} (rms log error {mask_op[1]:.3f} on natten2d, natten3d at the large tiles)")
    sparse = pick("natten2d", SMALL[0], LARGE[1]) + pick("natten3d", SMALL[0], LARGE[1]) + pick("natten2d", *SMALL)
    trials = []
    for prologue in (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0):  # the small tiles' prologue, both kernels
        spec["program_us"] = {**spec["program_us"], small_k: prologue, small_q: prologue}
        fit("tflops", small_k, range(300, 801, 5), pick("full", SMALL[0], LARGE[1]))
        fit("tflops", small_q, range(300, 801, 5), pick("full", LARGE[0], SMALL[1]))
        fit("partial_factor", small_k, [x / 20 for x in range(20, 81)], sparse[:2])
        _, err = fit("partial_factor", small_q, [x / 20 for x in range(20, 81)], sparse[2:])
        errs = [math.log(predicted(r, spec) / r[3]) ** 2 for r in sparse]
        trials.append((math.sqrt(sum(errs) / len(errs)), prologue, json.loads(json.dumps(spec))))
        print(f"prologue {prologue} us: rms log error {trials[-1][0]:.3f} on the small tiles' natten rows")
    err, prologue, best = min(trials, key=lambda t: t[0])
    spec.clear()
    spec.update(best)
    print("\nspec:", json.dumps(spec), "\n")
    print("| pattern | dK/dV | dQ | measured ms | predicted ms | |\n|---|---|---|---:|---:|---|")
    for row in rows:
        name, tiles, _, ms, held = row
        print(f"| {name} | {tile_tuple(tiles.dkdv)} | {tile_tuple(tiles.dq)} | {ms:.3f} | {predicted(row, spec):.3f} | "
              f"{'held out' if held or (name == 'natten3d' and tile_tuple(tiles.dq) == SMALL[1]) else 'fit'} |")
    print("\n| pattern | measured large / small | predicted large / small | pick right |\n|---|---:|---:|---|")
    for name in dict.fromkeys(r[0] for r in rows):
        by = {(tile_tuple(r[1].dkdv), tile_tuple(r[1].dq)): r for r in rows if r[0] == name}
        if LARGE in by and SMALL in by:
            m, p_ = by[LARGE][3] / by[SMALL][3], predicted(by[LARGE], spec) / predicted(by[SMALL], spec)
            print(f"| {name} | {m:.2f} | {p_:.2f} | {'yes' if (m > 1) == (p_ > 1) else 'NO'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="h200")
    ap.add_argument("--tiles", action="store_true", help="fit the small-tile candidate (fit_tiles)")
    args = ap.parse_args()
    profile = cost.load_profile(args.profile)
    if args.tiles:
        return fit_tiles(profile)
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
        rates = triton["backward"]["tflops"]
        rates = {**rates, "default": tflops} if isinstance(rates, dict) else tflops
        trial = replace(profile, backends={**profile.backends,
                                           "triton": {**triton, "backward": {**triton["backward"], "tflops": rates}}})
        return triton_backward_ms(pattern, s, TILES, cpu, trial)

    def error(tflops: float) -> float:
        fit = [math.log(predicted(p, tflops) / ms) ** 2 for name, source, p, ms in rows if (name, source) in FIT]
        return math.sqrt(sum(fit) / len(fit))

    shipped = cost.backward_field(profile.backends["triton"]["backward"], "tflops", "dkdv", TILES.dkdv)
    best = min(range(300, 901, 5), key=error)
    print(f"rate {shipped} -> {best} TFLOP/s, rms log error {error(shipped):.3f} -> {error(best):.3f} (in sample)\n")
    print("| pattern | source | measured ms | predicted, shipped | predicted, refitted | |\n|---|---|---:|---:|---:|---|")
    for name, source, p, ms in rows:
        print(f"| {name} | {source} | {ms:.3f} | {predicted(p, shipped):.3f} | {predicted(p, best):.3f} | "
              f"{'fit' if (name, source) in FIT else 'held out'} |")


if __name__ == "__main__":
    main()
