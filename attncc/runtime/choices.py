"""What runs for a call: the backend (attncc's Triton kernels, FlashAttention-4's kernels fed with
attncc's hooks, or SDPA's cuDNN), the forward's tiles, the backward's backend and tiles, TMA, and the
kernel_options that override them.

The cost model (compiler/cost.py, on the GPU's profile) decides where a profile measures the
candidates (16-bit CUDA, at the head dim classes it has figures for: up to 64, 128, 256): the
forward's backend among triton, fa4 and SDPA's cuDNN and its tiles (ranked_candidates), the
backward after FA4's forward (fa4_backward_model_refusal) and the Triton backward's tiles
(model_backward_tiles); fa4 on a pattern with a token layout is priced with its permuted copies
(layout_copies_ms). Rules decide the rest, each saying where its numbers come from (H100
2026-11-22 and 2026-12-06, H200 2026-12-01..03): whether fa4 can run at all (fa4.refusal), the
backend where the profile lacks the figures (fa4 where it runs and no token layout keeps it off,
fa4_measured_faster, else cuDNN for plain full / causal attention, else triton: _pick_backend),
the tile tables outside the profiled range (CPU, float32, head dims a profile lacks), TMA, and
the decode path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compiler.codegen import BackwardTiles, TileConfig
from ..compiler.cost import SDPA_CUDNN
from ..compiler.layout import Layout
from ..dsl.ir import TRUE, Var, op
from ..dsl.pattern import Pattern
from .inputs import Shapes

_CAUSAL = op("ge", Var("q"), Var("kv"))
# GPUs `attncc show --target` can describe: (name, compute capability)
TARGETS = {"h200": ("NVIDIA H200", (9, 0)), "h100": ("NVIDIA H100", (9, 0))}


@dataclass(frozen=True)
class KernelChoice:
    """What runs: the forward's tiles, the backward's, the backend (one of BACKENDS), whether the
    forward reads K/V through tensor descriptors, the token layout (or None), and the residue fold
    (runtime/fold.Fold, or None; it replaces the layout)."""
    tiles: TileConfig
    backward_tiles: BackwardTiles
    backend: str
    tma: bool = False
    layout: Layout | None = None
    deterministic: bool = True
    fa4_native: bool = True        # fa4: run band / segment masks on FA4's own kernels (fa4.native_plan)
    tiles_forced: bool = False     # kernel_options set the forward's tiles: never changed at run time
    backward_forced: bool = False  # ... or the backward's (dkdv_tiles / dq_tiles)
    backward_by_model: bool = False  # the backward's tiles: the cost model's pick (model_backward_tiles)
    fold: object | None = None       # runtime/fold.Fold: the call runs folded (tiles, backend chosen folded)
    fallbacks: tuple = ()            # Triton tiles the simulator ranked next (a forward refused for registers)


def forced_tiles(options: dict) -> tuple[bool, bool]:
    """(forward, backward): whether kernel_options set any of the forward's / backward's tiles."""
    return any(k in options for k in TILE_OPTIONS), any(k in options for k in BACKWARD_TILE_OPTIONS)


def fewer_stages(t: TileConfig) -> TileConfig | None:
    """t with one pipeline stage fewer (less shared memory), None at one stage."""
    return TileConfig(t.BLOCK_M, t.BLOCK_N, t.num_warps, t.num_stages - 1) if t.num_stages > 1 else None


def fewer_registers(t: TileConfig) -> TileConfig | None:
    """t asking fewer registers per thread: twice the warps (up to 8: the accumulator and score
    tiles spread over more threads), else half the keys per tile (down to 16), else None."""
    if t.num_warps < 8:
        return TileConfig(t.BLOCK_M, t.BLOCK_N, t.num_warps * 2, t.num_stages)
    return TileConfig(t.BLOCK_M, t.BLOCK_N // 2, t.num_warps, t.num_stages) if t.BLOCK_N > 16 else None


def tile_tuple(t: TileConfig) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages), as kernel_options and Kernel.config spell tiles."""
    return (t.BLOCK_M, t.BLOCK_N, t.num_warps, t.num_stages)


TILE_OPTIONS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
BACKWARD_TILE_OPTIONS = ("dkdv_tiles", "dq_tiles")
_OPTIONS = TILE_OPTIONS + BACKWARD_TILE_OPTIONS + ("backend", "tma", "deterministic", "autotune", "fa4_native", "fold")
# handled by ac.attention before a kernel is chosen (runtime/decode.py, runtime/sequences.split_kv),
# refused by ac.compile unless the decode kernel runs
CALL_OPTIONS = ("kv_splits", "decode")
BACKENDS = ("triton", "fa4", SDPA_CUDNN)


