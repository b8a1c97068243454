"""The cost simulator: a kernel configuration's forward time predicted from its block map and a
hardware profile (compiler/profiles/*.json), and `explain`, the report built on it.

Model (forward):
- A program is one query tile of one (b, h): its work is its FULL and PARTIAL kv tiles. A tile
  costs its FLOPs (4 * BLOCK_M * BLOCK_N * D) at the backend's per-SM rate for that tile shape,
  times (1 + score_op * the score mod's operators) for a FULL tile and (partial_factor + mask_op *
  the mask's operators + score_op * the score mod's) for a PARTIAL one (`expression_ops`: the
  per-element code the kernel runs beside its two matrix products); a program adds a fixed
  prologue/epilogue (Q in, O and LSE out).
- Programs are issued in the kernel's launch order (per (b, h), its query tiles heaviest first,
  as the Triton forward orders them) to the earliest free of SMs x programs-per-SM slots, a slot
  running at its SM's rate divided by the programs sharing it. The prediction is the makespan.
- The roofline is the larger of the live pairs' FLOPs at the profile's peak matrix rate and the
  bytes of q, k, v and o at its HBM bandwidth.
- A call also costs its host time (`call_us` per backend: Python, allocations and launches,
  measured back to back on a tiny call): calls come no faster than that however small their
  kernels, so backends are ranked by the larger of the two (Profile.ranking), the kernel's time
  breaking ties. The prediction itself is the kernel's.

SDPA's cuDNN kernel (plain full and causal attention only) is priced by the same model at the
tiles attncc keeps for the calls it cannot take (a query tile of 128 rows a program, as cuDNN's
own), its rate measured on full attention and its PARTIAL factor and prologue fitted to causal.

Backward: attncc's Triton backward (`simulate_backward`) and FA4's own dense / causal / local /
varlen backward (`simulate_fa4_backward`, by band geometry: compiler/bands.py).

Each profile says where its numbers come from (h200: measured and fitted; h100, generic: estimates).
A profile's figures hold for a class of head dims (HEAD_DIM_CLASSES: up to 64, 128, 256; its base
class and the `head_dims` it adds). The runtime picks backend and tiles by this simulator where
the profile models the call's class (runtime/choices.ranked_candidates: 16-bit CUDA); elsewhere
by its table, and `explain` then says where the simulator disagrees.
"""
from __future__ import annotations

import heapq
import json
import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import torch

from ..dsl import ir
from ..dsl.pattern import Pattern
from .bands import Band, is_sliver
from .codegen import TileConfig
from .evaluate import evaluate, token_mask

PROFILES = Path(__file__).parent / "profiles"
_EXACT_PAIRS = 1 << 24  # PARTIAL-tile pairs counted exactly; beyond, a uniform sample of tiles
_BYTES = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}


HEAD_DIM_CLASSES = (64, 128, 256)  # head dims 16..64 share the figures of 64, 65..128 of 128, 129..256 of 256


def head_dim_class(D: int) -> int | None:
    """The HEAD_DIM_CLASSES entry whose figures apply to head dim D (the smallest >= D), None above 256."""
    return next((c for c in HEAD_DIM_CLASSES if D <= c), None)


