"""Kernel: a compiled attention for one pattern and one specialisation, on one backend.

A Kernel pairs a generated module (cached on disk and in memory by `cache.py`, keyed by the
pattern's IR, the buffers' dtypes/ranks, the tile config and the versions) with the block-mask
metadata for concrete shapes. Metadata is cached per (pattern incl. param values, shapes, tiles,
device, buffer identity and version), so calling again does no work, a new param value or
buffer content rebuilds only the metadata, and no new value ever regenerates or recompiles code.
"""
from __future__ import annotations

import contextlib
import hashlib
import threading
import warnings
import types
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..compiler import cost
from ..compiler.codegen import BackwardTiles, TileConfig, generate, kernel_roots
from ..compiler.domain import check_domain
from ..compiler.evaluate import token_mask
from ..compiler.layout import Layout
from ..compiler.lowering import BufferSpec
from ..compiler.numerics import NumericPlan, numeric_plan
from ..dsl.ir import TRUE
from ..dsl.pattern import Pattern, params_key
from . import autograd, cache, fa4
from .choices import (BACKWARD_TILE_OPTIONS, TILE_OPTIONS, KernelChoice, fa4_backward_model_refusal, fewer_registers,
                      fewer_stages, model_backward_tiles, tile_tuple)
from .inputs import Shapes, check_qkv
from .tiles import TileLists

_META_CACHE_SIZE = 64
_PARTIAL_WEIGHT = 1.5  # a PARTIAL tile costs about this many FULL ones (mask code, bounds)


@dataclass(frozen=True)
class KernelMeta(TileLists):
    """Block-mask metadata in the form the generated forward reads: TileLists per query tile
    (counts [B|1, H|1, QB], kv tile indices [.., QB, width]). A ragged last kv tile (KV_LEN %
    BLOCK_N != 0) is always in the partial list, so the FULL loop never reads past KV_LEN.
    order: int32 [B|1, H|1, QB], each head's query tiles heaviest first. mean_row_tiles: live
    (FULL + PARTIAL) kv tiles per query tile, averaged (read once at build). params: int64
    [max(1, #params)], the params' values (floats as float64 bits), as the kernel reads them;
    plan: the numeric plan (machine types) for these shapes, params and buffers.
    expression_ops: compiler/cost.expression_ops of the pattern (what the cost model charges).
    """
    order: torch.Tensor
    buffers: dict
    mean_row_tiles: float
    params: torch.Tensor
    plan: NumericPlan
    expression_ops: cost.ExpressionOps = cost.ExpressionOps()


def _widen(idx: torch.Tensor, width: int) -> torch.Tensor:
    if idx.shape[-1] >= width:
        return idx
    pad = idx.new_zeros(*idx.shape[:-1], width - idx.shape[-1])
    return torch.cat([idx, pad], -1)


def param_values(params: dict, device) -> torch.Tensor:
    """int64 [max(1, len(params))]: ints as they are, floats as the bits of their float64."""
    bits = [v if isinstance(v, int) else int(torch.tensor(v, dtype=torch.float64).view(torch.int64))
            for v in params.values()]
    return torch.tensor(bits or [0], dtype=torch.int64, device=device)