def choose_tiles(s: Shapes, dtype: torch.dtype, device: torch.device, options: dict) -> TileConfig:
    """The tile table where cost_choice does not decide (options override any field).

    CPU (Triton's interpreter): 32x32 tiles, so small test shapes still span several tiles.
    CUDA, 16-bit (sweeps on the H100 with benchmarks/forward_sweep.py --sweep, 2026-11-22):
    D <= 64: 128x64, 4 warps, 3 stages (document +16% over 8 warps, causal -2%);
    D <= 128: 128x64, 8 warps, 3 stages (best of 12 configs on full and causal);
    above: 64x64, 4 warps, 2 stages (register pressure; D=256 with TMA: causal 394, document
    304 TFLOP/s, 1.25x and 1.28x FlexAttention; other configs not swept yet).
    CUDA, float32: 64x32, 4 warps, 2 stages (twice the bytes per element).
    """
    D = max(s.D, s.Dv)
    if device.type != "cuda":
        base = TileConfig(32, 32, 4, 1)
    elif dtype == torch.float32:
        base = TileConfig(64, 32, 4, 2)
    elif D <= 64:
        base = TileConfig(128, 64, 4, 3)
    elif D <= 128:
        base = TileConfig(128, 64, 8, 3)
    else:
        base = TileConfig(64, 64, 4, 2)
    return _overridden(base, options)


def _overridden(base: TileConfig, options: dict) -> TileConfig:
    """`base` with the tile fields kernel_options set (each checked)."""
    fields = {k: options.get(k, getattr(base, k)) for k in TILE_OPTIONS}
    for k, val in fields.items():
        _check_tile_field(f"kernel_options[{k!r}]", k, val)
    return TileConfig(**fields)


def _check_tile_field(where: str, field: str, val) -> None:
    ok = isinstance(val, int) and not isinstance(val, bool) and val >= 1
    if field.startswith("BLOCK") or field == "num_warps":
        ok = ok and val & (val - 1) == 0 and (val >= 16 or field == "num_warps")
    if not ok:
        raise ValueError(f"{where} = {val!r} is not valid ({'a power of two >= 16' if field.startswith('BLOCK') else 'a power of two' if field == 'num_warps' else 'an int >= 1'})")


def choose_backward_tiles(s: Shapes, dtype: torch.dtype, device: torch.device, options: dict) -> BackwardTiles:
    """The backward's table tiles (options["dkdv_tiles"] / ["dq_tiles"], each (BLOCK_M, BLOCK_N,
    num_warps, num_stages), override either kernel's); where backward_modelled, the cost model
    picks between them and a smaller pair (model_backward_tiles).

    CPU (Triton's interpreter): dK/dV 16x32 and dQ 32x16, so tests exercise two granularities
    other than the forward's. CUDA, 16-bit: BACKWARD_TILES, from benchmarks/backward_sweep.py on
    the H200 (2026-12-01, B4 H16 N8192 bf16, backward alone, every config checked against float64).
    D=128, dK/dV 64x128 / 8 warps / 3 stages with dQ 128x64 / 8 / 3: swa1024 221, document 232,
    softcap 268, alibi 300, causal 362 TFLOP/s (the best of 8 dK/dV configs on alibi and causal,
    within 5% of it elsewhere; 64x64 / 4 / 2 was 0.92x on causal). D=64 and D=256: the best of a
    smaller sweep of the earlier, untransposed dK/dV kernel (document, swa1024).
    CUDA, float32: 32x64 / 64x32, 4 warps, 2 stages (not swept).
    """
    D = max(s.D, s.Dv)
    if device.type != "cuda":
        base = BackwardTiles(TileConfig(16, 32, 4, 1), TileConfig(32, 16, 4, 1))
    elif dtype == torch.float32:
        base = BackwardTiles(TileConfig(32, 64, 4, 2), TileConfig(64, 32, 4, 2))
    else:
        base = next(t for limit, t in BACKWARD_TILES if D <= limit)
    picked = {}
    for name, default in (("dkdv_tiles", base.dkdv), ("dq_tiles", base.dq)):
        val = options.get(name)
        if val is None:
            picked[name] = default
            continue
        if not isinstance(val, (tuple, list)) or len(val) != 4:
            raise ValueError(f"kernel_options[{name!r}] must be (BLOCK_M, BLOCK_N, num_warps, num_stages), "
                             f"got {val!r}")
        for field, x in zip(TILE_OPTIONS, val):
            _check_tile_field(f"kernel_options[{name!r}] {field}", field, x)
        picked[name] = TileConfig(*val)
    return BackwardTiles(picked["dkdv_tiles"], picked["dq_tiles"])


