"""A drop-in for torch's FlexAttention API: `from attncc.flex import flex_attention, create_block_mask`.

Same signatures and semantics as torch.nn.attention.flex_attention; mask_mod and score_mod are
traced into an attncc Pattern and run by attncc's generated kernels (`attncc.attention`).
Where attncc's semantics (README, "Semantics") differ from torch eager's, on purpose: a float that
decides a comparison, a floor or an integer conversion is computed in float64 (torch: float32,
so `kv * 0.6 <= q` may differ at a boundary); integers never wrap (a uint8 / int8 buffer's
arithmetic is exact in int32 / int64, where torch wraps); float16 / bfloat16 buffers are read
into float32 arithmetic. float64 q, k, v and head dims outside 16..256 are refused.

- `create_block_mask` returns a FlexBlockMask: a subclass of torch's BlockMask (torch's methods,
  torch's own flex_attention and isinstance checks all work) whose tiles come from attncc's
  symbolic classifier, never from a dense Q x KV mask. Its index tensors are torch's exact layout
  (a tile cut by Q_LEN or KV_LEN is PARTIAL, as torch pads with False), built on first read.
  device=None means torch's default (the current accelerator, else CPU); device="cuda" without
  CUDA is a RuntimeError, as in torch. `_compile` is accepted and ignored (nothing to compile).
  B or H None broadcasts, allowed only when mask_mod ignores b or h: torch would classify batch
  (head) 0 only and apply it to all, so attncc refuses rather than drop live pairs.
- `flex_attention` with a FlexBlockMask runs its traced mask exactly. With any other torch
  BlockMask (hand-made `BlockMask.from_kv_blocks`, a FlexBlockMask whose mask_mod was replaced)
  it keeps torch's kernel semantics: pairs in FULL tiles are live (mask_mod is not applied),
  in PARTIAL tiles mask_mod decides, all other tiles are dead. (torch's eager CPU fallback applies
  mask_mod everywhere and ignores the tile lists; its compiled kernels do not.)
- kernel_options: BLOCK_M, BLOCK_N, num_warps, num_stages (and their fwd_ forms, which win) go
  to attncc's options of the same names; USE_TMA -> tma; BACKEND "AUTO" -> "auto", "TRITON" and
  "TRITON_DECODE" -> "triton" (the generated Triton kernel), "FLASH" -> "fa4" (FlashAttention-4's
  kernels with attncc's CuTe hooks: a ValueError saying why where they cannot run the call).
  Accepted without effect: PRESCALE_QK, ROWS_GUARANTEED_SAFE, BLOCKS_ARE_CONTIGUOUS, WRITE_DQ,
  FORCE_USE_FLEX_ATTENTION, OUTPUT_LOGSUMEXP, OUTPUT_MAX (the outputs follow return_lse /
  return_aux), BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, kpack, matrix_instr_nonkdim,
  waves_per_eu, num_consumer_groups, num_buffers_warp_spec, and every bwd_ key (attncc's backward
  chooses its own tiles).
  Any other key is a ValueError naming it.
- Traced patterns are cached. The key is the function's code with the current values of its
  closure cells, defaults and the globals its code reads, recursively through functions and
  functools.partial: numbers and strings by value, tensors by identity, version and requires_grad
  (an in-place write re-traces; a write through `.data` or from outside torch leaves the version
  as it was and is not seen: write in place, or pass a new tensor), trusted modules (torch, math,
  numpy, attncc, ...) and builtins by name.
  A value outside these (an nn.Module, a bound method's self, any other object whose attributes
  may change unseen) makes the function uncacheable: it is traced on every call.
- Inputs that require grad train through attncc's backward kernels, and so
  do float tensors a score mod captures when they require grad (a learnable bias, slopes).
  Not supported: return_aux max_scores, q and k/v of different batch sizes, mods that cannot be traced
  (PatternError, pointing at the line). Inside torch.compile, flex_attention is not traced by Dynamo
  (torch.compiler.disable: it cannot trace the tracing of the mods) and runs attncc's kernels as
  they are, gradients included; for one graph with attncc's kernels as custom ops, build the pattern
  outside (`attncc.Pattern(mask_mod, score_mod)`) and compile `attncc.attention` (fullgraph).
"""
from __future__ import annotations