def _last(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The last listed index of each row (idx[..., num - 1]; idx[..., 0] where num is 0)."""
    return idx.gather(-1, (num.long() - 1).clamp_min(0)[..., None])[..., 0]


def _ragged_to_partial(full_num, full_idx, part_num, part_idx, LEN: int, BLOCK: int):
    """The lists with a ragged last tile (LEN % BLOCK != 0) moved from FULL to PARTIAL, so the
    mask-free loop never reads past LEN; each idx at least 1 wide."""
    full_num, full_idx, part_num, part_idx = full_num.int(), full_idx.int(), part_num.int(), part_idx.int()
    if LEN % BLOCK and full_idx.shape[-1]:
        last = LEN // BLOCK  # the ragged tile
        tail = _last(full_num, full_idx)
        ragged = (full_num > 0) & (tail == last)
        if bool(ragged.any()):
            full_num = full_num - ragged.int()
            part_idx = _widen(part_idx, part_idx.shape[-1] + 1)
            slot = part_num.long()[..., None]
            part_idx = part_idx.scatter(-1, slot, torch.where(ragged[..., None], last, part_idx.gather(-1, slot)))
            part_num = part_num + ragged.int()
    return full_num, _widen(full_idx, 1), part_num, _widen(part_idx, 1)


def kernel_meta(bm, KV_LEN: int, buffers: dict, params: torch.Tensor, plan: NumericPlan,
                expression_ops: cost.ExpressionOps = cost.ExpressionOps()) -> KernelMeta:
    """KernelMeta from a BlockMask built for the kernel's tiles (see the class docstring)."""
    full_num, full_idx, part_num, part_idx = _ragged_to_partial(
        bm.full_kv_num, bm.full_kv_idx, bm.partial_kv_num, bm.partial_kv_idx, KV_LEN, bm.BLOCK_N)
    weight = full_num.float() + _PARTIAL_WEIGHT * part_num.float()
    order = torch.argsort(-weight, dim=-1, stable=True).int()
    return KernelMeta(
        **TileLists.fields(full_num, full_idx, part_num, part_idx), order=order.contiguous(),
        buffers=buffers, mean_row_tiles=float((full_num + part_num).float().mean()), params=params, plan=plan,
        expression_ops=expression_ops)


@dataclass(frozen=True)
class BackwardMeta(TileLists):
    """What the backward kernels need beyond KernelMeta: the transposed lists of the dK/dV kernel
    (TileLists per (b, h, kv tile): its query tiles, ascending; int32 [B|1, H|1, KB] counts and
    [.., KB, width] indices; a ragged last query tile always PARTIAL) and the numeric plan of the
    backward's expressions (mask, score and the score mod's derivative)."""
    plan: NumericPlan


def backward_meta(bm, pattern: Pattern, s: Shapes, buffers: dict, device) -> BackwardMeta:
    """BackwardMeta from the forward's BlockMask (its transposed lists, built on first use)."""
    full_num, full_idx, part_num, part_idx = _ragged_to_partial(
        bm.full_q_num, bm.full_q_idx, bm.partial_q_num, bm.partial_q_idx, s.Q, bm.BLOCK_M)
    plan = numeric_plan(kernel_roots(pattern, "backward"), pattern.params, buffers, s.B, s.Hq, s.Q, s.KV, device)
    return BackwardMeta(**TileLists.fields(full_num, full_idx, part_num, part_idx), plan=plan)


def _live_kv_span(meta: KernelMeta) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, end) int64 [QB]: per query tile, the live kv tiles (FULL or PARTIAL) of any (b, h)
    lie in first..end-1 (first = end where none is live). The lists are at least 1 wide."""
    big = torch.iinfo(torch.int32).max
    firsts, ends = [], []
    for num, idx in ((meta.full_num, meta.full_idx), (meta.partial_num, meta.partial_idx)):
        has = num > 0
        firsts.append(torch.where(has, idx[..., 0], big))
        ends.append(torch.where(has, _last(num, idx) + 1, 0))
    first = torch.stack(firsts).amin(0).flatten(0, -2).amin(0).long()
    end = torch.stack(ends).amax(0).flatten(0, -2).amax(0).long()
    return torch.minimum(first, end), end


class _TritonKeyPrefetch:
    """Triton hashes its own installation (about 0.5 s on the H100 machine) the first time a process
    looks a kernel up in its cache. `start()` does that on a thread while the block mask is built;
    `wait()` before the first launch, so the launch finds the hash ready instead of redoing it."""

    def __init__(self):
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="attncc-triton-key", daemon=True)
            self.thread.start()

    @staticmethod
    def _run() -> None:
        try:
            from triton.runtime.cache import triton_key  # internal: absent in some Triton versions
            triton_key()
        except Exception:  # noqa: BLE001 — only a head start; the launch computes it if this fails
            pass

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()


TRITON_KEY = _TritonKeyPrefetch()


def buffer_key(t: torch.Tensor) -> tuple:
    """What identifies a buffer's contents: its version counter, or (tensors made under
    torch.inference_mode have none) a digest of the contents themselves."""
    try:
        version = t._version
    except RuntimeError:
        version = hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    return (id(t), version, t.data_ptr(), tuple(t.shape), t.dtype, t.device)


def pattern_key(pattern: Pattern) -> tuple:
    """What a pattern's metadata depends on: its IR, param values and buffer contents (by version)."""
    return (pattern.mask, pattern.score, pattern.block, pattern.block_size, params_key(pattern.params),
            tuple((n, buffer_key(t)) for n, t in pattern.buffers.items()))