# (largest head dim, tiles) for 16-bit inputs on CUDA
BACKWARD_TILES = (
    (64, BackwardTiles(TileConfig(64, 64, 4, 3), TileConfig(64, 64, 4, 3))),
    (128, BackwardTiles(TileConfig(64, 128, 8, 3), TileConfig(128, 64, 8, 3))),
    (256, BackwardTiles(TileConfig(64, 64, 8, 1), TileConfig(64, 64, 4, 2))),
)


# the backward's candidates where the cost model picks (backward_modelled), per head dim class
# (cost.HEAD_DIM_CLASSES), the table's pair first. 128: the table's large tiles, and small ones for
# masks of many PARTIAL tiles (H200, 2026-12-03, backward alone, both checked against float64:
# natten2d 2.85 -> 1.76 ms, global_tokens 8.86 -> 5.51, sinks 2.73 -> 2.40, causal 7.03 -> 7.78;
# benchmarks/results/2026-12-03-nvidia-h200-backward-tiles.md). 64 and 256: the table's, D=128's
# large pair (64) and a small pair, each pair's shapes distinct from the others' (a profile keys
# rates by "dkdv BMxBN" / "dq BMxBN").
BACKWARD_CANDIDATES = {
    64: (BACKWARD_TILES[0][1], BACKWARD_TILES[1][1], BackwardTiles(TileConfig(32, 64, 4, 3), TileConfig(64, 32, 4, 2))),
    128: (BACKWARD_TILES[1][1], BackwardTiles(TileConfig(32, 64, 4, 3), TileConfig(64, 64, 4, 2))),
    256: (BACKWARD_TILES[2][1], BackwardTiles(TileConfig(32, 64, 4, 2), TileConfig(64, 32, 4, 2))),
}


def backward_modelled(s: Shapes, dtype: torch.dtype, device: torch.device, options: dict) -> bool:
    """Whether the cost model may pick the backward's tiles (model_backward_tiles; it does where the
    GPU's profile has their rates): 16-bit CUDA, D and Dv of one head dim class, no backward tiles
    in kernel_options."""
    from ..compiler.cost import head_dim_class

    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
            and head_dim_class(s.D) is not None and head_dim_class(s.D) == head_dim_class(s.Dv)
            and not any(k in options for k in BACKWARD_TILE_OPTIONS))


def modelled_backward_candidates(profile, table: BackwardTiles, D: int) -> list[BackwardTiles]:
    """The BACKWARD_CANDIDATES pairs of head dim D's class that `profile` has rates for there: the
    table's pair (the spec's default rates) and each other whose "dkdv BMxBN" and "dq BMxBN"
    entries it holds."""
    from ..compiler.cost import head_dim_class, shape_key

    spec = (profile.spec("triton", D) or {}).get("backward")
    if spec is None:
        return []
    rates = spec.get("tflops") if isinstance(spec.get("tflops"), dict) else {}
    return [c for c in BACKWARD_CANDIDATES.get(head_dim_class(D), ()) if c == table or (
        f"dkdv {shape_key(c.dkdv)}" in rates and f"dq {shape_key(c.dq)}" in rates)]


def model_backward_tiles(pattern: Pattern, s: Shapes, lists_device: torch.device, profile,
                         fallback: BackwardTiles) -> BackwardTiles:
    """The modelled_backward_candidates pair of least predicted time (triton_backward_ms);
    `fallback` (the table's) where fewer than two are modelled."""
    modelled = modelled_backward_candidates(profile, fallback, s.D)
    if len(modelled) < 2:
        return fallback
    return min(modelled, key=lambda c: triton_backward_ms(pattern, s, c, lists_device, profile))


def pick_backward_tiles(pattern: Pattern, s: Shapes, dtype: torch.dtype, options: dict, lists_device: torch.device,
                        profile) -> BackwardTiles:
    """The tiles attncc's Triton backward runs at on a CUDA GPU of `profile`: the cost model's pick
    where backward_modelled, else choose_backward_tiles' (block masks built on `lists_device`)."""
    cuda = torch.device("cuda")
    table = choose_backward_tiles(s, dtype, cuda, options)
    if not backward_modelled(s, dtype, cuda, options):
        return table
    return model_backward_tiles(pattern, s, lists_device, profile, table)


AUTOTUNE_TOP = 3  # kernel_options autotune=True times this many of the simulator's best


def cost_choice(pattern: Pattern, s: Shapes, dtype: torch.dtype, device: torch.device, options: dict,
                backend: str, profile, lists_device: torch.device | None = None, cudnn: bool = False,
                layout=None, fa4_runs=None) -> tuple[str, TileConfig] | None:
    """The (backend, forward tiles) of least predicted time (compiler/cost.simulate on `profile`),
    or None where the rules' `backend` (_pick_backend's) stands; see ranked_candidates."""
    ranked = ranked_candidates(pattern, s, dtype, device, options, backend, profile, lists_device, cudnn,
                               layout, fa4_runs)
    return ranked[0] if ranked else None


