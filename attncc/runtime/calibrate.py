"""`attncc calibrate`: measure a hardware profile for the cost model (compiler/cost.py) on this GPU.

What it measures (bf16, at one head dim D, default 128, on the GPU it runs on), for each forward
tile shape the simulator compares at D's class (choices.triton_candidates) and for fa4 where it runs:
- the rate: full attention at B x H x N tokens, FLOPs / time (every tile FULL);
- the PARTIAL factor, the per-program prologue and which tile shapes fit two programs per SM:
  fitted (compiler/cost.fit, a grid search for the least rms log error) to the times of
  `fit_patterns` (causal, a sliding window, a document mask) at every configuration;
- the costs of the mask's and the score mod's operators: fitted the same way, to the times of a
  2-D neighbourhood mask and a softcapped score (`fit_patterns` too);
- the Triton backward's rates: each pair of choices.BACKWARD_CANDIDATES (of D's class) times the
  backward of full attention, and the pair's rates in the prior profile's backward spec (the
  H200's where it has none) are scaled by predicted / measured; FA4's backward rate likewise from
  its own (where fa4 runs); their PARTIAL factors, prologues and operator costs are the prior
  profile's (fitting them needs sparse timings at every pair: benchmarks/refit_backward.py --tiles);
- SDPA's cuDNN kernel (where it runs) like a tile shape: its rate from full attention, its
  PARTIAL factor and prologue fitted to causal (the only other pattern it runs), priced at the
  tiles attncc keeps for the calls it cannot take (choices.choose_tiles);
- each backend's `call_us`: a tiny call's host time, calls made back to back (call_us), the least
  a call costs however small its kernels (cost.Profile.ranking).
The profile is written as JSON (default: <attncc cache>/profiles/<name>.json), where
`cost.profile_for` finds it before the shipped ones: the GPU's current profile with the figures of
D's head dim class (cost.HEAD_DIM_CLASSES) replaced, so calibrating 64, 128 and 256 in turn (what
`attncc calibrate` does without --head-dim) builds one profile for all three; its provenance keeps
one statement per class. SM count, peak rates and bandwidth come from the profile the GPU's name
matches (else "generic"); so do the occupancies the fit starts from.
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
from .choices import tile_tuple
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


def _forced(pattern, q, k, v, backend: str, tiles: TileConfig):
    """The compiled forward of `pattern` forced onto backend (and, on triton, tiles)."""
    from .api import compile as compile_

    options = {"backend": backend}
    if backend == "triton":
        options.update(BLOCK_M=tiles.BLOCK_M, BLOCK_N=tiles.BLOCK_N, num_warps=tiles.num_warps,
                       num_stages=tiles.num_stages)
    return compile_(pattern, q, k, v, kernel_options=options)


def _measure(pattern, q, k, v, backend: str, tiles: TileConfig) -> tuple[float, object]:
    """(ms, the kernel) of the forward of `pattern` forced onto backend/tiles."""
    kern = _forced(pattern, q, k, v, backend, tiles)
    return time_ms(lambda: kern(q, k, v), q.device), kern


def call_us(backend: str, tiles: TileConfig, D: int, device: torch.device, calls: int = 100,
            repeats: int = 5) -> float:
    """Host microseconds of one forward call of `backend` (`tiles`) made back to back on a tiny
    call (full attention, B1 H2 N256 at head dim D, bf16), where the host's Python, allocations
    and launches, not the kernel, set the pace: the least of `repeats` runs of `calls` calls
    (noise on a shared host only adds). The profile's `call_us` (cost.Profile.ranking)."""
    q, k, v = (torch.randn(1, 2, 256, D, device=device, dtype=torch.bfloat16) for _ in range(3))
    kern = _forced(Pattern(name="full"), q, k, v, backend, tiles)
    for _ in range(20):
        kern(q, k, v)
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            kern(q, k, v)
        torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


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


