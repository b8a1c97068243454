"""`attncc calibrate`: measure a hardware profile for the cost model (compiler/cost.py) on this GPU.

What it measures (bf16, D=128, on the GPU it runs on), for each forward tile shape the simulator
compares (choices.TRITON_CANDIDATES) and for fa4 where it runs:
- the rate: full attention at B x H x N tokens, FLOPs / time (every tile FULL);
- the PARTIAL factor, the per-program prologue and which tile shapes fit two programs per SM:
  fitted (compiler/cost.fit, a grid search for the least rms log error) to the times of
  `fit_patterns` (causal, a sliding window, a document mask) at every configuration;
- the costs of the mask's and the score mod's operators: fitted the same way, to the times of a
  2-D neighbourhood mask and a softcapped score (`fit_patterns` too);
- the Triton backward's rates: each pair of choices.BACKWARD_CANDIDATES times the backward of full
  attention, and the pair's rates in the shipped profile's backward spec (the H200's where the
  matching profile has none) are scaled by predicted / measured; its PARTIAL factors, prologues and
  operator cost, and FA4's backward spec, are the shipped profile's (fitting them needs sparse
  timings at every pair: benchmarks/refit_backward.py --tiles).
The profile is written as JSON (default: <attncc cache>/profiles/<name>.json), where
`cost.profile_for` finds it before the shipped ones. SM count, peak rates and bandwidth come from
the shipped profile the GPU's name matches (else "generic"); so do the occupancies the fit starts from.
"""
from __future__ import annotations

import datetime
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..compiler import cost
from ..compiler.codegen import TileConfig
from ..dsl.parse import parse
from ..dsl.pattern import Pattern
from . import cache
from .choices import BACKWARD_CANDIDATES, TRITON_CANDIDATES, tile_tuple
from .inputs import check_qkv
from .kernel import META_CACHE


def user_profiles() -> Path:
    """Where calibrated profiles live: <attncc cache dir>/profiles."""
    return cache.cache_dir() / "profiles"


def profile_for(device: torch.device | None = None, target: str | None = None) -> cost.Profile:
    """cost.profile_for, with the profiles `attncc calibrate` wrote found first."""
    return cost.profile_for(device, target, user_dir=user_profiles())


def time_ms(fn, device) -> float:
    """Median ms of fn on the GPU (triton do_bench), or one warm run on CPU."""
    if device.type == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=25, rep=100)
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _measure(pattern, q, k, v, backend: str, tiles: TileConfig) -> tuple[float, object]:
    """(ms, the kernel) of the forward of `pattern` forced onto backend/tiles."""
    from .api import compile as compile_

    options = {"backend": backend}
    if backend == "triton":
        options.update(BLOCK_M=tiles.BLOCK_M, BLOCK_N=tiles.BLOCK_N, num_warps=tiles.num_warps,
                       num_stages=tiles.num_stages)
    kern = compile_(pattern, q, k, v, kernel_options=options)
    return time_ms(lambda: kern(q, k, v), q.device), kern