def predicted_forward_ms(pattern: Pattern, s: Shapes, tiles: TileConfig, lists_device: torch.device, backend: str,
                         profile, layout) -> float | None:
    """A chosen forward's predicted ms: the simulator's (None where `profile` lacks `backend` at
    this head dim), plus fa4's permuted copies where it runs a token layout (layout_copies_ms; fa4
    runs 16-bit tensors only)."""
    from .kernel import META_CACHE

    ms = META_CACHE.predicted_ms(pattern, s, tiles, lists_device, backend, profile)
    if ms is not None and backend == "fa4" and layout is not None:
        ms += layout_copies_ms(s, profile)
    return ms


def layout_copies_ms(s: Shapes, profile) -> float:
    """What fa4, which cannot gather a token layout's rows in place, pays a forward for the layout
    at `profile`'s bandwidth: q, k and v copied into the layout's order and the output back, each
    read and written once (s: the call's shapes; 16-bit elements, all fa4 runs)."""
    elements = s.B * (s.Hq * s.Q * (s.D + s.Dv) + s.Hkv * s.KV * (s.D + s.Dv))
    return 2.0 * elements * 2 / (profile.hbm_tbps * 1e12) * 1e3


def modelled_ms(pattern: Pattern, s: Shapes, backend: str, tiles: TileConfig, dtype: torch.dtype, profile,
                lists_device: torch.device, layout=None) -> float | None:
    """The forward's predicted ms of `backend` at `tiles` (predicted_forward_ms, block maps built on
    `lists_device`), or None outside what `profile` models: outside `profiled`, a backend it lacks
    there."""
    if not profiled(s, dtype):
        return None
    return predicted_forward_ms(pattern, s, tiles, lists_device, backend, profile, layout)


def profiled(s: Shapes, dtype: torch.dtype) -> bool:
    """Whether profiles price calls of these shapes and dtype: fp16/bf16, D and Dv of one head dim
    class (cost.HEAD_DIM_CLASSES)."""
    from ..compiler.cost import head_dim_class

    return dtype in (torch.float16, torch.bfloat16) and head_dim_class(s.D) == head_dim_class(s.Dv)


def ranked_candidates(pattern: Pattern, s: Shapes, dtype: torch.dtype, device: torch.device, options: dict,
                      backend: str, profile, lists_device: torch.device | None = None, cudnn: bool = False,
                      layout=None, fa4_runs=None) -> list[tuple[str, TileConfig]]:
    """The configurations the cost model chooses among, fastest predicted first
    (predicted_forward_ms, floored by a call's host time: Profile.ranking): TRITON_CANDIDATES, with
    the tile fields kernel_options set; fa4's where the rules picked fa4 (`backend`), or,
    with the backend automatic, on a pattern with the token `layout` (priced with its permuted
    copies; `fa4_runs()` says whether fa4 can run the call, asked only where fa4 ranks among the
    first AUTOTUNE_TOP: it may import FlashAttention-4, a second of a first call); and
    SDPA's cuDNN where `cudnn` (sdpa_refusal found nothing against it) and the backend is automatic
    (its tiles: the table's, which the Triton kernels run for the calls cuDNN cannot take, such as
    one asking for the LSE). A backend enters where the profile has its figures. Empty where the
    model does not choose: a backend forced (but triton), or outside where the
    profile models the call (16-bit CUDA, D and Dv of one head dim class that the profile has
    Triton's figures for, and those of the backend the rules picked; the rules' backend and
    choose_tiles' table decide there). Block masks are built on `lists_device` (default: `device`)
    and cached."""
    from . import fa4
    from .kernel import META_CACHE

    auto = options.get("backend", "auto") == "auto"
    tiles_set = any(k in options for k in TILE_OPTIONS)  # Triton's tiles asked for: Triton only
    if (backend not in ("triton", "fa4", SDPA_CUDNN) or not (auto or options["backend"] == "triton")
            or (tiles_set and backend != "triton")
            or device.type != "cuda" or not profiled(s, dtype) or not profile.models("triton", s.D)
            or (backend != "triton" and not profile.models(backend, s.D))):
        return []
    # tile fields kernel_options set are kept, the simulator chooses the rest (check_options made
    # such a call's backend triton); candidates the options leave as they are first (ties: equal shapes)
    own = triton_candidates(s.D)
    kept = sorted(dict.fromkeys(_overridden(t, options) for t in own), key=lambda t: t not in own)
    candidates = [("triton", t) for t in kept]
    others = auto and not tiles_set  # fa4 on a layout's copies and cuDNN may enter
    on_copies = backend != "fa4" and layout is not None and fa4_runs is not None and others and profile.models(
        "fa4", s.D)
    if backend == "fa4" or on_copies:
        candidates.append(("fa4", fa4.TILE))
    if cudnn and others and profile.models(SDPA_CUDNN, s.D):
        candidates.append((SDPA_CUDNN, choose_tiles(s, dtype, device, options)))
    ranked = sorted(candidates, key=lambda c: profile.ranking(c[0], predicted_forward_ms(
        pattern, s, c[1], lists_device or device, c[0], profile, layout)))
    if on_copies and ("fa4", fa4.TILE) in ranked[:AUTOTUNE_TOP] and not fa4_runs():
        ranked.remove(("fa4", fa4.TILE))
    return ranked


