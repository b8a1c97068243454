"""Refit a profile's forward coefficients to recorded cost-model timings, and validate on patterns
held out of the fit — on CPU (block maps are built here; nothing runs on a GPU).

    python benchmarks/refit.py RESULTS.json [...] [--profile h200] [--hold-out prefixlm2048,alibi]
                               [--backends fa4] [--out-dir DIR] [--partial-grid 128x128:1.6,1.8,2.0]

RESULTS: benchmarks/costmodel.py's JSON files (per pattern, each configuration's measured ms; a
pattern at a shape in several files counts from the last file given), bf16 at the shape each records (older files: B4 H16 D128 and their N), all of one head dim class (the
class's figures are refitted: cost.HEAD_DIM_CLASSES). compiler/cost.fit refits each backend's PARTIAL factor, prologue,
occupancy and operator costs to every row except the held-out patterns' (the profile's rates are
kept; --backends: only these backends' figures are refitted); the table gives, per pattern, the Spearman rank correlation, the measured time of the
simulator's pick against the best measured and the rms log error, under the profile as shipped and
as refitted. Copy the printed coefficients into compiler/profiles/<profile>.json to adopt them.
--partial-grid SHAPE:F1,F2,...: instead, the same scores with the Triton PARTIAL factor of tile
shape SHAPE set to each value (nothing else refitted): for choosing a factor by its picks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from attncc.compiler import cost  # noqa: E402
from attncc.compiler.codegen import TileConfig  # noqa: E402
from attncc.runtime import fa4  # noqa: E402
from attncc.runtime.inputs import Shapes  # noqa: E402
from attncc.runtime.kernel import META_CACHE  # noqa: E402
from benchmarks.costmodel import kernel_form, ranking  # noqa: E402
from benchmarks.patterns import build  # noqa: E402
from benchmarks.report import write_table  # noqa: E402

B, H, D = 4, 16, 128  # benchmarks/costmodel.py's main shape (results that do not record theirs)


def tiles_of(config: str) -> tuple[str, TileConfig]:
    """("triton", tiles) of "triton 128x64/8/3"; ("fa4", fa4.TILE) of "fa4 128x128"."""
    backend, shape = config.split()
    if backend == "fa4":
        return backend, fa4.TILE
    blocks, warps, stages = shape.split("/")
    bm, bn = blocks.split("x")
    return backend, TileConfig(int(bm), int(bn), int(warps), int(stages))


def timings_of(results: list[dict]) -> list[tuple[str, cost.Timing]]:
    """(pattern name, Timing) of every row of costmodel results, block maps built on the CPU."""
    out, patterns = [], {}
    for r in results:
        N = r["N"]
        shape = r.get("shape", {"B": B, "Hq": H, "Hkv": H, "D": D})  # rows before shapes were recorded: main's
        s = Shapes(shape["B"], shape["Hq"], shape["Hkv"], N, N, shape["D"], shape["D"])
        pattern = patterns.setdefault((r["pattern"], N, s.Hq),
                                      build(r["pattern"], N, s.Hq, torch.device("cpu")).attncc)
        for row in r["rows"]:
            backend, tiles = tiles_of(row["config"])
            kp, ks = kernel_form(pattern, s, backend)
            _, meta = META_CACHE.get(kp, ks, tiles, torch.device("cpu"))
            out.append((r["pattern"], cost.Timing(meta, ks.B, ks.Hq, ks.D, tiles, backend, row["measured_ms"])))
    return out


def latest(files) -> list[dict]:
    """The cases of several costmodel results, a pattern at a shape recorded twice counting from the
    later file (a re-measurement after a kernel change supersedes the earlier one)."""
    cases = {}
    for results in files:
        for r in results:
            cases[(r["pattern"], r["N"], json.dumps(r.get("shape"), sort_keys=True))] = r
    return list(cases.values())


def scores(timings: list[tuple[str, cost.Timing]], profile: cost.Profile) -> dict:
    """Per pattern: Spearman, the pick's measured time / the best measured, rms log error."""
    by: dict[str, list[cost.Timing]] = {}
    for name, t in timings:
        by.setdefault(name, []).append(t)
    return {name: ranking([cost.simulate(t.meta, t.B, t.H, t.D, t.tiles, t.backend, profile).ms for t in ts],
                          [t.ms for t in ts]) for name, ts in by.items()}


