"""The fa4 backend: attncc patterns on FlashAttention-4's warp-specialised CuTe-DSL kernels.

The only module that touches FlashAttention-4's API (`pip install 'attncc[fa4]'`; tested with
TESTED). attncc's own analysis feeds it: the hooks are printed from the pattern's IR by
compiler/cute.py (mask_mod, score_mod, score_mod_bwd from the derivative IR); the block-sparse
tensors are attncc's BlockMask at FA4's 128x128 tile (built symbolically, no dense evaluation),
the transposed lists for the backward, with FA4's dQ write order for a deterministic backward;
params travel as FA4's runtime aux_scalars (a new value recompiles nothing), and so do buffers, as
addresses and strides (compiler/cute.HookInputs; FA4 gets no aux_tensors). Plain full attention
and equal-length causal attention run FA4's own dense and causal kernels, with no hooks; masks
that are exact unions of bands or segments (compiler/bands.py: sliding windows, prefix LM,
documents, chunks) run FA4's own local and varlen kernels (`Native`), which on SM90 also give the
deterministic backward its block-sparse kernels lack. FA4's compiled kernels are cached on disk
(its AOT cache, under attncc's cache directory unless FLASH_ATTENTION_CUTE_DSL_CACHE_* say
otherwise), keyed by a hash of the hooks' source, so a known pattern's first call in a new process
compiles nothing.

Layout: attncc's tensors are [B, H, N, D]; FA4 reads [B, N, H, D], as transposed views.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
from dataclasses import dataclass, field
from types import ModuleType, SimpleNamespace

import torch

from ..compiler import bands, cute
from ..compiler.codegen import TileConfig, kernel_roots
from ..compiler.lowering import BufferSpec
from ..dsl import ir
from ..dsl.pattern import Pattern
from . import cache, lazy_imports, sliver
from .inputs import Shapes

TESTED = "flash-attn-4==4.0.0b36 with nvidia-cutlass-dsl==4.8.1 (H200, torch 2.11)"
TILE = TileConfig(128, 128, 4, 1)  # FA4's SM90 tile with block sparsity (D <= 128): the block mask's
MAX_HEAD_DIM = 128

_CAUSAL = ir.op("ge", ir.Var("q"), ir.Var("kv"))
_LOCK = threading.RLock()
_FA: list = []  # [namespace] once imported, [str] (why not) once that failed


def _fa():
    """FlashAttention-4's entry points (imported on first use; never at `import attncc`)."""
    with _LOCK:
        if not _FA:
            try:
                os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
                os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", str(cache.cache_dir() / "fa4"))
                _register_quack_lazily()
                import cutlass
                from flash_attn.cute import interface
                from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch, compute_dq_write_order

                _FA.append(SimpleNamespace(cutlass=cutlass, interface=interface, Sparse=BlockSparseTensorsTorch,
                                           dq_write_order=compute_dq_write_order,
                                           address=lambda t: cutlass.Int64(t.data_ptr())))
            except Exception as exc:  # noqa: BLE001 — any import failure means: not available
                _FA.append(f"FlashAttention-4 is not importable ({type(exc).__name__}: {exc}); "
                           f"install it with pip install 'attncc[fa4]' ({TESTED})")
        return _FA[0]


def _register_quack_lazily() -> None:
    """FA4 imports a few of quack's CuTe helper modules (quack.cute_dsl_utils, layout_utils,
    copy_utils, sm90_utils); quack's package __init__ also imports its rmsnorm, softmax and
    cross_entropy kernels, which pull in torch's dynamo and FSDP (about 4 s of FA4's 9 s import
    on the H200). Where quack is not imported yet (and no ptxas patch is asked for, which its
    __init__ must apply first), register it lazily (`register_lazily`) and import quack.dsl, what
    its __init__ runs first (for its process-wide CuTe patches)."""
    if "quack" in sys.modules or os.environ.get("CUTE_DSL_PTXAS_PATH") is not None:
        return
    if lazy_imports.register_lazily("quack"):
        importlib.import_module("quack.dsl")


def missing() -> str | None:
    """Why FA4 cannot be used in this process (None: it can)."""
    fa = _fa()
    return fa if isinstance(fa, str) else None


def refusal(pattern: Pattern, s: Shapes, q: torch.Tensor) -> str | None:
    """Why the fa4 backend cannot run this call (None: it can); see `refusal_on`."""
    if not q.is_cuda:
        return "fa4 runs on CUDA tensors only"
    return refusal_on(pattern, s, torch.cuda.get_device_capability(q.device), q.dtype, q.device)