def _backward_spec(base: cost.Profile, profile: cost.Profile, q, k, v, candidates, log) -> dict:
    """The Triton backward's spec for `profile` (its forward measured, at q's head dim class): the
    prior one's (`base`'s at that class, else at its own, else the H200's), each candidate pair's
    rates scaled by its predicted / measured backward time of full attention on q, k, v (the two
    kernels of a pair by the same factor)."""
    from .choices import triton_backward_ms

    prior = _prior_backward(base, "triton", q.shape[-1])
    spec = {key: (dict(val) if isinstance(val, dict) else {"default": val})
            if key in ("tflops", "partial_factor", "program_us") else val for key, val in prior.items()}
    keys = [["default"]] + [[f"dkdv {cost.shape_key(p.dkdv)}", f"dq {cost.shape_key(p.dq)}"] for p in candidates[1:]]
    spec["tflops"] = {key: spec["tflops"].get(key, spec["tflops"]["default"]) for pair in keys for key in pair}
    trial = replace(profile, backends={**profile.backends, "triton": {**profile.backends["triton"], "backward": spec}})
    for pair, pair_keys in zip(candidates, keys):  # (rates scaled in place: trial sees each pair's scaling)
        options = {"backend": "triton", "dkdv_tiles": tile_tuple(pair.dkdv), "dq_tiles": tile_tuple(pair.dq)}
        ms = _backward_ms(q, k, v, options)
        log(f"triton backward {pair}: full {ms:.3f} ms")
        ratio = triton_backward_ms(Pattern(name="full"), check_qkv(q, k, v), pair, q.device, trial) / ms
        for key in pair_keys:
            spec["tflops"][key] = float(f"{spec['tflops'][key] * ratio:.4g}")
    return spec


def _fa4_backward_spec(base: cost.Profile, profile: cost.Profile, q, k, v, log) -> dict:
    """FA4's backward spec for `profile` at q's head dim class: the prior one's (`base`'s at that
    class, else at its own, else the H200's), its rate scaled by predicted / measured of full
    attention's (deterministic) backward on q, k, v."""
    from .fa4 import own_backward_calls
    from .choices import fa4_own_backward_ms

    s, full = check_qkv(q, k, v), Pattern(name="full")
    prior = dict(_prior_backward(base, "fa4", q.shape[-1]))
    trial = replace(profile, backends={**profile.backends, "fa4": {**profile.backends["fa4"], "backward": prior}})
    predicted = fa4_own_backward_ms(own_backward_calls(full, s, q.device, True), full, s, True, trial)
    ms = _backward_ms(q, k, v, {"backend": "fa4"})
    log(f"fa4 backward: full {ms:.3f} ms")
    prior["tflops"] = float(f"{prior['tflops'] * predicted / ms:.4g}")
    return prior


def _prior_backward(base: cost.Profile, backend: str, D: int) -> dict:
    """`backend`'s backward spec to scale: `base`'s at D's head dim class, else at its own class,
    else the shipped H200 profile's."""
    return ((base.spec(backend, D) or {}).get("backward") or base.backends.get(backend, {}).get("backward")
            or cost.load_profile("h200").backends[backend]["backward"])


def _backward_ms(q, k, v, options: dict) -> float:
    """ms of full attention's backward alone on q, k, v with `options`."""
    from .api import attention

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, Pattern(name="full"), kernel_options=options)
    dout = torch.randn_like(q)
    return time_ms(lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True), q.device)