def partial_grid(timings: list[tuple[str, cost.Timing]], profile: cost.Profile, grid: str) -> dict:
    """Scores (pick / best, Spearman per pattern; rms of the rms log errors) with the Triton PARTIAL
    factor of one tile shape set to each value of `grid` ("128x128:1.6,1.8") at the timings' head dim
    class."""
    shape, values = grid.split(":")
    D = timings[0][1].D  # the timings' head dim class: its figures are the ones varied
    triton = profile.spec("triton", D)
    factors = triton["partial_factor"] if isinstance(triton["partial_factor"], dict) else {
        "default": triton["partial_factor"]}
    out = {}
    for value in map(float, values.split(",")):
        trial = profile.with_spec("triton", D, {**triton, "partial_factor": {**factors, shape: value}})
        sc = scores(timings, trial)
        rms = (sum(v["rms_log_err"] ** 2 for v in sc.values()) / len(sc)) ** 0.5
        out[value] = sc
        print(f"{shape} PARTIAL factor {value}: rms log error {rms:.3f}; pick / best, Spearman: " +
              ", ".join(f"{k} {v['pick_vs_best']:.2f}x {v['spearman']:.2f}" for k, v in sc.items()))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+")
    ap.add_argument("--profile", default="h200", help="a shipped profile's key, or a profile's JSON file")
    ap.add_argument("--hold-out", default="", help="comma list of patterns left out of the fit")
    ap.add_argument("--backends", default="", help="comma list of the backends refitted (default: every one timed)")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--partial-grid", default=None, help="SHAPE:F1,F2,... (see above)")
    args = ap.parse_args(argv)
    held = set(filter(None, args.hold_out.split(",")))
    timings = timings_of(latest(json.loads(open(path).read()) for path in args.results))
    path = Path(args.profile)
    shipped = cost.load_profile(path.stem, path.parent) if path.suffix == ".json" else cost.load_profile(args.profile)
    if args.partial_grid:
        return partial_grid(timings, shipped, args.partial_grid)
    refitted, errors = shipped, {}
    for backend in sorted(set(filter(None, args.backends.split(","))) or {t.backend for _, t in timings}):
        fitted = [t for name, t in timings if name not in held]
        spec, errors[backend] = cost.fit(refitted, backend, fitted)
        refitted = refitted.with_spec(backend, fitted[0].D, spec)
    before, after = scores(timings, shipped), scores(timings, refitted)
    lines = [f"Refit of profile {args.profile!r} to {', '.join(args.results)}; held out: {', '.join(sorted(held)) or '-'}",
             "", "| pattern | in fit | Spearman shipped / refitted | pick / best shipped / refitted | "
             "rms log err shipped / refitted |", "|---|---|---:|---:|---:|"]
    for name in before:
        b, a = before[name], after[name]
        lines.append(f"| {name} | {'held out' if name in held else 'yes'} | {b['spearman']:.2f} / {a['spearman']:.2f} | "
                     f"{b['pick_vs_best']:.2f}x / {a['pick_vs_best']:.2f}x | {b['rms_log_err']:.2f} / {a['rms_log_err']:.2f} |")
    D = timings[0][1].D
    coefficients = {b: {k: v for k, v in refitted.spec(b, D).items() if k not in ("tflops", "backward", "head_dims")}
                    for b in errors}
    lines += ["", "refitted (rms log error in the fit: " + ", ".join(f"{b} {e:.3f}" for b, e in errors.items()) + "):",
              "", "```json", json.dumps(coefficients, indent=1), "```"]
    print("\n".join(lines))
    result = {"held_out": sorted(held), "before": before, "after": after, "coefficients": coefficients,
              "fit_rms_log_err": errors}
    write_table(args.out_dir, "refit", result, lines)
    return result


if __name__ == "__main__":
    main()