class _MetaCache:
    """LRU of (BlockMask, KernelMeta, BackwardMeta) per pattern value, shapes, tiles and buffer versions."""

    def __init__(self, size: int):
        self.size = size
        self.entries: OrderedDict = OrderedDict()
        self.builds = 0
        self.lock = threading.RLock()  # calls from several threads share it

    def get(self, pattern: Pattern, s: Shapes, config: TileConfig, device: torch.device):
        """(BlockMask, KernelMeta) for these shapes and tiles: built on a miss, then kept."""
        with self.lock:
            return tuple(self._entry(pattern, s, config, device)[1:3])

    def backward(self, pattern: Pattern, s: Shapes, config: TileConfig, device: torch.device) -> BackwardMeta:
        """The BackwardMeta of the same entry, built the first time a backward asks for it."""
        with self.lock:
            entry = self._entry(pattern, s, config, device)
            if entry[3] is None:
                entry[3] = backward_meta(entry[1], pattern, s, entry[2].buffers, device)
            return entry[3]

    def predicted_ms(self, pattern: Pattern, s: Shapes, config: TileConfig, device: torch.device, backend: str,
                     profile) -> float | None:
        """compiler.cost.simulate's forward ms for this entry on `backend` and `profile` (None where the
        profile lacks the backend), computed once (list scheduling of every program is milliseconds
        of Python: never per call) per backend figures: a profile altered in place of its name
        (Profile.with_spec, as refits and tests make) is priced afresh."""
        if not profile.models(backend, s.D):
            return None
        with self.lock:
            entry = self._entry(pattern, s, config, device)
            key = (backend, config, s.B, s.Hq, s.D, profile.key, profile.sms, profile.figures(backend, s.D))
            if key not in entry[4]:
                entry[4][key] = cost.simulate(entry[2], s.B, s.Hq, s.D, config, backend, profile).ms
            return entry[4][key]

    def _entry(self, pattern: Pattern, s: Shapes, config: TileConfig, device: torch.device) -> list:
        key = pattern_key(pattern) + (s.B, s.Hq, s.Q, s.KV, config.BLOCK_M, config.BLOCK_N, str(device))
        hit = self.entries.get(key)
        if hit is not None:
            self.entries.move_to_end(key)
            return hit
        from ..compiler.blockmask import build_block_mask

        bm = build_block_mask(pattern, s.B, s.Hq, s.Q, s.KV, config.BLOCK_M, config.BLOCK_N, device)
        check_domain(pattern, (pattern.score,), s.B, s.Hq, s.Q, s.KV, device)
        buffers = {n: t.to(device) for n, t in pattern.buffers.items()}
        plan = numeric_plan(kernel_roots(pattern), pattern.params, buffers, s.B, s.Hq, s.Q, s.KV, device)
        meta = kernel_meta(bm, s.KV, buffers, param_values(pattern.params, device), plan,
                           cost.expression_ops(pattern))
        self.builds += 1
        # the key holds ids: keep the buffers alive with the entry so an id is never reused;
        # then the BackwardMeta, built on first use, and the cost model's predictions
        entry = self.entries[key] = [dict(pattern.buffers), bm, meta, None, {}]
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return entry


META_CACHE = _MetaCache(_META_CACHE_SIZE)


_MODULES: dict[tuple, types.ModuleType] = {}