@dataclass(frozen=True)
class Profile:
    """A GPU's figures (see compiler/profiles/*.json); `backends[name]` holds per-tile-shape
    `tflops` and `programs_per_sm` (keyed "BMxBN", with a "default"), `partial_factor` and
    `program_us`, measured at head dims of class `head_dim` (HEAD_DIM_CLASSES), and optionally
    `head_dims` {"64": {...}, "256": {...}}: the whole spec measured at another class (nothing
    falls back to the base class's figures: a backend without an entry for a class is not modelled
    there, nor is its backward without a "backward" entry; `spec`);
    `link_tbps` a GPU-to-GPU link's usable one-way bandwidth (context parallelism; absent from a
    profile: 0.025, a PCIe-class guess); `call_us` {backend: host microseconds of one call}
    (absent: 0, no floor); `capability` the compute capability it was measured on ((): any)."""
    key: str
    name: str
    sms: int
    peak_matrix_tflops: dict
    hbm_tbps: float
    backends: dict
    provenance: str
    match: tuple = ()
    link_tbps: float = 0.025
    head_dim: int = 128
    call_us: dict = field(default_factory=dict)
    capability: tuple = ()

    def spec(self, backend: str, D: int | None = None) -> dict | None:
        """`backend`'s figures at head dim D (None: the base class), or None where the profile does
        not model it there."""
        base = self.backends.get(backend)
        cls = self.head_dim if D is None else head_dim_class(D)
        if base is None or cls is None:
            return None
        if cls == self.head_dim:
            return base if "tflops" in base else None  # (a backend may have figures at other classes only)
        return base.get("head_dims", {}).get(str(cls))  # complete by itself: nothing from the base class

    def models(self, backend: str, D: int | None = None) -> bool:
        """Whether the profile has `backend`'s figures at head dim D."""
        return self.spec(backend, D) is not None

    def at_head_dim(self, D: int) -> "Profile":
        """This profile with the figures of D's class as its base (the backends modelled there)."""
        backends = {b: {k: v for k, v in self.spec(b, D).items() if k != "head_dims"}
                    for b in self.backends if self.models(b, D)}
        return replace(self, backends=backends, head_dim=head_dim_class(D))

    def with_spec(self, backend: str, D: int, spec: dict) -> "Profile":
        """This profile with `backend`'s figures at D's class replaced by `spec` (its base figures
        where D's class is the base class, else its `head_dims` entry)."""
        cls, old = head_dim_class(D), self.backends.get(backend, {})
        if cls == self.head_dim:
            new = {**spec, **({"head_dims": old["head_dims"]} if "head_dims" in old else {})}
        else:
            new = {**old, "head_dims": {**old.get("head_dims", {}), str(cls): spec}}
        return replace(self, backends={**self.backends, backend: new})

    def call_ms(self, backend: str) -> float:
        """The host time of one call of `backend` in ms (`call_us`; 0 where the profile lacks it)."""
        return self.call_us.get(backend, 0.0) * 1e-3

    def ranking(self, backend: str, ms: float) -> tuple[float, float]:
        """The key candidates are ranked by: the larger of the kernel's predicted `ms` and a call's
        host time (call_ms), then the kernel's ms (H100, B2 H4 N1024 D128 causal: cuDNN's call 0.037
        ms against the Triton kernels' 0.2, kernels predicted at 0.020 and 0.012 ms)."""
        return max(ms, self.call_ms(backend)), ms

    def figures(self, backend: str, D: int) -> str:
        """`backend`'s figures at head dim D (spec) as text, to key cached predictions by: a profile
        altered under its name (with_spec, as refits and tests make) is priced afresh. Kept on this
        (immutable) profile after the first call."""
        memo = self.__dict__.setdefault("_figures", {})
        cls = head_dim_class(D)
        if (backend, cls) not in memo:
            memo[backend, cls] = json.dumps(self.spec(backend, D), sort_keys=True)
        return memo[backend, cls]

    def rate(self, backend: str, tiles: TileConfig, D: int | None = None) -> float:
        """TFLOP/s one SM's worth of programs of this tile shape reach, divided by the SM count."""
        table = self.spec(backend, D)["tflops"]
        return float(table.get(shape_key(tiles), table.get("default", min(table.values()))))

    def programs_per_sm(self, backend: str, tiles: TileConfig, D: int | None = None) -> int:
        table = self.spec(backend, D).get("programs_per_sm", {})
        return int(table.get(shape_key(tiles), table.get("default", 1)))


def shape_key(tiles: TileConfig) -> str:
    """A tile shape's key in a profile's per-shape tables: "BLOCK_MxBLOCK_N"."""
    return f"{tiles.BLOCK_M}x{tiles.BLOCK_N}"


_FIELDS = ("name", "sms", "peak_matrix_tflops", "hbm_tbps", "backends", "provenance")


@lru_cache(maxsize=None)
def load_profile(key: str, directory: Path | None = None) -> Profile:
    """A profile by name from `directory` (default: the shipped ones, "h200", "h100", "generic");
    a ValueError names the known ones or what a malformed file lacks."""
    directory = directory or PROFILES
    path = directory / f"{key}.json"
    if not path.is_file():
        known = sorted(p.stem for p in directory.glob("*.json"))
        raise ValueError(f"no hardware profile {key!r}; known: {known}")
    return read_profile(path)


def read_profile(path: Path) -> Profile:
    """The profile in the JSON file `path`, read now (load_profile caches by name); a ValueError
    says what a malformed file lacks."""
    key = path.stem
    data = json.loads(path.read_text())
    missing = [f for f in _FIELDS if f not in data]
    if missing:
        raise ValueError(f"hardware profile {path} lacks {missing}")
    head_dim = int(data.get("head_dim", Profile.head_dim))
    if head_dim not in HEAD_DIM_CLASSES:
        raise ValueError(f"hardware profile {path}: head_dim must be one of {HEAD_DIM_CLASSES}, got {head_dim}")
    for backend, spec in data["backends"].items():
        own = [(head_dim, spec)] if "tflops" in spec or not spec.get("head_dims") else []
        for cls, fields in own + list(spec.get("head_dims", {}).items()):
            if str(cls) not in map(str, HEAD_DIM_CLASSES):
                raise ValueError(f"hardware profile {path}: backend {backend!r} head_dims keys must be among "
                                 f"{HEAD_DIM_CLASSES}, got {cls!r}")
            rates = fields.get("tflops")
            if not rates or not all(v > 0 for v in rates.values()):
                raise ValueError(f"hardware profile {path}: backend {backend!r} needs positive tflops per tile shape"
                                 f" (head dim class {cls})")
    call_us = data.get("call_us", {})
    if not isinstance(call_us, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in call_us.values()):
        raise ValueError(f"hardware profile {path}: call_us must map backends to non-negative microseconds, "
                         f"got {call_us!r}")
    return Profile(key, data["name"], int(data["sms"]), data["peak_matrix_tflops"], float(data["hbm_tbps"]),
                   data["backends"], data["provenance"], tuple(data.get("match", ())),
                   float(data.get("link_tbps", Profile.link_tbps)), head_dim,
                   {b: float(v) for b, v in call_us.items()}, tuple(data.get("capability", ())))