# forward configurations the simulator compares (the fa4 one where fa4 can run), per head dim class
# (cost.HEAD_DIM_CLASSES), tile shapes distinct within a class (a profile keys rates by "BMxBN").
# 128: 64x32/4/2 (48 KiB of shared memory: several programs per SM) is for short sparse rows
# (natten2d 0.51 ms against 0.65 at 64x64/4/3 on the H200, 2026-12-02; full attention 6.6 against
# 4.9). 64: the table's 128x64/4/3 and four more shapes; 256 (read through TMA): the table's
# 64x64/4/2 and shapes whose shared memory fits (128x64 at 2 stages: 192 KiB; on the H100 it beat
# 64x64/4/2 by 1.23-1.35x on dense and band masks; 128x32/8/2 failed ptxas' register allocation
# even on full attention and left; benchmarks/results/2026-12-06-nvidia-h100-head-dims.md).
TRITON_CANDIDATES = {
    64: (TileConfig(128, 64, 4, 3), TileConfig(128, 128, 8, 3), TileConfig(64, 64, 4, 3), TileConfig(64, 128, 4, 3),
         TileConfig(64, 32, 4, 2)),
    128: (TileConfig(128, 64, 8, 3), TileConfig(64, 64, 4, 3), TileConfig(128, 128, 8, 2), TileConfig(64, 128, 4, 3),
          TileConfig(64, 32, 4, 2)),
    256: (TileConfig(64, 64, 4, 2), TileConfig(64, 32, 4, 2), TileConfig(128, 64, 8, 2), TileConfig(64, 128, 8, 1)),
}


def triton_candidates(D: int) -> tuple[TileConfig, ...]:
    """TRITON_CANDIDATES of head dim D's class (none above 256)."""
    from ..compiler.cost import head_dim_class

    return TRITON_CANDIDATES.get(head_dim_class(D), ())


def triton_backward_ms(pattern: Pattern, s: Shapes, tiles: BackwardTiles, lists_device: torch.device,
                       profile) -> float | None:
    """attncc's Triton backward at `tiles`, predicted ms (cost.simulate_backward; block masks built
    on `lists_device` and cached), or None where `profile` does not model it."""
    from ..compiler import cost
    from .kernel import META_CACHE

    if "backward" not in (profile.spec("triton", s.D) or {}):
        return None
    return cost.simulate_backward(META_CACHE.backward(pattern, s, tiles.dkdv, lists_device),
                                  META_CACHE.get(pattern, s, tiles.dq, lists_device)[1], s.B, s.Hq, s.Hkv, s.D,
                                  tiles, profile)


def fa4_own_backward_ms(calls, pattern: Pattern, s: Shapes, deterministic: bool, profile) -> float | None:
    """FA4's own dense / causal / local / varlen backward predicted ms (cost.simulate_fa4_backward)
    for its `calls` (fa4.own_backward_calls; None: it does not run), sliver bands on attncc's
    kernel where it runs them (a pattern without a score mod), or None where it does not run or
    `profile` does not model it."""
    from ..compiler import cost

    if calls is None or "backward" not in (profile.spec("fa4", s.D) or {}):
        return None
    return cost.simulate_fa4_backward(calls, s.B, s.Hq, s.Hkv, s.D, profile, deterministic,
                                      slivers=not pattern.has_score_mod)


def fa4_backward_model_refusal(pattern: Pattern, s: Shapes, lists_device: torch.device, tiles: BackwardTiles,
                               deterministic: bool, native: bool, profile) -> str | None:
    """Why attncc's Triton backward runs after FA4's forward where FA4's own backward could: the cost
    model predicts it faster. None (FA4's backward runs) where FA4's is predicted no slower, or where
    the profile models only one of them, or FA4 runs its block-sparse backward (not modelled)."""
    from . import fa4

    own = fa4_own_backward_ms(fa4.own_backward_calls(pattern, s, lists_device, native), pattern, s, deterministic,
                              profile)
    if own is None:
        return None
    mine = triton_backward_ms(pattern, s, tiles, lists_device, profile)
    if mine is None or mine >= own:
        return None
    return (f"attncc's Triton backward is predicted faster: {mine:.3f} ms against FA4's own {own:.3f} ms "
            f"(compiler/cost.py, {profile.key!r} profile)")