import dis
import functools
import numbers
import types
from typing import TYPE_CHECKING, Callable

import torch
from torch.nn.attention.flex_attention import BlockMask, and_masks, noop_mask, or_masks

from .compiler.blockmask import FULL, PARTIAL
from .compiler.blockmask import BlockMask as TileBlockMask
from .dsl.pattern import Pattern, block_pair
from .dsl.trace import Proxy
from .runtime.api import attention
from .runtime.cache import LRU
from .runtime.api import create_block_mask as create_tile_block_mask
from .runtime.inputs import Shapes, check_qkv

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import AuxOutput, AuxRequest

__all__ = ["flex_attention", "create_block_mask", "FlexBlockMask", "BlockMask", "and_masks", "or_masks",
           "noop_mask"]

_LISTS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
          "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


class FlexBlockMask(BlockMask):
    """torch's BlockMask for a traced mask_mod, its tiles classified symbolically by attncc.

    `pattern`: the traced mask (what flex_attention runs); `tiles`: the attncc.BlockMask it was
    classified into (int8 classes via tiles.to_dense(), [B', H', QB, KB], B'/H' 1 when the mask
    ignores b/h). torch's attributes: shape (B, H, Q_LEN, KV_LEN), BLOCK_SIZE, seq_lengths,
    mask_mod, and the int32 index tensors kv_num_blocks [B, H, QB], kv_indices [B, H, QB, KB],
    full_kv_* alike, q_num_blocks / full_q_num_blocks [B, H, KB], q_indices / full_q_indices
    [B, H, KB, QB], built from the tiles the first time one is read.
    """

    def __init__(self, pattern: Pattern, tiles: TileBlockMask, B: int, H: int, mask_mod: Callable,
                 separate_full_blocks: bool = True):
        # not BlockMask.__init__: the index tensors are built on first read (__getattr__)
        self.seq_lengths = (tiles.Q_LEN, tiles.KV_LEN)
        self.BLOCK_SIZE = (tiles.BLOCK_M, tiles.BLOCK_N)
        self.mask_mod = mask_mod
        self.dq_write_order = self.dq_write_order_full = self.dq_kv_order = self.dq_kv_order_spt = None
        self.pattern, self.tiles = pattern, tiles
        self._B, self._H, self._separate, self._traced_mask_mod = B, H, separate_full_blocks, mask_mod

    def __getattr__(self, name: str):
        if name in _LISTS and "tiles" in self.__dict__:
            self.__dict__.update(self._torch_lists())
            return self.__dict__[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @classmethod
    def from_kv_blocks(cls, *args, **kwargs) -> BlockMask:
        """torch's BlockMask.from_kv_blocks (used by _adjust): lists give a torch BlockMask, no pattern."""
        return BlockMask.from_kv_blocks(*args, **kwargs)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self._B, self._H, *self.seq_lengths)

    def _runs_pattern(self) -> bool:
        """Whether flex_attention runs `pattern` (False once mask_mod was replaced)."""
        return self.mask_mod is self._traced_mask_mod

    def to_dense(self) -> torch.Tensor:
        """int32 [B, H, QB, KB]: 1 where a tile is live (PARTIAL or FULL), as torch's."""
        return (self._classes() > 0).to(torch.int32)

    def sparsity(self) -> float:
        """torch's formula: 100 * (1 - live tiles * BLOCK_M * BLOCK_N / (B * H * Q_LEN * KV_LEN))."""
        (BM, BN), numel = self.BLOCK_SIZE, self.numel()
        return 100 * (1 - int((self._classes() > 0).sum()) * BM * BN / numel)

    def _classes(self) -> torch.Tensor:
        """int8 [B, H, QB, KB] (an expanded view): 0 dead, 1 PARTIAL, 2 FULL, in torch's convention."""
        c = self.tiles.to_dense()
        (Q_LEN, KV_LEN), (BM, BN) = self.seq_lengths, self.BLOCK_SIZE
        if not self._separate:
            c.clamp_(max=PARTIAL)
        if Q_LEN % BM:
            c[:, :, -1].clamp_(max=PARTIAL)
        if KV_LEN % BN:
            c[..., -1].clamp_(max=PARTIAL)
        return c.expand(self._B, self._H, *c.shape[2:])

    def _torch_lists(self) -> dict[str, torch.Tensor | None]:
        c = self._classes()
        lists: dict[str, torch.Tensor | None] = dict.fromkeys(_LISTS)
        for prefix, value in (("", PARTIAL), ("full_", FULL)):
            if value == FULL and not self._separate:
                continue
            live = c == value
            lists[f"{prefix}kv_num_blocks"], lists[f"{prefix}kv_indices"] = _ordered(live)
            lists[f"{prefix}q_num_blocks"], lists[f"{prefix}q_indices"] = _ordered(live.transpose(-1, -2))
        return lists