def profile_for(device: torch.device | None = None, target: str | None = None,
                user_dir: Path | None = None) -> Profile:
    """The shipped profile `target` names; else the one matching the CUDA device's name and compute
    capability (where the profile gives one), looked for first in `user_dir` (where `attncc
    calibrate` writes), then among the shipped ones; else "generic"."""
    if target is not None:
        return load_profile(target)
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        name, capability = torch.cuda.get_device_name(device), tuple(torch.cuda.get_device_capability(device))
        for directory in ([user_dir] if user_dir is not None and user_dir.is_dir() else []) + [PROFILES]:
            for path in sorted(directory.glob("*.json")):
                prof = load_profile(path.stem, directory)
                if any(m in name for m in prof.match) and prof.capability in ((), capability):
                    return prof
    return load_profile("generic")


# an operator's per-element cost relative to an add or compare: integer division and modulo are
# instruction sequences (by a power of two in the Triton kernels: one shift or mask, weight 1),
# transcendentals run on the special-function units, a buffer element is a gather from memory
OP_WEIGHTS = {"floordiv": 4.0, "mod": 4.0, "truediv": 2.0, "pow": 4.0, "exp": 2.0, "log": 2.0,
              "sqrt": 2.0, "tanh": 2.0, "sigmoid": 3.0}
LOAD_WEIGHT = 2.0
TILE_INVARIANT = frozenset({"b", "h"})  # FA4 calls its hooks for one (b, h) at a time


@dataclass(frozen=True)
class ExpressionOps:
    """Weighted operator counts (OP_WEIGHTS, else 1; LOAD_WEIGHT a buffer read) of the distinct
    nodes of a kernel's token mask, which PARTIAL tiles evaluate, and of its score mod, which every
    live tile does: those FA4's hooks compute per element (`mask`, `score`: every node that reads q,
    kv or the score; a value of b and h alone, alibi's `slope[h]`, is the same for all of a tile's
    elements and computed once), and the pairwise ones (reading the score, or both q and kv) —
    Triton evaluates the others once per row or column of a tile (broadcast)."""
    mask: float = 0.0
    mask_pairwise: float = 0.0
    score: float = 0.0
    score_pairwise: float = 0.0


def expression_ops(pattern: Pattern) -> ExpressionOps:
    """The ExpressionOps of `pattern` in kernel order (a token layout's index arithmetic included)."""
    def count(root: ir.Node) -> tuple[float, float]:
        total = pairwise = 0.0
        for node in ir.walk(root):
            if isinstance(node, (ir.Op, ir.Load)):
                weight = LOAD_WEIGHT if isinstance(node, ir.Load) else OP_WEIGHTS.get(node.op, 1.0)
                reads = ir.free_vars(node)
                if not reads <= TILE_INVARIANT:
                    total += weight  # FA4's hooks (compiler/cute.py) divide even by powers of two
                if ir.SCORE_VAR in reads or {"q", "kv"} <= reads:
                    shift = ir.kind_of(node) == "int" and ir.power_of_two_divisor(node) is not None
                    pairwise += 1.0 if shift else weight  # the Triton kernels shift (lowering.floor_op)
        return total, pairwise
    return ExpressionOps(*count(token_mask(pattern)), *count(pattern.score))


def partial_factor(spec: dict, tiles: TileConfig | None = None) -> float:
    """A backend spec's PARTIAL factor: one number, or per tile shape ("BMxBN" keys and a
    "default"; `tiles` None or unlisted: the default)."""
    factor = spec["partial_factor"]
    if isinstance(factor, dict):
        return float(factor.get(shape_key(tiles), factor["default"]) if tiles is not None else factor["default"])
    return float(factor)


def tile_costs(spec: dict, ops: ExpressionOps, backend: str, tiles: TileConfig | None = None,
               factor: float | None = None) -> tuple[float, float]:
    """(FULL, PARTIAL) tile cost in units of a FULL tile of full attention, for `backend`'s `spec`
    (its PARTIAL factor at `tiles`, or `factor` where given; mask_op and score_op: the cost of one
    weighted operator per element) and a kernel's `ops`."""
    mask, score = (ops.mask, ops.score) if backend == "fa4" else (ops.mask_pairwise, ops.score_pairwise)
    extra = spec.get("score_op", 0.0) * score
    factor = partial_factor(spec, tiles) if factor is None else factor
    return 1.0 + extra, factor + spec.get("mask_op", 0.0) * mask + extra


@dataclass(frozen=True)
class Prediction:
    """ms: the predicted makespan; work: float64 [B, H, QB], each program's predicted ms (by
    query tile, not launch order); slots: the SMs x programs-per-SM they were scheduled onto."""
    ms: float
    work: torch.Tensor
    slots: int


SDPA_CUDNN = "sdpa-cudnn"  # SDPA's cuDNN kernel: plain full or equal-length causal attention


def simulate(meta, B: int, H: int, D: int, tiles: TileConfig, backend: str, profile: Profile) -> Prediction:
    """The forward's predicted time for KernelMeta `meta` (runtime/kernel.py) at tiles `tiles`."""
    spec = profile.spec(backend, D)
    full = meta.full_num.expand(B, H, -1).double()
    partial = meta.partial_num.expand(B, H, -1).double()
    order = meta.order.expand(B, H, -1).long()
    occupancy = profile.programs_per_sm(backend, tiles, D)
    slots = profile.sms * occupancy
    slot_tflops = profile.rate(backend, tiles, D) / slots  # each slot's share of the GPU's rate
    tile_ms = 4.0 * tiles.BLOCK_M * tiles.BLOCK_N * D / (slot_tflops * 1e12) * 1e3
    full_cost, partial_cost = tile_costs(spec, meta.expression_ops, backend, tiles)
    work = (full_cost * full + partial_cost * partial) * tile_ms + spec["program_us"] * 1e-3 * occupancy
    launched = work.gather(-1, order).flatten()  # launch order: per (b, h), heaviest query tiles first
    return Prediction(_makespan(launched.tolist(), slots), work, slots)