def fit_patterns(N: int) -> dict:
    """The patterns calibrate times to fit PARTIAL factors, prologues and operator costs: long and
    short rows, diagonal and scattered PARTIAL tiles (documents of N/4 + 7 tokens, off the tile
    grid), a mask of many operators (a 2-D neighbourhood over rows of 96 tokens, off the grid too)
    and a score mod (softcap)."""
    w = max(1, N // 8)
    return {"causal": parse("mask = q >= kv"), "sliding_window": parse(f"mask = q >= kv and q - kv <= {w}"),
            "document": parse(f"mask = q // {N // 4 + 7} == kv // {N // 4 + 7}"),
            "neighborhood": parse("mask = abs(q // 96 - kv // 96) <= 5 and abs(q % 96 - kv % 96) <= 5"),
            "softcap": parse("mask = q >= kv\nscore = 30.0 * tanh(score / 30.0)")}


def _backward_spec(base: cost.Profile, profile: cost.Profile, q, k, v, candidates) -> dict:
    """The Triton backward's spec for `profile` (its forward measured): the shipped one's (`base`,
    else the H200's), each candidate pair's rates scaled by its predicted / measured backward time
    of full attention on q, k, v (the two kernels of a pair by the same factor)."""
    from .api import attention
    from .choices import triton_backward_ms

    prior = base.backends.get("triton", {}).get("backward") or cost.load_profile("h200").backends["triton"]["backward"]
    spec = {key: (dict(val) if isinstance(val, dict) else {"default": val})
            if key in ("tflops", "partial_factor", "program_us") else val for key, val in prior.items()}
    full, s = Pattern(name="full"), check_qkv(q, k, v)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    dout = torch.randn_like(q)
    trial = replace(profile, backends={**profile.backends, "triton": {**profile.backends["triton"], "backward": spec}})
    for n, pair in enumerate(candidates):  # (spec's rates are scaled in place: trial sees each pair's scaling)
        options = {"backend": "triton", "dkdv_tiles": tile_tuple(pair.dkdv), "dq_tiles": tile_tuple(pair.dq)}
        out_ = attention(*leaves, full, kernel_options=options)
        measured = time_ms(lambda: torch.autograd.grad(out_, leaves, dout, retain_graph=True), q.device)
        ratio = triton_backward_ms(full, s, pair, q.device, trial) / measured
        keys = (["default"] if n == 0 else
                [f"dkdv {cost.shape_key(pair.dkdv)}", f"dq {cost.shape_key(pair.dq)}"])
        for key in keys:
            rate = spec["tflops"].get(key, spec["tflops"]["default"])
            spec["tflops"][key] = float(f"{rate * ratio:.4g}")
    return spec


def calibrate(device: torch.device, *, B: int = 4, H: int = 16, N: int = 8192, D: int = 128,
              out: Path | None = None, candidates=TRITON_CANDIDATES, backward_candidates=BACKWARD_CANDIDATES) -> Path:
    """Measure a profile on `device` (see the module docstring) for the Triton tile shapes
    `candidates` (and fa4 where it runs) and the backward's tile pairs `backward_candidates`
    (the first one's rates are the spec's default), and write it; returns its path."""
    from . import fa4

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = profile_for(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton's interpreter)"
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g) for _ in range(3))
    s = check_qkv(q, k, v)
    full = Pattern(name="full")
    configs = [("triton", t) for t in candidates]
    if device.type == "cuda" and fa4.refusal(full, s, q) is None:
        configs.append(("fa4", fa4.TILE))
    backends: dict = {}
    fitted = fit_patterns(N)
    timings: list[cost.Timing] = []
    for backend, tiles in configs:
        ms, _ = _measure(full, q, k, v, backend, tiles)
        spec = backends.setdefault(backend, {"tflops": {}, "partial_factor": 1.0, "program_us": 0.0,
                                             "programs_per_sm": dict(base.backends.get(backend, {}).get(
                                                 "programs_per_sm", {"default": 1}))})
        spec["tflops"][cost.shape_key(tiles)] = float(f"{2.0 * (D + D) * B * H * N * N / (ms * 1e-3) / 1e12:.4g}")
        for pattern in fitted.values():
            ms, kern = _measure(pattern, q, k, v, backend, tiles)
            _, meta = META_CACHE.get(kern.pattern, s, kern.tiles, device)
            timings.append(cost.Timing(meta, B, H, D, kern.tiles, backend, ms))
    errors = {}
    for backend, spec in backends.items():
        spec["tflops"]["default"] = min(spec["tflops"].values())
        rated = replace(base, backends={**base.backends, backend: spec})
        backends[backend], errors[backend] = cost.fit(rated, backend, timings)
    measured = replace(base, backends={**base.backends, **backends})
    backends["triton"]["backward"] = _backward_spec(base, measured, q, k, v, backward_candidates)
    if "fa4" in backends and "backward" in base.backends.get("fa4", {}):
        backends["fa4"]["backward"] = base.backends["fa4"]["backward"]
    key = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    data = {"name": name, "match": [name] if device.type == "cuda" else [], "capability": list(
        torch.cuda.get_device_capability(device)) if device.type == "cuda" else [0, 0],
            "sms": base.sms, "peak_matrix_tflops": base.peak_matrix_tflops,
            "hbm_tbps": base.hbm_tbps, "backends": backends,
            "provenance": f"measured by attncc calibrate on {name}, {datetime.date.today()}, torch {torch.__version__}: "
                          f"rates from full attention B{B} H{H} N{N} D{D}; PARTIAL factors, prologues, "
                          f"occupancy and operator costs fitted to {', '.join(fitted)} at each configuration (rms log error "
                          + ", ".join(f"{b} {e:.3f}" for b, e in errors.items())
                          + f"); the Triton backward's rates from full attention's backward at each tile pair, "
                          f"its other coefficients and FA4's backward from the "
                          f"{base.key if 'backward' in base.backends.get('triton', {}) else 'h200'!r} profile; "
                          f"SMs and peaks from the {base.key!r} profile"}
    path = out or user_profiles() / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