def kernel_module(pattern: Pattern, config: TileConfig | BackwardTiles, plan: NumericPlan, *, interpret: bool,
                  kind: str = "forward", layout: Layout | None = None) -> types.ModuleType:
    """The generated `kind` module for `pattern`, `config` and `plan` (disk- and memory-cached);
    `layout`: the pattern is in its kernel order, the module's tensors in natural order."""
    import attncc

    memo = (pattern.mask, pattern.score, pattern.block, pattern.block_size if pattern.has_block_mask else None,
            tuple((n, pattern.param_kind(n)) for n in pattern.params),
            tuple((n, t.dtype, t.dim()) for n, t in pattern.buffers.items()), config, plan.signature, interpret,
            kind, layout)
    if memo in _MODULES:
        return _MODULES[memo]
    specs = {n: BufferSpec.of(n, t) for n, t in pattern.buffers.items()}
    parts = {
        "kind": kind,
        "mask": str(token_mask(pattern)),
        "score": str(pattern.score),
        "params": ",".join(f"{n}:{pattern.param_kind(n)}" for n in pattern.params),
        "buffers": ",".join(f"{b.name}:{b.dtype}:{b.ndim}" for b in specs.values()),
        "config": str(config),
        "plan": plan.signature,
        "rows": repr(layout),
    }
    module = _MODULES[memo] = cache.load_kernel_module(
        parts, lambda: generate(kind, pattern, specs, config, plan, attncc.__version__, layout),
        interpret=interpret)
    return module


# Triton's interpreter swaps triton.language's functions for numpy ones while a kernel runs, for
# the whole process: two interpreted launches at once break each other ("Did you forget to add
# @triton.jit"). They take turns.
INTERPRETER_LOCK = threading.RLock()


@contextlib.contextmanager
def _quiet_numpy():
    """numpy's warnings off while an interpreted kernel runs: a discarded `where` branch may divide
    by zero or convert -inf to an integer (T5's log(0)), which is harmless there and in the GPU's
    arithmetic alike."""
    import numpy as np

    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def interpretable(interpret: bool, *tensors):
    """Triton 3.6's interpreter computes bfloat16 tl.dot wrongly (numpy has no bfloat16): in the
    interpreter only, the same kernels run on float32 copies (their results are rounded back)."""
    if interpret and tensors[0].dtype == torch.bfloat16:
        return tuple(t.float() for t in tensors)
    return tensors


def launch(interpret: bool, fn, *args, **kwargs):
    """fn(*args, **kwargs), a generated launcher: in the interpreter one at a time, numpy quiet."""
    if interpret:
        with INTERPRETER_LOCK, _quiet_numpy():  # the interpreter patches triton.language globally
            return fn(*args, **kwargs)
    TRITON_KEY.wait()
    return fn(*args, **kwargs)


def _sdpa(q, k, v, scale: float, causal: bool) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


_SHRINK = {"shared memory": fewer_stages, "registers": fewer_registers}


class RecordedRefusal(Exception):
    """A kernel module this GPU refused before, in this or an earlier process (cache.record_refusal)."""

    def __init__(self, resource: str):
        super().__init__(f"recorded in the attncc cache: this GPU refused these kernels for want of {resource}")
        self.resource = resource


def refuse_if_recorded(module) -> None:
    """Raise RecordedRefusal where the cache recorded that this GPU refused `module`."""
    resource = cache.refusal_of(module)
    if resource in _SHRINK:
        raise RecordedRefusal(resource)


def resource_refusal(error: Exception) -> str | None:
    """What ran out where `error` is Triton refusing a kernel for want of a resource (or a
    RecordedRefusal of one), else None: "shared memory" (a launch's OutOfResources; tiles shrink by
    choices.fewer_stages) or "registers" (ptxas failing register allocation, as D=256 kernels with a
    token layout's gathers did on the H100; choices.fewer_registers)."""
    from triton.runtime.errors import OutOfResources, PTXASError

    if isinstance(error, RecordedRefusal):
        return error.resource
    if isinstance(error, OutOfResources) and "shared memory" in str(error):
        return "shared memory"
    if isinstance(error, PTXASError) and "Register allocation failed" in str(error):
        return "registers"
    return None