def refusal_on(pattern: Pattern, s: Shapes, capability: tuple[int, int], dtype: torch.dtype, device,
               assume_installed: bool = False) -> str | None:
    """Why the fa4 backend cannot run `pattern` at shapes s on a GPU of `capability` in `dtype`
    (None: it can): the GPU, dtype and head dims first, then that FA4 imports here (unless
    assume_installed: for `attncc show --target`), then that every operator and read of the
    pattern has a CuTe lowering (block masks are built on `device`)."""
    if capability[0] != 9:  # FA4's other generations differ in tiles, sparsity blocks and determinism
        return (f"fa4 runs on SM90 (Hopper) GPUs, where attncc's 128x128 block masks and its backward routing "
                f"were built and checked; this one is sm_{capability[0]}{capability[1]}")
    if dtype not in (torch.float16, torch.bfloat16):
        return f"fa4 runs float16 and bfloat16 only, not {dtype}"
    for name, d in (("q", s.D), ("v", s.Dv)):
        if d % 8 or d > MAX_HEAD_DIM:
            return f"fa4 (with attncc's 128x128 block masks) takes head dims that are multiples of 8 up to " \
                   f"{MAX_HEAD_DIM}; {name} has {d}"
    why = None if assume_installed else missing()
    if why:
        return why
    try:
        hooks_source(pattern, s, device)
    except ir.IRError as exc:
        return f"the pattern has no CuTe lowering: {exc}"
    return None


def dense_kind(pattern: Pattern, s: Shapes) -> str | None:
    """"full" or "causal" where FA4's own kernels need no hooks and no block sparsity."""
    if pattern.has_block_mask:
        return None
    if pattern.mask is ir.TRUE:
        return "full"
    if pattern.mask is _CAUSAL and s.Q == s.KV:
        return "causal"
    return None


def _plan(pattern: Pattern, s: Shapes, device):
    from .kernel import META_CACHE

    return META_CACHE.backward(pattern, s, TILE, device).plan  # the plan of mask, score and its derivative


def _roots(pattern: Pattern, s: Shapes) -> tuple[ir.Node, ...]:
    """mask, score, d(score)/d(raw score); the mask TRUE where FA4's own dense or causal kernel runs."""
    roots = kernel_roots(pattern, "backward")
    return ((ir.TRUE,) + roots[1:]) if dense_kind(pattern, s) is not None else roots


def hooks_source(pattern: Pattern, s: Shapes, device) -> str:
    """The CuTe-DSL source of the hooks this call runs (raises ir.IRError where it has none)."""
    import attncc

    return cute.generate(pattern, _roots(pattern, s), _specs(pattern), _plan(pattern, s, device), attncc.__version__)


def _specs(pattern: Pattern) -> dict[str, BufferSpec]:
    return {n: BufferSpec.of(n, t) for n, t in pattern.buffers.items()}


def hook_inputs(pattern: Pattern, s: Shapes, device) -> cute.HookInputs:
    """What the hooks read from aux_scalars, in order."""
    return cute.hook_inputs(pattern, _roots(pattern, s), _specs(pattern), _plan(pattern, s, device))