def choose_on_target(pattern: Pattern, s: Shapes, dtype: torch.dtype, target: str, options: dict,
                     layout=None) -> tuple[str, TileConfig]:
    """(backend, forward tiles) the automatic choice takes on the GPU `target` names (TARGETS),
    with FlashAttention-4 and cuDNN installed there; block masks are built on the CPU. `pattern`
    is in kernel order, `layout` its token layout (or None)."""
    from . import fa4

    capability = TARGETS[target][1]
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    backend = _pick_backend(
        options.get("backend", "auto"), True,
        lambda: fa4.refusal_on(pattern, s, capability, dtype, cpu, assume_installed=True),
        lambda: fa4_measured_faster(layout),
        lambda: sdpa_refusal(pattern, s, "cuda", dtype, False, assume_installed=True), f" on the {TARGETS[target][0]}")
    from ..compiler.cost import load_profile

    profile = load_profile(target)
    cudnn = sdpa_refusal(pattern, s, "cuda", dtype, False, assume_installed=True) is None
    picked = cost_choice(pattern, s, dtype, cuda, options, backend, profile, cpu, cudnn, layout,
                         lambda: fa4.refusal_on(pattern, s, capability, dtype, cpu, assume_installed=True) is None)
    if picked is not None:
        return picked
    return backend, fa4.TILE if backend == "fa4" else choose_tiles(s, dtype, cuda, options)


def choose_tma(s: Shapes, device: torch.device, options: dict) -> bool:
    """Whether K/V tiles are read through tensor descriptors (options["tma"] overrides).

    On the H100 (benchmarks/forward_sweep.py, 2026-11-22, bf16, N=8192): D=128 pointer loads were
    2-5% faster on every pattern; D=256 descriptors were 10-15% faster (causal 394 vs 343,
    document 304 vs 275 TFLOP/s). So: on CUDA for head dims above 128.
    """
    if "tma" in options:
        return options["tma"]
    return device.type == "cuda" and max(s.D, s.Dv) > 128


def check_options(options) -> dict:
    """kernel_options as a dict; unknown keys or backends are a ValueError naming them."""
    options = dict(options or {})
    calls = sorted(set(options) & set(CALL_OPTIONS))
    if calls:
        raise ValueError(f"kernel_options {calls} are options of ac.attention calls, not of a compiled kernel")
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"kernel_options has unknown key(s) {unknown}; known: {list(_OPTIONS)}")
    for flag in ("tma", "deterministic", "autotune", "fa4_native", "fold"):
        if not isinstance(options.get(flag, True), bool):
            raise ValueError(f"kernel_options[{flag!r}] must be a bool, got {options[flag]!r}")
    if options.get("backend", "auto") not in ("auto",) + BACKENDS:
        raise ValueError(f"kernel_options['backend'] must be one of {('auto',) + BACKENDS}, "
                         f"got {options['backend']!r}")
    tile_fields = [k for k in TILE_OPTIONS if k in options]
    if tile_fields and options.get("backend") == "fa4":
        raise ValueError(f"kernel_options {tile_fields} set the tiles of attncc's Triton kernels; the fa4 backend "
                         "runs FlashAttention-4's own (128x128)")
    if tile_fields and options.get("backend", "auto") == "auto":
        options["backend"] = "triton"  # Triton's tiles were asked for: they must not be dropped for another backend
    return options


def choose_backend(pattern: Pattern, s: Shapes, q: torch.Tensor, options: dict, return_lse: bool,
                   layout=None) -> str:
    """The backend for this call (`pattern` in kernel order, `layout` its token layout or None);
    kernel_options["backend"] forces one (a ValueError saying why when it cannot run the call).

    auto: on CUDA, "fa4" where it can run (runtime/fa4.refusal: SM90, 16-bit, head dims up to
    128, FlashAttention-4 installed, every operator lowerable to CuTe) and measured faster
    (`fa4_measured_faster`), else "sdpa-cudnn" for plain full or equal-length causal attention,
    else "triton", which runs everything (the CPU interpreter, float32, any head dim, any
    operator). Where the GPU's profile prices them, ranked_candidates then chooses among this
    backend, the Triton tiles and cuDNN by predicted time. Buffer gradients come from the same
    backend-independent pass (runtime/buffer_grads.py) on every backend.
    """
    from . import fa4

    return _pick_backend(options.get("backend", "auto"), q.is_cuda, lambda: fa4.refusal(pattern, s, q),
                         lambda: fa4_measured_faster(layout),
                         lambda: sdpa_refusal(pattern, s, q.device.type, q.dtype, return_lse))