def after_resource_refusal(error: Exception, tiles: TileConfig, forced: bool, other: TileConfig | None = None,
                           module=None, fallbacks: list | None = None) -> tuple[TileConfig, TileConfig | None]:
    """The tiles to retry with after compiling or launching `module`'s kernels at `tiles` raised
    `error`, where Triton refused them for want of shared memory or registers (resource_refusal;
    what a kernel needs depends on the pattern's expressions, so no estimate can promise it fits;
    the sooner the better): for registers the next of the simulator's `fallbacks` (popped; its
    ranking, as smaller tiles of the same shape may be slower than another shape), else smaller
    tiles (choices.fewer_stages / fewer_registers). The refusal is recorded in the cache for later
    processes (module given). Re-raises anything else; a ValueError naming the kernel_options to
    change where they `forced` the tiles or nothing is left to shrink. `other`: the backward's dQ
    tiles (`tiles` its dK/dV ones), which shrink with them; returns (tiles, other)."""
    resource = resource_refusal(error)
    if resource is None:
        raise error
    if module is not None and not isinstance(error, RecordedRefusal):
        cache.record_refusal(module, resource)
    if resource == "registers" and fallbacks and not forced:
        return fallbacks.pop(0), other
    shrink = _SHRINK[resource]
    smaller, smaller_other = shrink(tiles), None if other is None else shrink(other)
    if forced or (smaller is None and smaller_other is None):
        why = "the tiles kernel_options set" if forced else "the smallest kernel"
        options = "/".join(TILE_OPTIONS if other is None else BACKWARD_TILE_OPTIONS)
        raise ValueError(f"{why} ({tile_tuple(tiles)}{'' if other is None else ', ' + str(tile_tuple(other))}: "
                         f"BLOCK_M, BLOCK_N, num_warps, num_stages) need more {resource} than this GPU has "
                         f"({error}); set kernel_options {options} to smaller tiles"
                         f"{' or fewer stages' if resource == 'shared memory' else ' or more warps'}") from error
    return smaller or tiles, smaller_other or other


# Bytes of local memory a thread of a forward may spill before the model's next-ranked tiles replace
# the chosen ones (Kernel._leave_spilling_tiles). H100, 2026-12-07 (.probe/spill_guard.py, B4 H16
# N8192 D=64 bf16): global_tokens at 64x128/4/3 spills 168 bytes a thread at run time and runs
# 13.8 ms; the guard moves it to 64x32/4/2, 1.26 ms. No pick of the suite's patterns spills at D=64
# or 128 (.probe/spills.py); natten3d's register-capped forward spills 24 bytes and is faster for it.
SPILL_LIMIT = 64