def backward_field(spec: dict, field: str, kernel: str, tiles: TileConfig) -> float:
    """A field ("tflops", "partial_factor" or "program_us") of the Triton backward's spec for `kernel`
    ("dkdv" or "dq") at `tiles`: one number, or per kernel and tile shape ("dkdv 64x128" keys and a
    "default")."""
    value = spec[field]
    if isinstance(value, dict):
        return float(value.get(f"{kernel} {shape_key(tiles)}", value["default"]))
    return float(value)


def simulate_backward(dkdv_meta, dq_meta, B: int, H: int, Hkv: int, D: int, tiles, profile: Profile) -> float:
    """The Triton backward's predicted ms: the dK/dV kernel (a program per kv tile of each (b, kv
    head), over the query tiles of its transposed lists for every query head of the group, 4 dots
    per tile) then the dQ kernel (a program per query tile, heavy-first, 3 dots per tile), each a
    makespan at the profile's `backward` rate, PARTIAL factor and prologue for that kernel and tile
    shape (backward_field; runtime/kernel.py: BackwardMeta, KernelMeta; tiles:
    BackwardTiles)."""
    spec = profile.spec("triton", D)["backward"]
    slots = profile.sms
    group = H // Hkv

    def tile_costs_ms(kernel, t, dots):  # (FULL, PARTIAL) tile ms of `kernel` at tiles t
        rate = backward_field(spec, "tflops", kernel, t)
        tile_ms = 2.0 * dots * t.BLOCK_M * t.BLOCK_N * D / (rate / slots * 1e12) * 1e3
        full_cost, partial_cost = tile_costs(spec, dq_meta.expression_ops, "triton",
                                             factor=backward_field(spec, "partial_factor", kernel, t))
        return full_cost * tile_ms, partial_cost * tile_ms

    full_ms, partial_ms = tile_costs_ms("dkdv", tiles.dkdv, 4)
    full = dkdv_meta.full_num.expand(B, H, -1).double().view(B, Hkv, group, -1).sum(2)
    partial = dkdv_meta.partial_num.expand(B, H, -1).double().view(B, Hkv, group, -1).sum(2)
    dkdv = full_ms * full + partial_ms * partial + backward_field(spec, "program_us", "dkdv", tiles.dkdv) * 1e-3
    full_ms, partial_ms = tile_costs_ms("dq", tiles.dq, 3)
    full, partial = dq_meta.full_num.expand(B, H, -1).double(), dq_meta.partial_num.expand(B, H, -1).double()
    dq = full_ms * full + partial_ms * partial + backward_field(spec, "program_us", "dq", tiles.dq) * 1e-3
    dq = dq.gather(-1, dq_meta.order.expand(B, H, -1).long())
    return _makespan(dkdv.flatten().tolist(), slots) + _makespan(dq.flatten().tolist(), slots)


FA4_BACKWARD_TILE = (64, 128)  # FA4's SM90 backward tile: query rows x key columns (head dim 128)