def calibrate(device: torch.device, *, B: int = 4, H: int = 16, N: int = 8192, D: int = 128,
              out: Path | None = None, candidates=None, backward_candidates=None, log=None,
              base: cost.Profile | None = None) -> Path:
    """Measure a profile on `device` at head dim D (see the module docstring) for the Triton tile
    shapes `candidates` (default: choices.triton_candidates(D)) and fa4 where it runs, and the
    backward's tile pairs `backward_candidates` (default: choices.BACKWARD_CANDIDATES of D's class;
    the first one's rates are the spec's default), and write it; returns its path. The profile
    written is `base` (default: the one the GPU has now: a calibrated one, else the shipped one its
    name matches, else "generic") with the figures of D's head dim class (cost.HEAD_DIM_CLASSES)
    replaced: its base figures where that is its class, else its `head_dims` entry for the class.
    `log`, if given, is called with a line per measurement."""
    from . import fa4
    from .choices import BACKWARD_CANDIDATES, choose_tiles, sdpa_refusal, triton_candidates

    cls = cost.head_dim_class(D)
    if cls is None:
        raise ValueError(f"calibrate measures head dims up to {cost.HEAD_DIM_CLASSES[-1]}, got {D}")
    candidates = triton_candidates(D) if candidates is None else candidates
    backward_candidates = BACKWARD_CANDIDATES[cls] if backward_candidates is None else backward_candidates
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = base or profile_for(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton's interpreter)"
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g) for _ in range(3))
    s = check_qkv(q, k, v)
    full = Pattern(name="full")
    configs = [("triton", t) for t in candidates]
    if device.type == "cuda" and fa4.refusal(full, s, q) is None:
        configs.append(("fa4", fa4.TILE))
    if sdpa_refusal(full, s, device.type, dtype, False) is None:
        configs.append((cost.SDPA_CUDNN, choose_tiles(s, dtype, device, {})))
    backends: dict = {}
    fitted = fit_patterns(N)
    timings: list[cost.Timing] = []
    log = log or (lambda line: None)
    for backend, tiles in configs:
        ms, _ = _measure(full, q, k, v, backend, tiles)
        log(f"{backend} {tiles}: full {ms:.3f} ms")
        prior = base.spec(backend, D) or base.backends.get(backend, {})
        spec = backends.setdefault(backend, {"tflops": {}, "partial_factor": 1.0, "program_us": 0.0,
                                             "programs_per_sm": dict(prior.get("programs_per_sm", {"default": 1}))})
        spec["tflops"][cost.shape_key(tiles)] = float(f"{2.0 * (D + D) * B * H * N * N / (ms * 1e-3) / 1e12:.4g}")
        for pname, pattern in fitted.items():
            if backend == cost.SDPA_CUDNN and sdpa_refusal(pattern, s, device.type, dtype, False) is not None:
                continue  # cuDNN runs plain full and causal attention only
            ms, kern = _measure(pattern, q, k, v, backend, tiles)
            log(f"{backend} {tiles}: {pname} {ms:.3f} ms")
            _, meta = META_CACHE.get(kern.pattern, s, kern.tiles, device)
            timings.append(cost.Timing(meta, B, H, D, kern.tiles, backend, ms))
    errors = {}
    at_class = replace(base, backends={}, head_dim=cls)  # the figures of D's class, as they are measured
    for backend, spec in backends.items():
        spec["tflops"]["default"] = min(spec["tflops"].values())
        rated = replace(at_class, backends={backend: spec})
        backends[backend], errors[backend] = cost.fit(rated, backend, timings)
    measured = replace(at_class, backends=backends)
    backends["triton"]["backward"] = _backward_spec(base, measured, q, k, v, backward_candidates, log)
    if "fa4" in backends:
        backends["fa4"]["backward"] = _fa4_backward_spec(base, measured, q, k, v, log)
    statement = (
        f"head dim class {cls}: measured by attncc calibrate on {name}, {datetime.date.today()}, torch "
        f"{torch.__version__}: rates from full attention B{B} H{H} N{N} D{D}; PARTIAL factors, prologues, "
        f"occupancy and operator costs fitted to {', '.join(fitted)} at each configuration"
        + (" (cuDNN's to causal, the only one it runs)" if cost.SDPA_CUDNN in backends else "") + " (rms log error "
        + ", ".join(f"{b} {e:.3f}" for b, e in errors.items())
        + "); the Triton backward's rates from full attention's backward at each tile pair"
        + (", FA4's backward rate from its own" if "fa4" in backends else "")
        + f", their other coefficients from the {base.key!r} profile (else the H200's)"
        + ("; call_us: a tiny call's host time back to back (calibrate.call_us)." if device.type == "cuda" else "."))
    for spec in backends.values():
        spec["provenance"] = statement
    data = _merged(base, backends, cls)
    if device.type == "cuda":  # one call's host time per backend, at the first of its configurations
        for backend, tiles in dict(reversed(configs)).items():
            data["call_us"][backend] = float(f"{call_us(backend, tiles, D, device):.3g}")
            log(f"{backend}: a tiny call's host time {data['call_us'][backend]:g} us")
    data.update({"name": name, "match": [name] if device.type == "cuda" else [], "capability": list(
        torch.cuda.get_device_capability(device)) if device.type == "cuda" else [0, 0]})
    data["provenance"] = _provenance(data, base)
    key = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    path = out or user_profiles() / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def _provenance(data: dict, base: cost.Profile) -> str:
    """The profile's provenance: each head dim class's calibration statement (kept in its Triton
    spec, so calibrating a class again replaces only that class's), and where the other figures
    come from (SMs, peaks and classes not calibrated: `base`'s first sentence)."""
    triton = data["backends"].get("triton", {})
    specs = [(data["head_dim"], triton), *((int(c), s) for c, s in triton.get("head_dims", {}).items())]
    said = [s["provenance"] for _, s in sorted(specs, key=lambda cs: cs[0]) if "provenance" in s]
    marker = " SMs, peak rates and other figures: "
    source = (base.provenance.split(marker, 1)[1] if marker in base.provenance  # (base was calibrated too)
              else f"the {base.key!r} profile's ({cost.first_sentence(base.provenance)})")
    return " ".join(said) + marker + source


def _merged(base: cost.Profile, measured: dict, cls: int) -> dict:
    """`base` as profile JSON with `measured` (backend -> spec) as its figures of head dim class
    `cls` (cost.Profile.with_spec)."""
    for backend, spec in measured.items():
        base = base.with_spec(backend, cls, spec)
    return {"name": base.name, "match": list(base.match), "sms": base.sms,
            "peak_matrix_tflops": base.peak_matrix_tflops, "hbm_tbps": base.hbm_tbps, "link_tbps": base.link_tbps,
            "head_dim": base.head_dim, "backends": base.backends, "call_us": dict(base.call_us)}