def _ordered(live: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's row lists of a bool [..., R, C] grid: counts int32 [..., R], columns int32 [..., R, C]
    (the live ones first, ascending; the rest after, as torch's stable argsort leaves them)."""
    dense = live.to(torch.int32)
    idx = torch.argsort(dense, dim=-1, descending=True, stable=True)
    return dense.sum(-1, dtype=torch.int32), idx.to(torch.int32)


def create_block_mask(mask_mod: Callable, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int,
                      device: str | torch.device | None = None, BLOCK_SIZE: int | tuple[int, int] = 128,
                      _compile: bool = False, separate_full_blocks: bool = True) -> FlexBlockMask:
    """torch's create_block_mask: mask_mod(b, h, q_idx, kv_idx) -> bool, traced and classified.

    B / H None broadcast (size 1), allowed when mask_mod ignores b / h. BLOCK_SIZE: an int or
    (Q_BLOCK, KV_BLOCK). separate_full_blocks=False lists every live tile as PARTIAL, as torch.
    """
    device = _device(device)
    pattern = _traced(("mask", mask_mod), lambda: Pattern(mask_mod=mask_mod))
    tiles = create_tile_block_mask(pattern, B, H, Q_LEN, KV_LEN, block_size=block_pair(BLOCK_SIZE), device=device)
    return FlexBlockMask(pattern, tiles, 1 if B is None else B, 1 if H is None else H, mask_mod,
                         separate_full_blocks)


def _device(device) -> torch.device:
    if device is None:
        return torch.accelerator.current_accelerator() or torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"create_block_mask(device={str(device)!r}): CUDA is not available here; "
                           "pass device='cpu' (or None: the current accelerator, else CPU)")
    return device


@torch.compiler.disable  # Dynamo cannot trace the tracing: a graph break, eager attncc kernels
def flex_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   score_mod: Callable | None = None, block_mask: BlockMask | None = None,
                   scale: float | None = None, enable_gqa: bool = False, return_lse: bool = False,
                   kernel_options: dict | None = None, *, return_aux: AuxRequest | None = None
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, AuxOutput]:
    """torch's flex_attention: query [B, Hq, Q, D], key [B, Hkv, KV, D], value [B, Hkv, KV, Dv].

    score_mod(score, b, h, q_idx, kv_idx) -> score; block_mask from create_block_mask (or any
    torch BlockMask; None: full attention). Hq != Hkv needs enable_gqa=True. Returns out
    [B, Hq, Q, Dv] in query's dtype, and lse float32 [B, Hq, Q] (natural log; -inf on rows with
    no live key) when return_lse, or (out, AuxOutput) when return_aux is given (lse only).
    """
    s = check_qkv(query, key, value)
    if not enable_gqa and s.Hq != s.Hkv:
        raise ValueError(f"query has {s.Hq} heads but key/value have {s.Hkv}; pass enable_gqa=True for GQA")
    if return_aux is not None and return_lse:
        raise ValueError("pass return_lse or return_aux, not both (return_lse is deprecated in torch)")
    if return_aux is not None and return_aux.max_scores:
        raise NotImplementedError("return_aux.max_scores: attncc's kernels do not output row maxima")
    pattern = _mask_pattern(block_mask, s)
    if score_mod is not None:
        pattern = pattern & _traced(("score", score_mod), lambda: Pattern(score_mod=score_mod))
    want_lse = return_lse or (return_aux is not None and return_aux.lse)
    result = attention(query, key, value, pattern, scale=scale, return_lse=want_lse,
                       kernel_options=_kernel_options(kernel_options))
    if return_aux is None:
        return result
    from torch.nn.attention.flex_attention import AuxOutput

    out, lse = result if want_lse else (result, None)
    return out, AuxOutput(lse=lse, max_scores=None)