def _pick_backend(forced: str, cuda: bool, fa4_refusal, fa4_faster, cudnn_refusal, where: str = "") -> str:
    """choose_backend's rule over its facts, asked only when needed: fa4_refusal() / cudnn_refusal()
    say why a backend cannot run (None: it can), fa4_faster() whether fa4 measured faster; `where`
    ends the error of a forced backend that cannot run ("" or " on the NVIDIA H200")."""
    if forced == "triton":
        return "triton"
    if forced == "sdpa-cudnn":
        why = cudnn_refusal()
        if why:
            raise ValueError(f"kernel_options backend='sdpa-cudnn' cannot run this call{where}: {why}")
        return "sdpa-cudnn"
    if forced == "fa4" or (cuda and fa4_faster()):  # the cheap fact first: the refusal lowers the hooks
        why = fa4_refusal()
        if forced == "fa4" and why:
            raise ValueError(f"kernel_options backend='fa4' cannot run this call{where}: {why}")
        if not why:
            return "fa4"
    return "sdpa-cudnn" if cudnn_refusal() is None else "triton"


def fa4_measured_faster(layout) -> bool:
    """Whether the fa4 backend beat attncc's Triton kernels for this kind of call: everywhere it
    runs except patterns with a token layout (which attncc's Triton kernels gather in place, while
    FA4 needs permuted copies). The rule where the profile cannot say (ranked_candidates prices
    fa4's copies where it can). Forward ms, H200, 2026-12-01 (`benchmarks/costmodel.py`, B4 H16
    N8192 D128 bf16, every candidate in one process; benchmarks/results/2026-12-01-nvidia-h200-
    costmodel.md), fa4 against the best Triton tiles: full 3.29 vs 4.43, causal 1.71 vs 2.32,
    swa1024 0.54 vs 0.72, document 0.70 vs 0.87, softcap 2.17 vs 2.80 (tanh: since the hooks divide
    by a reciprocal), dilated without a layout 1.60 vs 1.74; with one, Triton: dilated 0.73 and
    natten2d 0.91 against fa4's 1.60 and 2.65 (measured with the copies' host syncs, since removed).
    """
    return layout is None


def sdpa_refusal(pattern: Pattern, s: Shapes, device_type: str, dtype: torch.dtype, return_lse: bool,
                 assume_installed: bool = False) -> str | None:
    """Why SDPA's cuDNN backend cannot run this call: it takes plain full or equal-length causal
    attention on CUDA (no score mod, params or buffers), 16-bit (GQA included), D <= 256 and a
    multiple of 8, no LSE wanted, cuDNN present (unless assume_installed: `attncc show --target`)."""
    plain = (not pattern.has_score_mod and not pattern.has_block_mask and not pattern.params
             and not pattern.buffers)
    causal = pattern.mask is _CAUSAL and s.Q == s.KV
    if not (plain and (pattern.mask is TRUE or causal)):
        return "it runs plain full or equal-length causal attention only"
    if device_type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return "it needs 16-bit CUDA tensors"
    if not (s.D == s.Dv and s.D % 8 == 0 and s.D <= 256):
        return "it needs equal head dims, a multiple of 8, up to 256"
    if return_lse:
        return "it does not return the LSE"
    if not assume_installed and not torch.backends.cudnn.is_available():
        return "cuDNN is not available"
    return None


DECODE_MAX_Q = 64  # the decode kernel packs Hq / Hkv * Q_LEN rows into its tiles
DECODE_MIN_KEYS = 4096  # a dense call's keys from which the decode kernel runs it


def choose_decode(pattern: Pattern, Q: int, KV: int | None, options: dict, grad: bool) -> bool:
    """Whether the split-KV decode kernel (runtime/decode.py) runs this call; options["decode"]
    True forces it (a ValueError where it cannot run), False forbids it (then a paged call takes
    the gathering path: the dense kernels over a copy of the used pages). Verified on the H200
    (tests/test_decode_gpu.py, bf16 at serving sizes) and measured there
    (benchmarks/results/2026-12-01-nvidia-h200-decode.md).

    KV: the dense call's keys, None for a paged call (or a packed one, which reads its k, v as
    pages). Never when gradients are required (decode is inference: the call takes the dense
    kernels, paged caches gathered first), when kernel_options force a backend other than
    "triton", or for more than DECODE_MAX_Q queries (a pattern's token layout is not used:
    the kernel reads the keys in natural order). Otherwise always for paged
    and packed calls (it reads the pages in place; the other paths copy them, or run a packed
    call as one block-diagonal mask) and for dense calls with at least DECODE_MIN_KEYS keys and 16
    per query. Not measured yet: the dense threshold is a guess at
    where a query tile of the forward leaves the GPU idle.
    """
    forced = options.get("decode")
    if forced not in (None, True, False):
        raise ValueError(f"kernel_options['decode'] must be a bool, got {forced!r}")
    why = None
    if Q > DECODE_MAX_Q:
        why = f"Q_LEN = {Q} is more than {DECODE_MAX_Q} queries"
    elif options.get("backend", "auto") not in ("auto", "triton"):
        why = f"kernel_options force the {options['backend']} backend"
    if forced and why:
        raise ValueError(f"kernel_options decode=True cannot run this call: {why}")
    if forced is False or why or grad:
        return False
    return bool(forced or decode_shaped(Q, KV))