def fa4_tiles_per_program(band: Band) -> list[int]:
    """For each 128-column kv tile of `band` (FA4's backward runs one program per kv tile and query
    head), how many 64-row q tiles it walks: those holding a row the band pairs with the tile,
    counted on the band's own grid (FA4 sees the slices q[q0:q1], kv[k0:k1])."""
    m, n = FA4_BACKWARD_TILE
    lo = -math.inf if band.lo is None else band.lo
    hi = math.inf if band.hi is None else band.hi
    counts = []
    for c0 in range(band.k0, band.k1, n):
        c1 = min(c0 + n, band.k1)
        first, last = max(band.q0, c0 - hi), min(band.q1 - 1, c1 - 1 - lo)  # rows with some lo <= kv - q <= hi
        counts.append(0 if first > last else int((last - band.q0) // m - (first - band.q0) // m + 1))
    return counts


def simulate_fa4_backward(calls: list[tuple[Band, ...]], B: int, Hq: int, Hkv: int, D: int, profile: Profile,
                          deterministic: bool = True, slivers: bool = False) -> float:
    """FA4's own backward, predicted ms: `calls` in order, each one FA4 call over its bands (one
    band, or a varlen call's segments). A call runs a program per kv tile of each band and query
    head, walking its q tiles (fa4_tiles_per_program), 5 dots per 64x128 tile at the profile's fa4
    `backward` rate, list-scheduled one per SM; plus its passes over memory (out, dout, the float32
    dQ accumulator and dq per row; k, v, dk, dv per column); times the `deterministic_factor`
    (FA4's ordered dQ accumulation). With `slivers`, a one-band call of a sliver band
    (bands.is_sliver) is attncc's sliver kernel instead: one pass over q, out, dout and dq of its
    rows at the bandwidth. Token ranges several calls cover add one more pass (the sum)."""
    spec = profile.spec("fa4", D)["backward"]
    m, n = FA4_BACKWARD_TILE
    tile_ms = 2.0 * 5 * m * n * D / (spec["tflops"] / profile.sms * 1e12) * 1e3
    byte_ms = 1e3 / (profile.hbm_tbps * 1e12)
    total = ours = 0.0
    for call in calls:
        rows = sum(b.q1 - b.q0 for b in call)
        if slivers and len(call) == 1 and is_sliver(call[0]):
            ours += rows * Hq * 4 * B * D * 2 * byte_ms
            continue
        work = [c * tile_ms for band in call for c in fa4_tiles_per_program(band)] * (B * Hq)
        cols = sum(b.k1 - b.k0 for b in call)
        total += _makespan(work, profile.sms) + (rows * Hq * 14 + cols * Hkv * 8) * B * D * byte_ms
    if deterministic:
        total *= spec["deterministic_factor"]
    total += ours
    if len(calls) > 1:  # gradients of token ranges two calls cover: read both, write the sum
        def shared(span: list[tuple[int, int]]) -> int:
            cuts = sorted({x for ab in span for x in ab})
            return sum(b - a for a, b in zip(cuts, cuts[1:]) if sum(s <= a and b <= t for s, t in span) > 1)
        tokens = (shared([(b.q0, b.q1) for c in calls for b in c]) * Hq  # dq
                  + 2 * shared([(b.k0, b.k1) for c in calls for b in c]) * Hkv)  # dk and dv
        total += 3 * tokens * B * D * 2 * byte_ms
    return total


@dataclass(frozen=True)
class Timing:
    """One measured forward: block-map metadata `meta` at `tiles` on `backend`, shapes B, H, D, `ms`."""
    meta: object
    B: int
    H: int
    D: int
    tiles: TileConfig
    backend: str
    ms: float


PARTIAL_FACTORS = (1.0, 1.15, 1.3, 1.45, 1.6, 1.8, 2.0, 2.25, 2.5, 2.75, 3.0, 3.5, 4.0)
PROGRAM_US = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
MASK_OPS = (0.0, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.07, 0.1)
SCORE_OPS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15)
FIT_ROUNDS = 4


def fit(profile: Profile, backend: str, timings: list[Timing]) -> tuple[dict, float]:
    """(`backend`'s spec in `profile` refitted, rms log error of its predictions of `timings` (the
    backend's)): the grid of PARTIAL_FACTORS x PROGRAM_US x occupancies (1 or the profile's, for
    tile shapes it allows more than one), then mask_op over MASK_OPS and score_op over SCORE_OPS,
    by coordinate descent (each coordinate's grid in turn, keeping the others, until a round
    improves nothing, at most FIT_ROUNDS). With several tile shapes timed, each round also tries a
    PARTIAL factor per shape (a dict, its "default" the common factor found first): for each
    prologue, each shape's best factor on its own timings (they depend on no other shape's). Rates
    are kept (measured on full attention). A coordinate the timings do not constrain (no mask or
    score operators) keeps the spec's value. The timings share one head dim class (HEAD_DIM_CLASSES):
    the spec fitted is the profile's at that class (Profile.at_head_dim)."""
    mine = [t for t in timings if t.backend == backend]
    if not mine:
        raise ValueError(f"no timings of backend {backend!r} to fit")
    classes = {head_dim_class(t.D) for t in mine}
    if len(classes) != 1:
        raise ValueError(f"timings of one head dim class fit one spec, got classes {sorted(classes, key=str)}")
    profile = profile.at_head_dim(mine[0].D)
    if backend not in profile.backends:
        raise ValueError(f"profile {profile.key!r} has no {backend!r} figures at head dim {mine[0].D}")
    spec = {"mask_op": 0.0, "score_op": 0.0, **profile.backends[backend]}
    base = {shape_key(t.tiles): profile.programs_per_sm(backend, t.tiles) for t in mine}
    free = sorted(k for k, n in base.items() if n > 1)
    occupancies = [{**spec.get("programs_per_sm", {}), **base, **{k: 1 for i, k in enumerate(free) if mask >> i & 1}}
                   for mask in range(1 << len(free))]
    by_shape: dict[str, list[Timing]] = {}
    for t in mine:
        by_shape.setdefault(shape_key(t.tiles), []).append(t)

    def squares(trial: dict, subset: list[Timing]) -> float:
        prof = replace(profile, backends={**profile.backends, backend: trial})
        return sum(math.log(simulate(t.meta, t.B, t.H, t.D, t.tiles, backend, prof).ms / t.ms) ** 2 for t in subset)

    def best_of(trials: list[dict], current: tuple[dict, float] | None) -> tuple[dict, float]:
        for trial in trials:
            err = math.sqrt(squares(trial, mine) / len(mine))
            if current is None or err < current[1] - 1e-12:
                current = (trial, err)
        return current

    def tile_grid(around: dict) -> list[dict]:  # PARTIAL factor x prologue x occupancy
        return [{**around, "partial_factor": f, "program_us": p, "programs_per_sm": o}
                for f in PARTIAL_FACTORS for p in PROGRAM_US for o in occupancies]

    def per_shape(around: dict) -> list[dict]:  # per prologue: each shape's own best factor
        common = partial_factor(around)
        return [{**around, "program_us": p, "partial_factor": {"default": common, **{
            key: min(PARTIAL_FACTORS, key=lambda f: squares({**around, "program_us": p, "partial_factor": f}, ts))
            for key, ts in by_shape.items()}}} for p in PROGRAM_US]

    best = best_of(tile_grid(spec), None)
    for _ in range(FIT_ROUNDS):
        before = best[1]
        best = best_of([{**best[0], "mask_op": x} for x in MASK_OPS], best)
        best = best_of([{**best[0], "score_op": x} for x in SCORE_OPS], best)
        if not isinstance(best[0]["partial_factor"], dict):
            best = best_of(tile_grid(best[0]), best)
        if len(by_shape) > 1:
            best = best_of(per_shape(best[0]), best)
        if best[1] >= before - 1e-12:
            break
    return best


def _makespan(work: list[float], slots: int) -> float:
    """List scheduling: each program, in order, on the slot that frees first."""
    if len(work) <= slots:
        return max(work, default=0.0)
    free = [0.0] * slots
    for w in work:
        heapq.heapreplace(free, free[0] + w)
    return max(free)


def context_parallel_ms(compute_ms: torch.Tensor, hop_ms: float, ring_steps: int,
                        grad_hop_ms: float | None = None) -> dict[str, float]:
    """One pass of context-parallel attention over W ranks, predicted for the ring and the all-gather.

    compute_ms: float64 [W, W], rank r's attention over kv shard s (0: never needed, skipped);
    hop_ms: the largest kv shard (k and v) sent over one link; ring_steps: T + 1, T the farthest
    ring distance (r - s) mod W at which some rank needs shard s. grad_hop_ms (the backward pass):
    one shard's float32 dK/dV partial sums sent over one link.
    - ring: at step t rank r computes shard (r - t) mod W, c[r, t], while it passes its shard to
      r + 1; a transfer ends when both sides have posted it, so with done[r, t] = start[r, t] + c[r, t]
        start[r, t + 1] = max(done[r, t], start[r - 1, t] + hop_ms, start[r + 1, t] + hop_ms)
      and the pass takes max_r done[r, T]. In the backward, the partial sums of a shard leave
      after each step's compute and are added after the next one's: done[r, t] also waits for
      done[r -+ 1, t - 1] + grad_hop_ms; then they go home once: + grad_hop_ms if T > 0.
    - all-gather: the W - 1 other (padded) shards arrive in (W - 1) hop_ms, as a ring all-gather
      moves them, while each rank computes its own, then the rest:
      max_r [max(compute_ms[r, r], (W - 1) hop_ms) + sum_{s != r} compute_ms[r, s]]. The
      backward's partial sums then go to their owners in one exchange: + max_r (shards r needs
      besides its own) grad_hop_ms.
    """
    W = compute_ms.shape[0]
    T = ring_steps - 1
    r = torch.arange(W)
    start, done = torch.zeros(W, dtype=torch.float64), None
    for t in range(T + 1):
        previous, done = done, start + compute_ms[r, (r - t) % W]
        if grad_hop_ms is not None and previous is not None:  # this shard's partial sums, from r - 1
            done = torch.stack([done, previous.roll(1) + grad_hop_ms, previous.roll(-1) + grad_hop_ms]).amax(0)
        if t < T:
            start = torch.stack([done, start.roll(1) + hop_ms, start.roll(-1) + hop_ms]).amax(0)
    ring = float(done.max())
    if T == 0:  # every rank needs its own shard only: nothing moves either way
        return {"ring": ring, "all-gather": ring}
    own = compute_ms.diagonal()
    gather = float((torch.clamp(own, min=(W - 1) * hop_ms) + compute_ms.sum(1) - own).max())
    if grad_hop_ms is not None:
        ring += grad_hop_ms
        others = ((compute_ms > 0).sum(1) - (own > 0).long()).max()
        gather += int(others) * grad_hop_ms
    return {"ring": ring, "all-gather": gather}


def live_pairs(pattern: Pattern, bm, B: int, H: int, Q: int, KV: int, seed: int = 0) -> tuple[float, bool]:
    """(live (q, kv) pairs over all b, h, exact?): FULL tiles whole (within the lengths), PARTIAL
    tiles evaluated element by element (a uniform sample of them, scaled up, past _EXACT_PAIRS)."""
    BM, BN, dev = bm.BLOCK_M, bm.BLOCK_N, bm.full_kv_num.device
    rep = (B // bm.B) * (H // bm.H)  # broadcast lists stand for every b / h
    num, idx = bm.full_kv_num, bm.full_kv_idx
    height = (Q - torch.arange(num.shape[-1], device=dev) * BM).clamp(max=BM).double()
    valid = torch.arange(idx.shape[-1], device=dev) < num[..., None]
    width = (KV - idx.long() * BN).clamp(max=BN).double() * valid
    full_pairs = float((width.sum(-1) * height).sum()) * rep
    num, idx = bm.partial_kv_num, bm.partial_kv_idx
    coords = (torch.arange(idx.shape[-1], device=dev) < num[..., None]).nonzero()  # (b, h, q tile, slot)
    total = coords.shape[0]
    if total == 0:
        return full_pairs, True
    exact = total * BM * BN <= _EXACT_PAIRS
    if not exact:
        keep = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[: _EXACT_PAIRS // (BM * BN)]
        coords = coords[keep.to(dev)]
    b, h, qt = coords[:, 0], coords[:, 1], coords[:, 2]
    kt = idx[b, h, qt, coords[:, 3]].long()
    q = qt[:, None, None] * BM + torch.arange(BM, device=dev)[None, :, None]
    kv = kt[:, None, None] * BN + torch.arange(BN, device=dev)[None, None, :]
    env = {"b": b[:, None, None], "h": h[:, None, None], "q": q.clamp(max=Q - 1), "kv": kv.clamp(max=KV - 1)}
    live = evaluate(token_mask(pattern), env, pattern.params, pattern.buffers).bool() & (q < Q) & (kv < KV)
    return full_pairs + float(live.sum()) * (total / coords.shape[0]) * rep, exact


def roofline_ms(pairs: float, B: int, Hq: int, Hkv: int, Q: int, KV: int, D: int, Dv: int, dtype,
                profile: Profile) -> tuple[float, float]:
    """(ms at the peak matrix rate for 4 * D * pairs FLOPs, ms to move q, k, v and o once)."""
    flops = 2.0 * (D + Dv) * pairs
    rate = profile.peak_matrix_tflops.get(str(dtype).replace("torch.", ""), min(profile.peak_matrix_tflops.values()))
    size = _BYTES.get(dtype, 2)
    moved = size * (B * Hq * Q * (D + Dv) + B * Hkv * KV * (D + Dv))
    return flops / (rate * 1e12) * 1e3, moved / (profile.hbm_tbps * 1e12) * 1e3


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3f} ms" if ms < 10 else f"{ms:.1f} ms"


def report(pattern: Pattern, s, dtype, device, profile: Profile, chosen: tuple[str, TileConfig],
           candidates: list[tuple[str, TileConfig]], png: str | None = None, forward_runs: bool = True,
           copies_ms: dict | None = None) -> str:
    """The text `ac.explain` returns (see its docstring); with `png`, also a picture there: the
    block map of (b, h) = (0, 0) at the chosen tiles beside each query tile's predicted load.
    forward_runs=False: another kernel runs the call (the decode kernel): the forward
    configurations are listed for comparison, none marked. copies_ms: {backend: ms} a backend pays
    beside its kernel (fa4's permuted copies of a token layout), added to its prediction."""
    from ..runtime.kernel import META_CACHE

    lines = [f"pattern: {pattern.name or 'custom'}  (mask: {_short(pattern.mask)}; score: {_short(pattern.score)})",
             f"shapes: B={s.B} Hq={s.Hq} Hkv={s.Hkv} Q={s.Q} KV={s.KV} D={s.D} Dv={s.Dv} {str(dtype).replace('torch.', '')}",
             f"target: {profile.name} (profile {profile.key!r}: {profile.sms} SMs, "
             f"{profile.peak_matrix_tflops.get(str(dtype).replace('torch.', ''), '?')} TFLOP/s peak, "
             f"{profile.hbm_tbps} TB/s)", f"  profile: {first_sentence(profile.provenance)}", ""]
    bm, meta = META_CACHE.get(pattern, s, chosen[1], device)
    B, H, QB, KB = s.B, s.Hq, bm.shape[2], bm.shape[3]
    n_full = int(bm.full_kv_num.sum()) * (B // bm.B) * (H // bm.H)
    n_part = int(bm.partial_kv_num.sum()) * (B // bm.B) * (H // bm.H)
    n_all = B * H * QB * KB
    pairs, exact = live_pairs(pattern, bm, B, H, s.Q, s.KV)
    computed = (n_full + n_part) * bm.BLOCK_M * bm.BLOCK_N
    lines += [f"tiles {bm.BLOCK_M}x{bm.BLOCK_N} ({QB} x {KB} per (b, h), {B * H} of them): "
              f"EMPTY {n_all - n_full - n_part} ({(n_all - n_full - n_part) / n_all:.1%}), "
              f"PARTIAL {n_part} ({n_part / n_all:.1%}), FULL {n_full} ({n_full / n_all:.1%})",
              f"live pairs: {pairs:.4g} ({pairs / (B * H * s.Q * s.KV):.2%} of all){'' if exact else ' (estimated from a sample of the PARTIAL tiles)'}; "
              f"tile efficiency {pairs / max(computed, 1):.1%} (live pairs / pairs in computed tiles)"]
    ops = meta.expression_ops
    lines.append(f"per score element: mask {ops.mask:g} weighted operators ({ops.mask_pairwise:g} pairwise), on "
                 f"PARTIAL tiles; score mod {ops.score:g} ({ops.score_pairwise:g} pairwise), on every live tile "
                 f"(Triton pays the pairwise ones, FA4's hooks all but values of b and h alone)")
    flop_ms, byte_ms = roofline_ms(pairs, B, s.Hq, s.Hkv, s.Q, s.KV, s.D, s.Dv, dtype, profile)
    roof = max(flop_ms, byte_ms)
    lines.append(f"roofline: {_fmt_ms(roof)} (matrix {_fmt_ms(flop_ms)}, memory {_fmt_ms(byte_ms)})")
    lines += ["", "configurations (forward), predicted:" if forward_runs else
              "configurations of the forward kernels (which do not run this call), predicted:"]
    if dtype not in (torch.float16, torch.bfloat16):
        lines.append(f"  ({dtype} is not what the profiles model (16-bit calls): the times below are of 16-bit "
                     f"kernels, and the tile table, not the simulator, chooses)")
    unmodelled = sorted({b for b, _ in candidates if not profile.models(b, s.D)})
    if unmodelled:
        lines.append(f"  (not modelled at head dim {s.D} on this profile: {', '.join(unmodelled)}; "
                     f"`attncc calibrate --head-dim {s.D}` measures them)")
    candidates = [c for c in candidates if profile.models(c[0], s.D)]
    rows, chosen_pred = [], None
    copies_ms = copies_ms or {}
    for backend, tiles in candidates:
        _, m = META_CACHE.get(pattern, s, tiles, device)
        pred = simulate(m, B, H, s.D, tiles, backend, profile)
        rows.append((pred.ms + copies_ms.get(backend, 0.0), backend, tiles))
        if (backend, tiles) == chosen:
            chosen_pred = pred
    if png is not None:
        from ..viz import save_load_png

        if chosen_pred is None and candidates:  # the chosen one is not modelled: picture the first candidate's load
            _, m = META_CACHE.get(pattern, s, candidates[0][1], device)
            chosen_pred = simulate(m, B, H, s.D, candidates[0][1], candidates[0][0], profile)
        classes = bm.to_dense()[0, 0]
        load = chosen_pred.work[0, 0] if chosen_pred is not None else torch.zeros(QB, dtype=torch.float64)
        save_load_png(png, classes, load,
                      f"{pattern.name or 'custom'}: {chosen[0]} {chosen[1].BLOCK_M}x{chosen[1].BLOCK_N} "
                      f"on the {profile.name}")
    rows.sort(key=lambda r: profile.ranking(r[1], r[0]))
    for ms, backend, tiles in rows:
        mark = "  <- runs" if (backend, tiles) == chosen and forward_runs else ""
        effective = 2.0 * (s.D + s.Dv) * pairs / (ms * 1e-3) / 1e12 if ms > 0 else math.inf
        label = "sdpa-cudnn (cuDNN's own tiles)" if backend == SDPA_CUDNN else f"{backend:7s} {tiles}"
        if backend in copies_ms:
            label += f" + {_fmt_ms(copies_ms[backend])} of permuted copies"
        host = profile.call_ms(backend)
        bound = f"; a call no faster than its host time, {_fmt_ms(host)}" if host > ms else ""
        lines.append(f"  {label}: {_fmt_ms(ms)}, {ms / roof if roof else math.inf:.2f}x roofline, "
                     f"{effective:.0f} effective TFLOP/s{bound}{mark}")
    if rows and rows[0][0] < roof:
        lines.append("  (below the roofline: the per-tile costs, fitted on compute-bound calls, miss this call's "
                     "memory traffic; such predictions rank, they do not time)")
    if rows and (rows[0][1], rows[0][2]) != chosen and forward_runs:
        lines.append(f"the simulator would pick {rows[0][1]} {rows[0][2]}; the marked one runs (runtime/choices.py: "
                     "kernel_options, or a call outside the measured profiles)")
    return "\n".join(lines)


def first_sentence(text: str, limit: int = 160) -> str:
    """A profile's provenance as its first sentence (cut at `limit` characters), pointing to the rest."""
    head = text.split(". ")[0].rstrip(".")
    head = head if len(head) <= limit else head[:limit].rsplit(" ", 1)[0] + " ..."
    return head + ("." if head == text.rstrip(".") else " (the profile's provenance field says where each number comes from).")


def _short(node, limit: int = 90) -> str:
    text = str(node)
    return text if len(text) <= limit else text[:limit] + " ..."


DECODE_WAVES = 2  # programs per SM the decode kernel's splits aim for
DECODE_MIN_SPLIT_KEYS = 128  # the shortest kv range worth a split of its own


def decode_splits(programs: int, live_tiles: int, BLOCK_N: int, profile: Profile) -> int:
    """How many splits the decode kernel (templates/decode.py.tmpl) cuts each kv range into.

    The largest power of two at most ceil(DECODE_WAVES * SMs / programs) (about two waves of
    programs over the GPU) and at most live_tiles * BLOCK_N / DECODE_MIN_SPLIT_KEYS (no split
    shorter than 128 keys of the longest live range), at least 1. programs: the grid without
    splits, B * Hkv * row blocks; live_tiles: the most FULL + PARTIAL kv tiles of any (sequence,
    kv head). Measured on the H200 (benchmarks/decode_sweep.py, Hq 32 / Hkv 8, D 128, bf16,
    paged; benchmarks/results/2026-12-01-nvidia-h200-decode-sweep.md): B1 causal 8K Q_LEN 1 2.09
    TB/s at S = 32 against 1.84 at 16 (the old 512-key floor) and 2.04 at 64; B16 Q_LEN 8, 8K
    keys, 3.20 at S = 2 and 2.99 at 4 against 2.47 at the old 3 (128K keys: 3.64, 3.63, 2.85);
    B64 best at 1; sinks + 1K window at B1 0.36 at 8 against 0.23 at the old 2.
    """
    want = -(-DECODE_WAVES * profile.sms // max(1, programs))
    bound = max(1, min(want, live_tiles * BLOCK_N // DECODE_MIN_SPLIT_KEYS))
    return 1 << (bound.bit_length() - 1)