def _mask_pattern(block_mask, s: Shapes) -> Pattern:
    """The mask flex_attention runs for `block_mask` at these shapes (see the module docstring)."""
    if block_mask is None:
        return Pattern()
    if not isinstance(block_mask, BlockMask):
        raise ValueError(f"block_mask must be a BlockMask from create_block_mask (or torch's), "
                         f"got {type(block_mask).__name__}")
    shape = tuple(block_mask.shape)
    if len(shape) != 4:
        raise ValueError(f"block_mask has shape {shape}; expected (B, H, Q_LEN, KV_LEN) (not a sliced mask)")
    Bm, Hm, Q_LEN, KV_LEN = shape
    if (Q_LEN, KV_LEN) != (s.Q, s.KV):
        raise ValueError(f"block_mask was created for Q_LEN={Q_LEN}, KV_LEN={KV_LEN}, but query has length "
                         f"{s.Q} and key/value {s.KV}; create a block mask for these lengths")
    if Bm not in (1, s.B) or Hm not in (1, s.Hq):
        raise ValueError(f"block_mask has B={Bm}, H={Hm}; query has B={s.B}, H={s.Hq} (each must match or be 1)")
    if not (isinstance(block_mask, FlexBlockMask) and block_mask._runs_pattern()):
        return _traced(("torch block mask", [getattr(block_mask, n) for n in _LISTS[:4]], shape,
                        tuple(block_mask.BLOCK_SIZE), block_mask.mask_mod),
                       lambda: _torch_block_pattern(block_mask))
    reads = block_mask.pattern.free_vars()
    for var, built, used, name in (("b", Bm, s.B, "B"), ("h", Hm, s.Hq, "H")):
        if var in reads and built != used:
            raise ValueError(f"block_mask was built for {name}={built}, but its mask_mod reads {var} and "
                             f"query has {name}={used}; build it with {name}={used}")
    return block_mask.pattern