@dataclass(frozen=True)
class Native:
    """The mask as FA4's own masks (compiler/bands.py), no mask_mod and no block sparsity: `bands`,
    each an FA4 call on the slices q[q0:q1], kv[k0:k1] with its local window, their gradients summed
    in a fixed order; or `segments`, one varlen call whose sequences are the segments, batch and
    heads folded into FA4's head axis ([B, H, N, D] -> [N, B*H, D], a view of contiguous tensors)."""
    Q: int
    KV: int
    bands: tuple[bands.Band, ...] | None = None
    segments: bands.Segments | None = None
    cu_seqlens: torch.Tensor | None = None  # int32 [num_segments + 1] on the device

    def whole(self) -> bool:
        """One call covering every row: the forward runs it too (out and LSE need no merge)."""
        if self.segments is not None:
            return True
        b = self.bands[0]
        return len(self.bands) == 1 and (b.q0, b.q1, b.k0, b.k1) == (0, self.Q, 0, self.KV)

    def windows(self) -> list[tuple[int | None, int | None]]:
        if self.segments is not None:
            lo, hi = self.segments.lo, self.segments.hi
            return [(None if lo is None else -lo, hi)]
        return [b.window() for b in self.bands]

    def varlen_args(self) -> dict:
        """FA4's keyword arguments for the segments' varlen call (its window included)."""
        n = self.segments.longest
        return {**window_args(*self.windows()[0]), "cu_seqlens_q": self.cu_seqlens, "cu_seqlens_k": self.cu_seqlens,
                "max_seqlen_q": n, "max_seqlen_k": n}

    def calls(self) -> list[tuple[bands.Band, ...]]:
        """The backward's FA4 calls, each as its bands: one call per band, or the varlen call's
        segments (for cost.simulate_fa4_backward)."""
        if self.segments is None:
            return [(b,) for b in self.bands]
        o = self.segments.offsets.tolist()
        return [tuple(bands.Band(a, b, a, b, self.segments.lo, self.segments.hi) for a, b in zip(o, o[1:]) if b > a)]

    def describe(self) -> str:
        def mask(left, right):
            return ("dense" if left is None and right is None else "causal" if left is None and right == 0
                    else f"local window ({left}, {right})")
        if self.segments is not None:
            n = self.segments.offsets.numel() - 1
            return f"varlen: {n} segments (longest {self.segments.longest}), {mask(*self.windows()[0])} within each"
        return "; ".join(f"q [{b.q0}, {b.q1}) x kv [{b.k0}, {b.k1}) {mask(*b.window())}" for b in self.bands)


def native_plan(pattern: Pattern, s: Shapes, device) -> Native | None:
    """The pattern as FA4's own local / varlen masks at shapes s, or None: the mask must be an
    exact union of bands or segments (compiler/bands.py) with windows FA4 takes (>= 0), the score
    mod free of positions (the calls see sliced and folded indices), no block predicate."""
    if pattern.has_block_mask or ir.free_vars(pattern.score) - {ir.SCORE_VAR}:
        return None
    found = bands.bands(pattern.mask, pattern.params, s.Q, s.KV)
    if found and all(w is None or w >= 0 for b in found for w in b.window()):
        return Native(s.Q, s.KV, bands=found)
    seg = bands.segments(pattern.mask, pattern.params, pattern.buffers, s.Q, s.KV)
    if seg is not None and (seg.lo is None or seg.lo <= 0) and (seg.hi is None or seg.hi >= 0):
        return Native(s.Q, s.KV, segments=seg, cu_seqlens=seg.offsets.to(device=device, dtype=torch.int32))
    return None


@dataclass
class Call:
    """Everything one FA4 call needs for a pattern at some shapes; see `prepare`."""
    hooks: ModuleType | None
    causal: bool
    sparse: object | None         # BlockSparseTensorsTorch of the forward, or None (dense)
    lists: tuple | None           # (forward KernelMeta, BackwardMeta) the sparse tensors come from
    aux_scalars: tuple | None
    source: str
    inputs: cute.HookInputs
    buffers: tuple  # the tensors whose addresses are among aux_scalars (kept alive with the call)
    native: Native | None = None  # the mask as FA4's own local / varlen masks, where it is one
    _backward_sparse: dict = field(default_factory=dict)

    def text(self) -> str:
        """How attncc calls FA4 for this pattern, as Python comments (what `kern.source` ends with)."""
        hooks = [n for n in ("mask_mod", "score_mod", "score_mod_bwd") if self.mod(n) is not None]
        return call_text(self.causal, self.sparse is not None, hooks, self.inputs, self.native)

    def kind(self) -> str:
        """The forward's FA4 kernel: "dense", "causal", "local" / "varlen" (a whole Native plan) or
        "block-sparse"."""
        if self.sparse is None:
            return "causal" if self.causal else "dense"
        if self.native is not None and self.native.whole():
            return "varlen" if self.native.segments is not None else "local"
        return "block-sparse"

    def mod(self, name: str):
        return getattr(self.hooks, name, None) if self.hooks is not None else None

    def backward_sparse(self, deterministic: bool):
        """The transposed block-sparse tensors (q tiles per kv tile), with FA4's dQ write order
        when deterministic (built on first use)."""
        if self.lists is None:
            return None
        if deterministic not in self._backward_sparse:
            fa = _fa()
            fwd, bwd = self.lists
            order = order_full = None
            if deterministic:
                order, order_full = fa.dq_write_order(fwd.partial_num, fwd.partial_idx, fwd.full_num, fwd.full_idx,
                                                      bwd.partial_num, bwd.partial_idx, bwd.full_num, bwd.full_idx,
                                                      spt=False)
            self._backward_sparse[deterministic] = fa.Sparse(
                mask_block_cnt=bwd.partial_num, mask_block_idx=bwd.partial_idx, full_block_cnt=bwd.full_num,
                full_block_idx=bwd.full_idx, block_size=(TILE.BLOCK_M, TILE.BLOCK_N),
                dq_write_order=order, dq_write_order_full=order_full, spt=False if deterministic else None)
        return self._backward_sparse[deterministic]