class Kernel:
    """A compiled attention for one pattern: `.source`, `.config`, `.block_mask`, `__call__`.

    `config` names the backend and holds the tiles, warps, stages (of the forward and of the
    backward's two kernels): "triton" (attncc's generated kernels), "fa4" (FlashAttention-4's
    kernels with attncc's generated CuTe hooks and block-sparse lists, runtime/fa4.py; its tiles
    are FA4's 128x128) or "sdpa-cudnn" (SDPA's cuDNN backend, forward and backward, for plain full
    or equal-length causal attention with no score mod on CUDA). With a token layout (`layout`,
    compiler/layout.py) the kernels, `.source` and `.block_mask` are in the layout's token order;
    with a residue fold (`fold`, runtime/fold.py) they are the folded call's (batch B*H, the classes
    as heads). `__call__`, `forward` and `backward` take and return natural order: folds are views,
    attncc's Triton kernels gather and scatter a layout's rows (token_row in .source), the other
    backends run on permuted copies. `predicted_ms` is the cost model's forward prediction
    (compiler/cost.py; None on CPU and outside what the profile models). `shapes` are the call's
    (natural) shapes.
    """

    def __init__(self, pattern: Pattern, shapes: Shapes, device: torch.device, scale: float,
                 choice: KernelChoice, dtype: torch.dtype):
        self.pattern = pattern
        self.dtype = dtype  # the inputs' dtype the choice was made for (other dtypes run too)
        self.scale = scale
        self.backend = choice.backend
        self._backward_tiles = choice.backward_tiles
        self._pick_backward_tiles = choice.backward_by_model  # resolved on first use (backward_tiles)
        self.tma = choice.tma
        self.layout = choice.layout
        self._rows = choice.layout if choice.backend == "triton" else None  # the kernels gather rows through it
        self.fold = choice.fold
        # natural order <-> the kernels' order: fold views, a layout's permuted copies (a backend
        # that does not gather rows), or none
        self._reorder = ((self.fold.fold, self.fold.unfold) if self.fold is not None else
                         (self.layout.permute, self.layout.unpermute) if self.layout is not None and self._rows is None
                         else None)
        self.deterministic = choice.deterministic
        self.fa4_native = choice.fa4_native
        self._tiles_forced, self._backward_forced = choice.tiles_forced, choice.backward_forced
        self._fallbacks = list(choice.fallbacks)  # the simulator's next-ranked tiles (after_resource_refusal)
        self.device = device
        self.interpret = device.type != "cuda"
        self._call_shapes = shapes
        self._shapes = shapes if self.fold is None else self.fold.shapes(shapes)  # what the kernels run
        self._use_tiles(fa4.TILE if self.backend == "fa4" else choice.tiles)
        self._fa4_backward_why: dict = {}  # shapes -> fa4_backward_model_refusal's answer
        if self.backend == "fa4":
            self._fa4 = fa4.prepare(pattern, shapes, device, self.fa4_native)

    def _use_tiles(self, tiles: TileConfig) -> None:
        """Run the forward at `tiles`: their block mask and metadata at the built shapes, and the
        generated module (None on fa4, whose hooks fa4.prepare builds)."""
        self.tiles = tiles
        self.block_mask, self._meta = META_CACHE.get(self.pattern, self._shapes, tiles, self.device)
        self.module = None if self.backend == "fa4" else kernel_module(
            self.pattern, tiles, self._meta.plan, interpret=self.interpret, layout=self._rows)

    @property
    def backward_tiles(self) -> BackwardTiles:
        """The backward's tiles: kernel_options' or the table's, or where the cost model picks
        (choices.backward_modelled) its choice, made the first time they are asked for (a forward
        alone never builds the candidates' block maps)."""
        if self._pick_backward_tiles:
            from .calibrate import profile_for

            self._backward_tiles = model_backward_tiles(self.pattern, self._shapes, self.device,
                                                        profile_for(self.device), self._backward_tiles)
            self._pick_backward_tiles = False
        return self._backward_tiles

    @backward_tiles.setter
    def backward_tiles(self, tiles: BackwardTiles) -> None:
        self._backward_tiles, self._pick_backward_tiles = tiles, False

    @property
    def config(self) -> dict:
        t, b = self.tiles, self.backward_tiles
        if self.backend == "fa4":
            why = self._fa4_backward_refusal(self._fa4, self._shapes)
            native = self._fa4.native
            config = {"backend": "fa4", "BLOCK_M": t.BLOCK_M, "BLOCK_N": t.BLOCK_N, "fa4_kernel": self._fa4.kind(),
                      **({"fa4_native": native.describe()} if native is not None else {}),
                      "backward": "fa4" if why is None else f"triton ({why})", "deterministic": self.deterministic,
                      "dkdv_tiles": tile_tuple(b.dkdv), "dq_tiles": tile_tuple(b.dq)}
        else:
            config = {"backend": self.backend, "BLOCK_M": t.BLOCK_M, "BLOCK_N": t.BLOCK_N,
                      "num_warps": t.num_warps, "num_stages": t.num_stages, "tma": self.tma,
                      "dkdv_tiles": tile_tuple(b.dkdv), "dq_tiles": tile_tuple(b.dq)}
        return config if self.fold is None else {**config, "fold": self.fold.describe()}

    @property
    def predicted_ms(self) -> float | None:
        """The simulator's forward time at this kernel's shapes, on the profile of its GPU (the
        matching one, else "generic"), fa4's copies of a token layout included; None on CPU and
        outside what the profile models (float32, a backend it lacks at this head dim)."""
        from .calibrate import profile_for
        from .choices import modelled_ms

        if self.device.type != "cuda":
            return None
        return modelled_ms(self.pattern, self._shapes, self.backend, self.tiles, self.dtype, profile_for(self.device),
                           self.device, self.layout)

    @property
    def source(self) -> str:
        """The generated source this kernel runs: the Triton module, or for the fa4 backend the CuTe
        hooks and the FlashAttention-4 calls (the sdpa path shows the Triton fallback)."""
        if self.backend == "fa4":
            return self._fa4.source + "\n\n" + self._fa4.text() + "\n"
        return cache.source_of(self.module)

    @property
    def backward_source(self) -> str:
        """The generated source of the backward kernels (dK/dV and dQ) at this kernel's shapes (the
        fa4 backend: the same hooks module, whose score_mod_bwd FA4's backward calls, where FA4's
        backward runs; attncc's Triton backward where config["backward"] says it runs)."""
        if self.backend == "fa4" and self._fa4_backward_refusal(self._fa4, self._shapes) is None:
            return self.source
        return cache.source_of(self._backward_module(self._shapes)[2])

    def _backward_module(self, s: Shapes):
        """(dq metadata, dk/dv metadata, backward module) for shapes s."""
        bt = self.backward_tiles
        _, dq_meta = META_CACHE.get(self.pattern, s, bt.dq, self.device)
        dkdv_meta = META_CACHE.backward(self.pattern, s, bt.dkdv, self.device)
        return dq_meta, dkdv_meta, kernel_module(self.pattern, bt, dkdv_meta.plan, interpret=self.interpret,
                                                 kind="backward", layout=self._rows)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, return_lse: bool = False):
        """out [B, Hq, Q, Dv] in q's dtype (and lse float32 [B, Hq, Q] when return_lse);
        differentiable in q, k, v (and through lse) when they require grad."""
        s = check_qkv(q, k, v)
        if q.device != self.device:
            raise ValueError(f"q is on {q.device}, but this kernel was compiled for {self.device}; "
                             "call attncc.compile with tensors on that device")
        return self.run(q, k, v, s, return_lse)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: Shapes, return_lse: bool):
        """__call__ without its input checks, for callers that have made them (s = check_qkv(q, k, v))."""
        if self.layout is not None:
            self.layout.check(s.Q, s.KV, "this kernel runs in it; compile the call at these lengths (calls of "
                                         "fewer queries than keys run in natural order)")
        if self.backend == "sdpa-cudnn" and not return_lse and s == self._call_shapes:  # SDPA's own backward
            (q, k, v), _ = self._kernel_order(s, q, k, v)
            return self._natural_order(_sdpa(q, k, v, self.scale, causal=self.pattern.mask is not TRUE))[0]
        if autograd.needs_grad(self.pattern, q, k, v):
            return autograd.attention(self, q, k, v, s, return_lse)
        out, lse = self.forward(q, k, v, s)
        return (out, lse) if return_lse else out

    def _kernel_order(self, s: Shapes, *xs):
        """(xs in the order the kernels read, their shapes): see _reorder (None stays None)."""
        if self._reorder is None:
            return list(xs), s
        to_kernel = self._reorder[0]
        return [None if x is None else to_kernel(x) for x in xs], s if self.fold is None else self.fold.shapes(s)

    def _natural_order(self, *xs) -> tuple:
        """_kernel_order's inverse on results."""
        return xs if self._reorder is None else tuple(map(self._reorder[1], xs))

    def _specialised(self, s: Shapes, device) -> tuple[KernelMeta, types.ModuleType]:
        """The metadata and forward module for shapes `s` (other lengths: their own block mask, and
        maybe other machine types)."""
        if s == self._shapes:
            return self._meta, self.module
        _, meta = META_CACHE.get(self.pattern, s, self.tiles, device)
        if meta.plan.signature == self._meta.plan.signature:
            return meta, self.module
        return meta, kernel_module(self.pattern, self.tiles, meta.plan, interpret=self.interpret, layout=self._rows)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: Shapes):
        """(out [B, Hq, Q, Dv] in q's dtype, lse float32 [B, Hq, Q]) from the generated kernel
        (natural token order in and out)."""
        (q, k, v), s = self._kernel_order(s, q, k, v)
        return self._natural_order(*self._forward(q, k, v, s))

    def _forward(self, q, k, v, s: Shapes):
        if self.backend == "fa4":
            return fa4.forward(self._fa4_call(s), q, k, v, self.scale)
        dtype = q.dtype
        q, k, v = interpretable(self.interpret, q, k, v)
        while True:
            meta, module = self._specialised(s, q.device)
            try:
                refuse_if_recorded(module)
                out, lse = launch(self.interpret, module.forward, q, k, v, meta, self.scale, meta.buffers,
                                  tma=self.tma)
                self._leave_spilling_tiles(module, q.device)
                return out.to(dtype), lse
            except Exception as e:  # noqa: BLE001 — only Triton's resource refusals are handled
                self._use_tiles(after_resource_refusal(e, self.tiles, self._tiles_forced, module=module,
                                                       fallbacks=self._fallbacks)[0])

    def _leave_spilling_tiles(self, module, device) -> None:
        """Where the cost model chose these tiles and their forward, compiled, spills more than
        SPILL_LIMIT bytes a thread (module.SPILLS; the simulator knows nothing of spills), later
        calls run its next-ranked tiles (this call's result stands: spills cost time, not
        exactness); tiles kernel_options set are kept."""
        if not self._tiles_forced and self._fallbacks and module.SPILLS.get(device, 0) > SPILL_LIMIT:
            self._use_tiles(self._fallbacks.pop(0))

    def backward(self, q, k, v, out, lse, dout, dlse, s: Shapes):
        """(dq, dk, dv) in q's, k's, v's dtypes from the generated backward kernels; dout the
        gradient of out (None: zeros), dlse that of lse (None: zeros); natural token order."""
        dout = torch.zeros_like(out) if dout is None else dout
        (q, k, v, out, lse, dout, dlse), s = self._kernel_order(s, q, k, v, out, lse, dout, dlse)
        return self._natural_order(*self._backward(q, k, v, out, lse, dout, dlse, s))

    def _backward(self, q, k, v, out, lse, dout, dlse, s: Shapes):
        if self.backend == "fa4":
            call = self._fa4_call(s)
            if self._fa4_backward_refusal(call, s) is None:
                return fa4.backward(call, q, k, v, out, lse, dout, dlse, self.scale, self.deterministic)
        dtypes = (q.dtype, k.dtype, v.dtype)
        q, k, v, out, dout = interpretable(self.interpret, q, k, v, out, dout)
        while True:
            dq_meta, dkdv_meta, module = self._backward_module(s)
            try:
                refuse_if_recorded(module)
                grads = launch(self.interpret, module.backward, q, k, v, out, lse, dout, dlse, dq_meta,
                               dkdv_meta, self.scale, dq_meta.buffers)
                return tuple(g.to(t) for g, t in zip(grads, dtypes))
            except Exception as e:  # noqa: BLE001 — only Triton's resource refusals are handled
                bt = self.backward_tiles
                self.backward_tiles = BackwardTiles(*after_resource_refusal(e, bt.dkdv, self._backward_forced,
                                                                            other=bt.dq, module=module))

    def buffer_backward(self, names: list[str], q, k, v, out, lse, dout, dlse, s: Shapes) -> list[torch.Tensor]:
        """The gradients of the pattern's float buffers `names` (runtime/buffer_grads.py), each in
        its buffer's shape and dtype; the other arguments as in backward."""
        from .buffer_grads import buffer_grads

        _, meta = META_CACHE.get(self.pattern, s, self.tiles, q.device)
        dout = torch.zeros_like(out) if dout is None else dout
        if self.layout is not None:  # the tensors are in natural order, the pattern in kernel order
            q, k, v, out, lse, dout = (self.layout.permute(t) for t in (q, k, v, out, lse, dout))
            dlse = None if dlse is None else self.layout.permute(dlse)
        span = _live_kv_span(meta) + (self.tiles.BLOCK_M, self.tiles.BLOCK_N)
        return buffer_grads(self.pattern, names, q, k, v, out, lse, dout, dlse, self.scale, span)

    def _fa4_backward_refusal(self, call: "fa4.Call", s: Shapes) -> str | None:
        """Why FA4's backward does not compute this call's gradients (None: it does): what it cannot
        run (fa4.backward_refusal), then the cost model's choice between FA4's own backward and
        attncc's Triton backward (choices.fa4_backward_model_refusal; once per shapes)."""
        why = fa4.backward_refusal(call, self.pattern, s, self.deterministic)
        if why is not None:
            return why
        if s not in self._fa4_backward_why:
            from .calibrate import profile_for

            self._fa4_backward_why[s] = fa4_backward_model_refusal(
                self.pattern, s, self.device, self.backward_tiles, self.deterministic, self.fa4_native,
                profile_for(self.device))
        return self._fa4_backward_why[s]

    def _fa4_call(self, s: Shapes) -> "fa4.Call":
        return self._fa4 if s == self._shapes else fa4.prepare(self.pattern, s, self.device, self.fa4_native)

    def __repr__(self) -> str:
        return f"Kernel({self.pattern!r}, {self.config})"