def _torch_block_pattern(block_mask: BlockMask) -> Pattern:
    """torch's kernel semantics as a pattern: FULL tiles live, PARTIAL tiles mask_mod, others dead."""
    tiles = TileBlockMask.from_flex(block_mask).to_dense()  # int8 [B', H', QB, KB]
    (BM, BN), mask_mod = block_mask.BLOCK_SIZE, block_mask.mask_mod
    per_b, per_h = tiles.shape[0] > 1, tiles.shape[1] > 1

    def torch_block_mask(b, h, q_idx, kv_idx):
        tile = tiles[b if per_b else 0, h if per_h else 0, q_idx // BM, kv_idx // BN]
        return (tile == FULL) | ((tile == PARTIAL) & mask_mod(b, h, q_idx, kv_idx))
    return Pattern(mask_mod=torch_block_mask)


# ----------------------------------------------------------------------------------------------
# kernel_options: torch's knobs -> attncc's.

_TILE_KNOBS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
_NO_EFFECT = frozenset({
    "PRESCALE_QK", "ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS", "WRITE_DQ", "FORCE_USE_FLEX_ATTENTION",
    "OUTPUT_LOGSUMEXP", "OUTPUT_MAX", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2", "kpack",
    "matrix_instr_nonkdim", "waves_per_eu", "num_consumer_groups", "num_buffers_warp_spec"})
_BACKENDS = {"AUTO": "auto", "TRITON": "triton", "TRITON_DECODE": "triton", "FLASH": "fa4"}


def _kernel_options(options: dict | None) -> dict:
    """attncc's kernel_options for torch's (see the module docstring); ValueError on unknown keys."""
    options = dict(options or {})
    out, unknown = {}, []
    for key in sorted(options, key=lambda k: k.startswith("fwd_")):  # fwd_X is applied after X
        stage, name = (key[:3], key[4:]) if key.startswith(("fwd_", "bwd_")) else ("", key)
        value = options[key]
        if name not in _TILE_KNOBS + ("BACKEND", "USE_TMA") and name not in _NO_EFFECT:
            unknown.append(key)
        elif stage == "bwd" or name in _NO_EFFECT:
            continue
        elif name == "BACKEND":
            if value not in _BACKENDS:
                raise ValueError(f"kernel_options['BACKEND'] = {value!r}: attncc runs {sorted(_BACKENDS)}")
            out["backend"] = _BACKENDS[value]
        else:
            out["tma" if name == "USE_TMA" else name] = value
    if unknown:
        raise ValueError(f"kernel_options has unknown key(s) {unknown}; known: {sorted(_TILE_KNOBS)} + "
                         f"BACKEND, USE_TMA, {sorted(_NO_EFFECT)} (no effect), each also with fwd_ / bwd_")
    return out


# ----------------------------------------------------------------------------------------------
# The trace cache (rule in the module docstring).

class _Uncacheable(Exception):
    """Tracing this function again might give another pattern with the same key."""


_TRACES = LRU(128)  # key -> (pins, Pattern)
_TRUSTED_MODULES = ("torch", "math", "cmath", "operator", "functools", "numpy", "attncc", "builtins")


def _traced(parts: tuple, make: Callable[[], Pattern]) -> Pattern:
    """make() for the functions and values in `parts`, cached under their key (LRU)."""
    pins: list = []  # objects keyed by identity: alive while their entry is, so no id is reused
    try:
        key = _key(parts, pins, frozenset())
    except _Uncacheable:
        return make()
    hit = _TRACES.get(key)
    if hit is not None:
        return hit[1]
    pattern = make()
    _TRACES.put(key, (pins, pattern))
    return pattern


def _key(v, pins: list, active: frozenset) -> tuple:
    """A hashable key for `v` that changes whenever tracing code reading `v` might change."""
    if v is None or isinstance(v, (str, bytes, torch.dtype, torch.device)):
        return (type(v), v)
    if isinstance(v, numbers.Number):  # floats by repr: 0.0 and -0.0 differ, nan matches nan
        return (type(v), repr(v) if isinstance(v, (float, complex)) else v)
    if isinstance(v, (torch.Tensor, Proxy)):
        pins.append(v)
        if isinstance(v, Proxy):
            return (Proxy, id(v))
        try:
            version = v._version
        except RuntimeError:  # an inference tensor: writes to it leave no trace
            raise _Uncacheable from None
        return (torch.Tensor, id(v), version, tuple(v.shape), v.dtype, v.device, v.requires_grad)
    if isinstance(v, (tuple, list)):
        return (type(v), tuple(_key(x, pins, active) for x in v))
    if isinstance(v, dict):
        return (dict, tuple((_key(k, pins, active), _key(x, pins, active)) for k, x in v.items()))
    if isinstance(v, types.ModuleType):
        if v.__name__.partition(".")[0] in _TRUSTED_MODULES:
            return (types.ModuleType, v.__name__)
        raise _Uncacheable
    if isinstance(v, (types.BuiltinFunctionType, types.MethodDescriptorType, types.WrapperDescriptorType)):
        owner = getattr(v, "__self__", None)
        if owner is None or isinstance(owner, (types.ModuleType, type)):
            pins.append(v)
            return ("builtin", id(v))
        raise _Uncacheable
    if isinstance(v, functools.partial):
        return (functools.partial, _key(v.func, pins, active), _key(v.args, pins, active),
                _key(v.keywords, pins, active))
    if isinstance(v, types.FunctionType):
        return _function_key(v, pins, active)
    raise _Uncacheable


def _function_key(fn: types.FunctionType, pins: list, active: frozenset) -> tuple:
    pins.append(fn)
    if id(fn) in active:  # recursion: the outer key already holds this function's state
        return ("recursive", id(fn))
    library = (fn.__module__ or "").partition(".")[0] in _TRUSTED_MODULES
    if library and fn.__closure__ is None and not fn.__defaults__ and not fn.__kwdefaults__:
        return ("library function", id(fn))  # e.g. noop_mask
    active = active | {id(fn)}
    cells = []
    for cell in fn.__closure__ or ():
        try:
            cells.append(_key(cell.cell_contents, pins, active))
        except ValueError:  # a cell not yet assigned
            cells.append(("empty cell",))
    scope = fn.__globals__
    names = tuple((n, _key(scope[n], pins, active) if n in scope else ("unbound",)) for n in _global_names(fn.__code__))
    return (fn.__code__, tuple(cells), _key(fn.__defaults__, pins, active),
            _key(fn.__kwdefaults__, pins, active), names)


@functools.cache
def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """The global names `code` (and the code nested in it) loads."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(_global_names(const))
    return tuple(sorted(names))