def call_text(causal: bool, sparse: bool, hooks: list[str], inputs: cute.HookInputs,
              native: Native | None = None) -> str:
    """The FA4 calls attncc makes, as Python comments (see Call.text)."""
    lists = ("attncc's BlockMask at 128x128 (partial/full kv tiles per q tile)" if sparse
             else "None (FA4's own " + ("causal" if causal else "dense") + " kernel)")
    lines = ["How attncc calls FlashAttention-4 with these hooks (runtime/fa4.py), q/k/v as [B, N, H, D] views:",
             "  out, lse = flash_attn.cute.interface._flash_attn_fwd(q, k, v, softmax_scale=scale,",
             f"      causal={causal}, " + ", ".join(f"{n}={n}" for n in hooks if n != "score_mod_bwd") + ",",
             f"      block_sparse_tensors={lists},",
             f"      aux_scalars={len(inputs.params)} param(s)"
             + (f", {len(inputs.pointers)} buffer address(es) with their strides" if inputs.pointers else "")
             + (", the last valid " + " and ".join(inputs.bounds) if inputs.bounds else "")
             + " (runtime values), return_lse=True)",
             "  dq, dk, dv = flash_attn.cute.interface._flash_attn_bwd(..., deterministic=..., the same hooks"
             + (" and score_mod_bwd" if "score_mod_bwd" in hooks else "") + ",",
             "      block_sparse_tensors=" + ("the transposed lists (q tiles per kv tile), with FA4's dQ write order"
                                           " when deterministic)" if sparse else "None)"),
             "  or attncc's Triton backward on these out and lse (Kernel.config['backward'] says which, and why)"]
    if native is not None:
        varlen = native.segments is not None
        call = ("with cu_seqlens_q = cu_seqlens_k = the segments' offsets, max_seqlen_q/k = the longest, "
                "q/k/v folded to [N, B*H, D]" if varlen else "on q[q0:q1], kv[k0:k1] per band")
        lines += [f"The mask is FA4's own (compiler/bands.py): {native.describe()}.",
                  ("  The forward (instead of the call above) and the backward" if native.whole() else
                   "  The forward is the block-sparse call above; the backward") + " call FA4 without mask_mod and",
                  f"  block_sparse_tensors, window_size_left/right as listed, {call}" + ("" if varlen else ";"),
                  *([] if varlen else ["  each band's backward takes the whole attention's out and lse rows (its exact "
                                       "share), the shares summed in order"]),
                  "  (on SM90 only these masks run FA4's deterministic backward)"]
    return "\n".join("# " + line for line in lines)


def describe(pattern: Pattern, s: Shapes, device) -> str:
    """The hooks' source and the calls for `pattern` at shapes s, without FA4 installed."""
    dense = dense_kind(pattern, s)
    hooks = list(cute.hook_roots(pattern, _roots(pattern, s)))
    native = None if dense else native_plan(pattern, s, device)
    return hooks_source(pattern, s, device) + "\n\n" + call_text(dense == "causal", dense is None, hooks,
                                                                 hook_inputs(pattern, s, device), native) + "\n"


_CALLS = cache.LRU(64)  # (id(meta), id(bwd), native) -> (meta, bwd, Call): the ids stay theirs while kept
_HOOKS: dict = {}