def decode_shaped(Q: int, KV: int | None) -> bool:
    """Whether choose_decode takes a call of Q queries over KV keys (None: paged or packed) unless
    options or gradients say otherwise: at most DECODE_MAX_Q queries and, dense, at least
    DECODE_MIN_KEYS keys and 16 per query. A test of shapes alone, cheap enough for every call."""
    return Q <= DECODE_MAX_Q and (KV is None or (KV >= DECODE_MIN_KEYS and KV >= 16 * Q))


def choose_decode_tiles(rows: int, head_dim: int, device: torch.device, options: dict) -> TileConfig:
    """The decode kernel's tiles (BLOCK_M packed query rows, BLOCK_N keys; options override any field).

    BLOCK_M: the rows of a kv head (Hq / Hkv * Q_LEN) rounded up to a power of two, 16 to 64 (more
    rows take several row blocks). CPU: BLOCK_N 32, so test shapes span several tiles and pages
    of 16 and 64 keys are read both ways (two pages per tile, two tiles per page). CUDA: BLOCK_N
    128 for 32 rows or more, else 64 (32 above D = 128), 4 warps, 3 stages (2 above D = 128);
    decode_tiles_for_splits halves 128 where the splits turn out short.
    Measured on the H200 (benchmarks/decode_sweep.py, Hq 32 / Hkv 8, D 128, bf16, paged, pages of
    64; benchmarks/results/2026-12-01-nvidia-h200-decode-sweep.md) against 32/64/128 keys, 4/8
    warps, 2-4 stages: at Q_LEN 8 (32 rows) BLOCK_N 128 led (B64 8K keys 4.15 TB/s against 3.54
    at 64; B1 128K 3.72 against 3.27); at Q_LEN 1 (4 rows) 64 and 128 tied (4.46 / 4.41) and 8
    warps lost everywhere. D > 128 is not measured.
    """
    block_m = min(64, max(16, 1 << (rows - 1).bit_length()))
    wide = head_dim > 128
    base = (TileConfig(block_m, 32, 4, 1) if device.type != "cuda"
            else TileConfig(block_m, 32 if wide else 128 if block_m >= 32 else 64, 4, 2 if wide else 3))
    return _overridden(base, options)


DECODE_SHORT_SPLIT_KEYS = 1024  # a split's keys up to which 64-key tiles beat 128 (decode_tiles_for_splits)


def decode_tiles_for_splits(tiles: TileConfig, split_keys: float, options: dict, shrunk: bool = False) -> TileConfig:
    """choose_decode_tiles' `tiles` once the splits are known: 128-key tiles become 64 where each
    split reads at most DECODE_SHORT_SPLIT_KEYS keys (`split_keys`: the most live keys of a
    (sequence, kv head) over the splits), unless options set BLOCK_N; `shrunk` (the lists were of
    64-key tiles, which count fewer dead keys and may take fewer splits): up to twice as many, so
    a decode loop does not switch back and forth at the edge. Measured on an H100
    (2026-12-07, .probe/tiles.py: paged, Hq 32 / Hkv 8, D 128, Q_LEN 8, bf16, CUDA graphs, TB/s
    128 -> 64): causal B1 8K (S 32) 1.40 -> 1.64, B4 8K (S 8) 2.07 -> 2.22, sinks + 1K window B1
    (S 8) 0.28 -> 0.34; equal where splits are long (B16 8K, S 2: 2.78 / 2.80; B1 128K, S 32:
    2.84 / 2.85; B64, one split), where the H200 preferred 128 (2026-12-01 sweep: B64 8K 4.15
    against 3.54; B1 128K 3.72 against 3.27)."""
    if tiles.BLOCK_N != 128 or "BLOCK_N" in options or split_keys > DECODE_SHORT_SPLIT_KEYS * (2 if shrunk else 1):
        return tiles
    return TileConfig(tiles.BLOCK_M, 64, tiles.num_warps, tiles.num_stages)