def prepare(pattern: Pattern, s: Shapes, device, native: bool = True) -> Call:
    """The Call for `pattern` at shapes s on `device` (cached with the block mask it reads); native:
    run band / segment masks on FA4's own kernels (`native_plan`) where they are such."""
    from .kernel import META_CACHE

    fa = _fa()
    _, meta = META_CACHE.get(pattern, s, TILE, device)
    bwd = META_CACHE.backward(pattern, s, TILE, device)
    key = (id(meta), id(bwd), native)
    hit = _CALLS.get(key)
    if hit is not None and hit[0] is meta and hit[1] is bwd:
        return hit[2]
    dense = dense_kind(pattern, s)
    source = hooks_source(pattern, s, device)
    hooks = _load_hooks(source) if cute.hook_roots(pattern, _roots(pattern, s)) else None
    sparse = None
    if dense is None:
        sparse = fa.Sparse(mask_block_cnt=meta.partial_num, mask_block_idx=meta.partial_idx,
                           full_block_cnt=meta.full_num, full_block_idx=meta.full_idx,
                           block_size=(TILE.BLOCK_M, TILE.BLOCK_N))
    inputs = cute.hook_inputs(pattern, _roots(pattern, s), _specs(pattern), bwd.plan)
    scalars, held = aux_scalars(fa, inputs, pattern.params, meta.buffers, s)
    call = Call(hooks, dense == "causal", sparse, None if dense else (meta, bwd), scalars or None, source,
                inputs, held, None if dense or not native else native_plan(pattern, s, device))
    _CALLS.put(key, (meta, bwd, call))
    return call


def aux_scalars(fa, inputs: cute.HookInputs, params: dict, buffers: dict, s: Shapes) -> tuple[tuple, tuple]:
    """(FA4's aux_scalars for the hooks' `inputs`, the buffer tensors their addresses point into):
    each param's value in its CuTe type, each buffer's address and strides (bool buffers as
    uint8, all contiguous), Q - 1 / KV - 1. `fa`: what _fa() returns (its `cutlass` and `address`);
    `buffers` on the device the kernels run on."""
    held = {b: (buffers[b].view(torch.uint8) if buffers[b].dtype == torch.bool else buffers[b]).contiguous()
            for b, _ in inputs.pointers}
    types = dict(inputs.params)
    scalars = []
    for kind, name, d in inputs.scalar_slots():
        if kind == "param":
            scalars.append(getattr(fa.cutlass, types[name].split(".")[1])(params[name]))
        elif kind == "address":
            scalars.append(fa.address(held[name]))
        elif kind == "stride":
            scalars.append(fa.cutlass.Int32(held[name].stride(d)))
        else:
            scalars.append(fa.cutlass.Int32((s.Q if name == "q" else s.KV) - 1))
    return tuple(scalars), tuple(held.values())


def _load_hooks(source: str) -> ModuleType:
    """The hooks module (disk-cached like every generated module), each hook's __cute_hash__ set to
    the module's content hash: FA4 keys its compile cache by it, stable across processes."""
    with _LOCK:
        module = _HOOKS.get(source)
        if module is None:
            key = cache.cache_key({"kind": "fa4-hooks", "source": source})
            module = cache.load_kernel_module({"kind": "fa4-hooks", "source": source}, lambda: source)
            for name in ("mask_mod", "score_mod", "score_mod_bwd"):
                if hasattr(module, name):
                    getattr(module, name).__cute_hash__ = f"attncc-{name}-{key}"
            _HOOKS[source] = module
        return module


def forward(call: Call, q, k, v, scale: float):
    """(out [B, Hq, Q, Dv] in q's dtype, lse float32 [B, Hq, Q], natural log) from FA4's forward;
    out is a view of FA4's [B, Q, Hq, Dv] result (the torch.compile op makes it contiguous)."""
    fa = _fa()
    native = call.native if call.native is not None and call.native.whole() else None
    if native is not None and native.segments is not None:
        out, lse, *_ = fa.interface._flash_attn_fwd(
            *map(_fold, (q, k, v)), softmax_scale=scale, causal=False, score_mod=call.mod("score_mod"),
            aux_scalars=call.aux_scalars, return_lse=True, **native.varlen_args())
        return _unfold(out, q.shape[0]), lse.view(q.shape[:3])
    out, lse, *_ = fa.interface._flash_attn_fwd(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=call.causal,
        score_mod=call.mod("score_mod"), mask_mod=None if native else call.mod("mask_mod"),
        block_sparse_tensors=None if native else call.sparse, aux_scalars=call.aux_scalars, return_lse=True,
        **(window_args(*native.windows()[0]) if native else {}))
    return out.transpose(1, 2), lse


def window_args(left: int | None, right: int | None) -> dict:
    """FA4's keyword arguments for a local window (None: unbounded that side)."""
    return {"window_size_left": left, "window_size_right": right}


def _fold(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] -> [N, B*H, D] (FA4's varlen layout, batch folded into the heads; a view when
    x's batch and head strides merge, else a copy)."""
    B, H, N, D = x.shape
    return x.reshape(B * H, N, D).transpose(0, 1)


def _unfold(x: torch.Tensor, B: int) -> torch.Tensor:
    """[N, B*H, D] -> [B, H, N, D], a view."""
    N, BH, D = x.shape
    return x.transpose(0, 1).view(B, BH // B, N, D)


def backward_refusal(call: Call, pattern: Pattern, s: Shapes, deterministic: bool) -> str | None:
    """Why FA4's backward does not compute this call's gradients (None: it does); attncc's Triton
    backward then runs on FA4's forward outputs (the same out and LSE, checked against float64)."""
    if call.sparse is not None and deterministic and call.native is None:
        return "FA4's block-sparse backward is not deterministic on SM90 (kernel_options deterministic=False runs it)"
    return _gqa_refusal(pattern, s)


def _gqa_refusal(pattern: Pattern, s: Shapes) -> str | None:
    if s.Hq != s.Hkv and "h" in ir.free_vars(pattern.score) | ir.free_vars(pattern.mask):
        return "FA4's GQA backward failed attncc's float64 check on a head-dependent pattern (ALiBi, H200, 2026-12-01)"
    return None


def own_backward_calls(pattern: Pattern, s: Shapes, device, native: bool = True) -> list[tuple[bands.Band, ...]] | None:
    """The calls of FA4's own dense / causal / local / varlen backward for `pattern` at shapes s,
    each as its bands (what `backward` runs, deterministic), or None where another backward runs."""
    if _gqa_refusal(pattern, s) is not None:
        return None
    dense = dense_kind(pattern, s)
    if dense is not None:
        return [(bands.Band(0, s.Q, 0, s.KV, None, 0 if dense == "causal" else None),)]
    plan = native_plan(pattern, s, device) if native else None
    return None if plan is None else plan.calls()


def backward(call: Call, q, k, v, out, lse, dout, dlse, scale: float, deterministic: bool = True):
    """(dq, dk, dv) [B, H, N, D] from FA4's backward (see backward_refusal): views of FA4's
    [B, N, H, D] results, or with a Native plan the sums of its calls' gradients."""
    if call.native is not None:
        return _native_backward(call, q, k, v, out, lse, dout, dlse, scale, deterministic)
    fa = _fa()
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    dq, dk, dv = fa.interface._flash_attn_bwd(
        t(q), t(k), t(v), t(out), t(dout), lse.contiguous(), scale, call.causal, deterministic=deterministic,
        score_mod=call.mod("score_mod"), score_mod_bwd=call.mod("score_mod_bwd"), mask_mod=call.mod("mask_mod"),
        aux_scalars=call.aux_scalars,
        block_sparse_tensors=call.backward_sparse(deterministic),
        dlse=None if dlse is None else dlse.contiguous())
    return t(dq), t(dk), t(dv)


def _native_backward(call: Call, q, k, v, out, lse, dout, dlse, scale: float, deterministic: bool):
    """The gradients from FA4's own local / varlen backward, one call per band (a sliver band without a
    score mod: attncc's sliver kernel, runtime/sliver.py). Each call gets the whole attention's out
    and LSE for its rows, so it computes exactly its pairs' share (P and rowsum(dO * O) are global);
    the shares add up in a fixed order, in float32 where they overlap."""
    fa = _fa()
    native = call.native
    hooks = dict(score_mod=call.mod("score_mod"), score_mod_bwd=call.mod("score_mod_bwd"),
                 aux_scalars=call.aux_scalars, deterministic=deterministic)
    if native.segments is not None:
        grads = fa.interface._flash_attn_bwd(
            *map(_fold, (q, k, v, out, dout)), lse.reshape(-1, lse.shape[-1]).contiguous(), scale, False,
            dlse=None if dlse is None else dlse.reshape(-1, dlse.shape[-1]).contiguous(), **native.varlen_args(),
            **hooks)
        return tuple(_unfold(g, q.shape[0]) for g in grads)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    totals = tuple(torch.empty_like(x) for x in (q, k, v))
    spans = [(slice(b.q0, b.q1),) + (slice(b.k0, b.k1),) * 2 for b in native.bands]  # dq, dk, dv tokens
    direct = [_first_covers([sp[i] for sp in spans]) for i in range(3)]
    pieces: tuple[list, list, list] = ([], [], [])
    sides: list = []
    inputs_ready = (torch.cuda.current_stream(q.device).record_event()  # where the side streams start
                    if q.is_cuda and len(native.bands) > 1 else None)
    for n, (left, right) in enumerate(native.windows()):
        rows, cols, _ = spans[n]
        band = native.bands[n]
        with _band_stream(n, q, inputs_ready, sides):
            if sliver.runs(band, call.mod("score_mod") is not None):
                dq = totals[0][:, :, rows] if direct[0][n] else q.new_empty(q[:, :, rows].shape)
                grads = (dq, *sliver.backward(q, k, v, out, dout, lse, dlse, band, scale, dq))
                for i in (1, 2):
                    if direct[i][n]:
                        totals[i][:, :, cols].copy_(grads[i])
            else:
                outs = {name: t(totals[i][:, :, spans[n][i]]) for i, name in enumerate(("dq", "dk", "dv"))
                        if direct[i][n]}
                grads = tuple(t(g) for g in fa.interface._flash_attn_bwd(
                    t(q[:, :, rows]), t(k[:, :, cols]), t(v[:, :, cols]), t(out[:, :, rows]), t(dout[:, :, rows]),
                    lse[:, :, rows].contiguous(), scale, False,
                    dlse=None if dlse is None else dlse[:, :, rows].contiguous(), **window_args(left, right),
                    **outs, **hooks))
        for i, g in enumerate(grads):
            pieces[i].append((spans[n][i], None if direct[i][n] else g))
    if sides:
        main = torch.cuda.current_stream(q.device)
        for side in sides:
            main.wait_stream(side)
        for p in pieces:  # buffers made on a side stream, read and freed on this one
            for _, g in p:
                if g is not None:
                    g.record_stream(main)
    return tuple(_assemble(total, p) for total, p in zip(totals, pieces))


_SIDE_STREAMS: dict = {}  # (device index, band number) -> torch.cuda.Stream


@contextlib.contextmanager
def _band_stream(n: int, like: torch.Tensor, inputs_ready, sides: list):
    """Band n's FA4 backward: the first band's on the current stream, each later one's on a side
    stream of its own (appended to `sides`) that starts at `inputs_ready` (an event recorded on
    the current stream before the first band), so bands run side by side: a band that leaves SMs
    idle (sinks' sink columns, one program per head walking every q tile; FA4's deterministic dQ
    waits) lends them to the others. The current stream waits for the side streams afterwards."""
    if n == 0 or not like.is_cuda:
        yield
        return
    side = _SIDE_STREAMS.setdefault((like.device.index, n), torch.cuda.Stream(like.device))
    side.wait_event(inputs_ready)
    sides.append(side)
    with torch.cuda.stream(side):
        yield


def _first_covers(spans: list[slice]) -> list[bool]:
    """Which pieces write their gradient straight into the result: each that overlaps no earlier
    such piece (the others land in buffers that _assemble adds in)."""
    flags, taken = [], []
    for sl in spans:
        flags.append(all(sl.stop <= o.start or o.stop <= sl.start for o in taken))
        if flags[-1]:
            taken.append(sl)
    return flags


def _assemble(total: torch.Tensor, pieces: list) -> torch.Tensor:
    """`total` [B, H, N, D] completed from (token slice, gradient of those tokens) pieces, a piece
    given as None having been written into total[:, :, slice] already. Tokens no piece covers
    become zero, tokens one covers that piece, tokens several cover their sum in float32, rounded
    once (two 16-bit pieces: PyTorch's add, which computes in float32)."""
    n = total.shape[2]
    cuts = sorted({0, n} | {x for sl, _ in pieces for x in (sl.start, sl.stop)})
    for a, b in zip(cuts, cuts[1:]):
        here = total[:, :, a:b]
        parts = [here if g is None else g[:, :, a - sl.start:b - sl.start] for sl, g in pieces
                 if sl.start <= a and b <= sl.stop]
        if not parts:
            here.zero_()
        elif len(parts) == 1:
            if parts[0] is not here:
                here.copy_(parts[0])
        elif len(parts) == 2:
            torch.add(parts[0], parts[1], out=here)
        else:
            acc = parts[0].float()
            for g in parts[1:]:
                acc += g
            here.copy_(acc)
    return total
