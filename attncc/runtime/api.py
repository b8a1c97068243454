"""The public entry points: attention(), compile(), reference(), create_mask(), create_block_mask()."""
from __future__ import annotations

import math

import torch

from ..compiler import evaluate
from ..compiler.blockmask import BlockMask, build_block_mask
from ..compiler.domain import check_domain
from ..dsl import ir
from ..dsl.pattern import Pattern, block_pair
from .autograd import needs_grad
from .cache import LRU
from .choices import choose_decode, decode_shaped, profiled
from .decode import DecodeKernel, packed_verdict
from .fold import view_class
from .inputs import REFERENCE_DTYPES, check_kernel_head_dims, check_qkv, check_scale
from .kernel import Kernel, pattern_key

_REFERENCE_CHUNK = 1 << 26  # score elements materialised at once by the reference


FULL = Pattern(name="full")  # pattern=None: full attention


def as_pattern(pattern) -> Pattern:
    """`pattern` checked to be a Pattern; None is full attention (a ValueError says what to pass instead)."""
    if pattern is None:
        return FULL
    if callable(pattern) and not isinstance(pattern, Pattern):
        raise ValueError(f"pattern must be an attncc.Pattern, got the function {getattr(pattern, '__name__', pattern)!r}; "
                         "wrap it: ac.Pattern(mask_mod=fn) for a mask_mod(b, h, q_idx, kv_idx), "
                         "ac.Pattern(score_mod=fn) for a score_mod(score, b, h, q_idx, kv_idx), "
                         "or call attncc.flex.flex_attention as you would torch's")
    if not isinstance(pattern, Pattern):
        raise ValueError(f"pattern must be an attncc.Pattern (or None for full attention), got {type(pattern).__name__}")
    return pattern


def create_mask(pattern: Pattern, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int,
                device=None) -> torch.Tensor:
    """Dense bool mask [B, H, Q_LEN, KV_LEN]; B or H None broadcasts (size 1).

    B/H may be None only if the pattern does not read b/h (otherwise a ValueError: the mask
    would silently be wrong for every other batch or head).
    """
    pattern = as_pattern(pattern)
    reads = ir.free_vars(evaluate.token_mask(pattern))  # a score mod reading h is no concern here
    B, H = evaluate.check_size("B", B, "b" in reads), evaluate.check_size("H", H, "h" in reads)
    Q_LEN, KV_LEN = evaluate.check_size("Q_LEN", Q_LEN), evaluate.check_size("KV_LEN", KV_LEN)
    return evaluate.dense_mask(pattern, B, H, Q_LEN, KV_LEN, device)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern | None = None,
              scale: float | None = None, return_lse: bool = False):
    """Dense attention in float64 on the inputs' device: the oracle every kernel is checked against.

    q [B, Hq, Q, D], k [B, Hkv, KV, D], v [B, Hkv, KV, Dv] -> out float64 [B, Hq, Q, Dv]
    (and lse float64 [B, Hq, Q], natural log). Rows with no live key give zeros and lse = -inf.
    NaN as in SDPA's math path, except that masked-out positions never contribute: a NaN score or
    input at a live position makes its row NaN (lse too); a NaN or inf value (v) at a live
    position makes that entry of the output NaN; anything at a masked-out position, nothing.
    Memory is bounded at any length (2**26 scores at a time: heads, or query rows, in chunks).
    """
    s = check_qkv(q, k, v, REFERENCE_DTYPES)
    pattern = as_pattern(pattern)
    pattern.require_bound()
    scale = check_scale(scale, s.D)
    mask_ir = evaluate.token_mask(pattern)
    check_domain(pattern, (mask_ir, pattern.score), s.B, s.Hq, s.Q, s.KV, q.device)
    out = torch.empty(s.B, s.Hq, s.Q, s.Dv, dtype=torch.float64, device=q.device)
    lse = torch.empty(s.B, s.Hq, s.Q, dtype=torch.float64, device=q.device)
    # at most _REFERENCE_CHUNK scores at once: several heads of all rows, or rows of one head
    rows = max(1, min(s.Q, _REFERENCE_CHUNK // s.KV))
    heads = max(1, min(s.Hq, _REFERENCE_CHUNK // (rows * s.KV)))
    for b in range(s.B):
        for h0 in range(0, s.Hq, heads):
            h1 = min(s.Hq, h0 + heads)
            kv_heads = torch.arange(h0, h1, device=q.device) // s.group
            kf, vf = k[b, kv_heads].double(), v[b, kv_heads].double()
            for r0 in range(0, s.Q, rows):
                r1 = min(s.Q, r0 + rows)
                env = evaluate.index_env(1, h1 - h0, r1 - r0, s.KV, q.device)
                env["b"], env["h"], env["q"] = env["b"] + b, env["h"] + h0, env["q"] + r0
                scores = scale * (q[b, h0:h1, r0:r1].double() @ kf.transpose(-1, -2)).unsqueeze(0)
                if pattern.has_score_mod:
                    scores = evaluate.evaluate(pattern.score, {**env, "score": scores},
                                               pattern.params, pattern.buffers).double()
                live = evaluate.evaluate(mask_ir, env, pattern.params, pattern.buffers).bool()
                shape = (h1 - h0, r1 - r0, s.KV)
                out[b, h0:h1, r0:r1], lse[b, h0:h1, r0:r1] = _softmax_attention(
                    scores.expand(1, *shape)[0], live.expand(1, *shape)[0], vf)
    return (out, lse) if return_lse else out


def _softmax_attention(scores: torch.Tensor, live: torch.Tensor, v: torch.Tensor):
    """softmax(scores over the live keys) @ v with attncc's rules for empty rows and non-finite
    values (see `reference`). scores, live [H, Q, KV]; v [H, KV, Dv] -> out [H, Q, Dv], lse [H, Q]."""
    scores = scores.masked_fill(~live, -math.inf)
    row_max = scores.amax(-1, keepdim=True)  # NaN if a live score is
    row_max = torch.where(row_max == -math.inf, 0.0, row_max)
    p = torch.exp(scores - row_max)
    denom = p.sum(-1, keepdim=True)
    empty = denom == 0  # no live key, or every live score -inf
    bad = ~torch.isfinite(v)
    out = (p @ torch.where(bad, 0.0, v)) / torch.where(empty, 1.0, denom)
    out = torch.where(empty, 0.0, out)
    if bad.any():  # a non-finite value where it is live: NaN there, whatever its weight
        out = torch.where(live.double() @ bad.double() > 0, math.nan, out)
    lse = torch.where(empty, -math.inf, denom.log() + row_max).squeeze(-1)
    return out, lse


def _prepare(pattern, q, k, v, scale, kernel_options, return_lse):
    from .calibrate import profile_for
    from . import fa4
    from .choices import (AUTOTUNE_TOP, KernelChoice, backward_modelled, check_options, choose_backend,
                          choose_backward_tiles, choose_tiles, choose_tma, forced_tiles, ranked_candidates,
                          sdpa_refusal)
    from .kernel import TRITON_KEY

    if not isinstance(return_lse, bool):
        raise ValueError(f"return_lse must be a bool, got {return_lse!r}")
    s = check_qkv(q, k, v)
    if q.device.type == "meta":
        raise ValueError("q, k, v are meta tensors, which a kernel cannot run on: ac.compile(..., target=\"h200\") "
                         "or target=\"h100\" describes the kernel a GPU would run (config, source, predicted_ms)")
    check_kernel_head_dims(s.D, s.Dv)
    if q.is_cuda:
        TRITON_KEY.start()
    pattern = as_pattern(pattern)
    pattern.require_bound()
    options = check_options(kernel_options)
    scale = check_scale(scale, s.D)

    rankings = {}  # folded or not -> the simulator's ranking of that form's configurations

    def choose(kp, ks, layout, fold):  # (backend, forward tiles) of the kernels' form of the call
        backend, profile = choose_backend(kp, ks, q, options, return_lse, layout), profile_for(q.device)
        cudnn = sdpa_refusal(kp, ks, q.device.type, q.dtype, return_lse) is None
        ranked = ranked_candidates(kp, ks, q.dtype, q.device, options, backend, profile, cudnn=cudnn, layout=layout,
                                   fa4_runs=lambda: fa4.refusal(kp, ks, q) is None)
        if options.get("autotune") and ranked:
            ranked = [_fastest(kp, s, q, k, v, scale, ranked[:AUTOTUNE_TOP], layout, fold)]
        rankings[fold is not None] = ranked
        return ranked[0] if ranked else (backend, choose_tiles(ks, q.dtype, q.device, options))
    model = (profile_for(q.device), q.device) if q.is_cuda else None
    pattern, ks, layout, fold, (backend, tiles) = kernel_form(pattern, s, options, choose, (q, k, v), model)
    fallbacks = () if backend != "triton" else tuple(t for b, t in rankings[fold is not None][1:] if b == "triton")
    tma = choose_tma(ks, q.device, options)
    if layout is not None and tma:
        if options.get("tma"):
            raise ValueError("kernel_options tma=True reads contiguous kv rows, but this pattern's token "
                             "layout has the kernels gather them; leave tma unset")
        tma = False
    choice = KernelChoice(tiles, choose_backward_tiles(ks, q.dtype, q.device, options), backend,
                          tma, layout, options.get("deterministic", True), options.get("fa4_native", True),
                          *forced_tiles(options), backward_modelled(ks, q.dtype, q.device, options), fold=fold,
                          fallbacks=fallbacks)
    return pattern, s, scale, choice


def kernel_form(pattern: Pattern, s, options: dict, choose, tensors: tuple, model=None):
    """(the pattern the kernels run, their shapes, the token layout or None, the residue fold or
    None, choose's (backend, forward tiles) for them) for a call of `pattern` at shapes s on
    `tensors` (q, k, v: their memory layout picks the fold's mapping), where
    choose(kernel pattern, shapes, layout, fold) picks the backend and tiles of a form: folded where
    runtime/fold.fold_for folds it and the folded call runs on fa4 or has no token layout to keep;
    else in the layout's coordinates where the pattern has one and it applies to the lengths
    (compiler/layout.Layout.applies: Q_LEN = KV_LEN = its tokens; natural order where they differ);
    else the pattern itself. Where both a fold and a layout run on Triton, the form of least predicted
    time on `model` ((profile, the device block maps are built on) or None), the fold's copies
    (Fold.copied_bytes) at the profile's bandwidth included; unmodelled (choices.modelled_ms: no
    model, a dtype or head dim the profile lacks), the layout (attncc's Triton kernels gather its
    rows in place; the folded output is copied back: dilated on the H100, 0.756 ms in the layout
    against 0.888 folded, benchmarks/results/2026-12-06-nvidia-h100-fold-ways.md)."""
    from .fold import fold_for

    if pattern.layout is not None and not pattern.layout.applies(s.Q, s.KV):
        pattern = pattern.with_layout(None)  # a call of fewer queries than keys: natural order
    fold = fold_for(pattern, s, options, tensors)
    if fold is not None:
        folded = fold.pattern, fold.shapes(s), None, fold, choose(fold.pattern, fold.shapes(s), None, fold)
        if pattern.layout is None or folded[4][0] == "fa4":
            return folded
    kp = pattern.kernel_pattern
    laid = kp, s, pattern.layout, None, choose(kp, s, pattern.layout, None)
    if fold is not None and model is not None:
        from .choices import modelled_ms

        profile, lists = model
        dtype = tensors[0].dtype
        as_folded = modelled_ms(fold.pattern, fold.shapes(s), *folded[4], dtype, profile, lists)
        as_laid = modelled_ms(kp, s, *laid[4], dtype, profile, lists, pattern.layout)
        if as_folded is not None and as_laid is not None:
            out_bytes = s.B * s.Hq * s.Q * s.Dv * tensors[0].element_size()
            copy_ms = fold.copied_bytes(tensors, out_bytes) / (profile.hbm_tbps * 1e12) * 1e3
            if as_folded + copy_ms < as_laid:
                return folded
    return laid


def _fastest(pattern: Pattern, s, q, k, v, scale: float, candidates: list, layout, fold):
    """The (backend, forward tiles) whose forward measured fastest on these inputs (kernel_options
    autotune=True: the simulator's top few, each timed by do_bench; a candidate Triton refused for
    shared memory or registers is timed, and returned, at the smaller tiles it ran at:
    kernel.after_resource_refusal). s: the call's shapes."""
    from .calibrate import time_ms
    from .choices import KernelChoice, choose_backward_tiles

    backward = choose_backward_tiles(s if fold is None else fold.shapes(s), q.dtype, q.device, {})
    timed = []
    for backend, tiles in candidates:
        kern = Kernel(pattern, s, q.device, scale, KernelChoice(tiles, backward, backend, False, layout, fold=fold),
                      q.dtype)
        with torch.no_grad():
            ms = time_ms(lambda: kern.run(q, k, v, s, False), q.device)
        timed.append((ms, backend, kern.tiles))
    _, backend, tiles = min(timed, key=lambda t: t[0])
    return backend, tiles


def compile(pattern: Pattern | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
            scale: float | None = None, kernel_options: dict | None = None,
            page_table: torch.Tensor | None = None, kv_lens: torch.Tensor | None = None, target: str | None = None,
            cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None):
    """A Kernel for `pattern` at these inputs' shapes, dtype and device (q [B,Hq,Q,D], k/v [B,Hkv,KV,D]).

    target: a shipped profile ("h200", "h100"): a runtime/target.TargetKernel, the choice the
    automatic rules take on that GPU, with its config, source and predicted_ms, made on any
    machine (q, k, v may be meta tensors; it cannot be called). A dense call that would run the
    decode kernel there is a ValueError (its tiles and splits are chosen at run time; ac.explain
    with the target describes it).

    Where ac.attention would run the split-KV decode kernel (runtime/choices.choose_decode: paged
    caches k, v [num_pages, page_size, Hkv, D] with page_table and kv_lens, which compile takes
    for Q_LEN <= 64 only; packed sequences with cu_seqlens_q / cu_seqlens_k, which it takes where
    the decode kernel reads them; dense calls of a few queries over many keys), a
    runtime/decode.DecodeKernel (`.config["kernel"] == "decode"`, its kv_splits; called as
    kern(q, k, v, page_table=..., kv_lens=...) or kern(q, k, v, cu_seqlens_q=..., cu_seqlens_k=...)).

    `kern.source` is the generated source (Triton kernels, or the CuTe hooks and the call of the fa4
    backend), `kern.config` the backend and tiles/warps/stages, `kern.block_mask` the BlockMask,
    `kern(q, k, v)` runs it. kernel_options may set backend ("auto"; "triton": attncc's kernels;
    "fa4": FlashAttention-4's kernels with attncc's hooks; "sdpa-cudnn"; a forced backend that
    cannot run the call is a ValueError saying why; see runtime/choices.choose_backend),
    deterministic (default True: bitwise-reproducible gradients; False lets the fa4 backend run
    FA4's own block-sparse backward, whose dQ accumulation order varies; see fa4.backward_refusal),
    fa4_native (default True: masks that are unions of bands or segments run FA4's own local and
    varlen kernels, compiler/bands.py; False: its hooks and block lists, as every other mask), BLOCK_M,
    BLOCK_N, num_warps, num_stages (the Triton forward: any of them runs the triton backend, the
    simulator choosing the fields not set; with backend "fa4" a ValueError), dkdv_tiles and dq_tiles (the Triton
    backward's two kernels, each (BLOCK_M, BLOCK_N, num_warps, num_stages)), tma (True: read
    k/v through tensor descriptors where the strides allow, on Hopper or CPU; default: on CUDA for
    head dims above 128, where it measured faster) and autotune (True: time the cost simulator's
    AUTOTUNE_TOP best forward configurations on these inputs and take the fastest; where the
    simulator does not choose, runtime/choices.cost_choice, it changes nothing). A kernel Triton
    refuses at its first launch for want of shared memory (how much it needs depends on the
    pattern) runs with one pipeline stage fewer, `kern.config` saying so, unless kernel_options
    set its tiles: then a ValueError names them.
    """
    paged = page_table is not None or kv_lens is not None
    packed = cu_seqlens_q is not None or cu_seqlens_k is not None
    if target is not None:
        if packed:
            raise ValueError("ac.compile with a target describes the dense kernels; it takes no cu_seqlens")
        return _target_kernel(pattern, q, k, v, kernel_options, target, paged)
    if paged and (page_table is None or kv_lens is None):
        raise ValueError("a paged call needs both page_table and kv_lens")
    if packed and (paged or cu_seqlens_q is None or cu_seqlens_k is None):
        raise ValueError("a packed call needs both cu_seqlens_q and cu_seqlens_k (and no page_table or kv_lens)")
    with torch.no_grad():  # the choice for an inference call; the kernel falls back where grads are needed
        decode = (_packed_decode_kernel(pattern, q, k, v, scale, kernel_options, cu_seqlens_q, cu_seqlens_k)
                  if packed else _decode_kernel(pattern, q, k, v, scale, kernel_options, page_table, kv_lens, paged))
    if decode is not None:
        return decode
    if paged or packed:
        raise ValueError(f"ac.compile takes {'paged caches' if paged else 'packed sequences'} for the decode kernel "
                         "only (at most 64 queries per sequence, kernel_options without decode=False or another "
                         "backend); ac.attention runs the rest")
    pattern, s, scale, choice = _prepare(pattern, q, k, v, scale, kernel_options, False)
    return Kernel(pattern, s, q.device, scale, choice, q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern | None = None, *,
              scale: float | None = None, return_lse: bool = False, kernel_options: dict | None = None,
              page_table: torch.Tensor | None = None, kv_lens: torch.Tensor | None = None,
              cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None):
    """Attention of q [B,Hq,Q,D] over k, v [B,Hkv,KV,D|Dv] under `pattern` (None: full attention).

    Returns out [B,Hq,Q,Dv] in q's dtype, and lse float32 [B,Hq,Q] (natural log) when return_lse.
    Rows with no live key give zeros and lse = -inf. CPU tensors run the same generated kernel in
    Triton's interpreter. Kernels, and block masks per (pattern values, shapes, buffer versions),
    are cached: a repeated call does no compilation or mask building.

    Serving (runtime/sequences.py): with `page_table` (int32 [B, max_pages]) and `kv_lens` (int32
    [B]), k and v are paged caches [num_pages, page_size, Hkv, D]; with `cu_seqlens_q` /
    `cu_seqlens_k` (int32 [S + 1]), q [1, Hq, total_q, D] and k, v [1, Hkv, total_k, D] hold S
    sequences packed. Either way the pattern sees positions within each sequence, whose queries
    are its last tokens: query i of a sequence with L keys and Q_s queries sits at L - Q_s + i.

    Decode (runtime/decode.py; runtime/choices.choose_decode): paged calls with Q_LEN <= 64,
    packed calls of at most 64 queries per sequence (each with 0 keys or at least as many as the
    most queries of any), and dense calls of up to
    64 queries over at least 4096 keys, run the split-KV decode kernel, which reads the caches in
    place; kernel_options kv_splits sets its number of splits (default: the
    cost model's), decode=False / True forbids / forces it. It is inference only: where q, k, v or
    a buffer require grad, the call runs the dense kernels (paged caches gathered), which have a
    backward. Under torch.compile a paged or packed call, or a dense one the decode kernel takes or
    kv_splits splits, is one custom op, inference only.
    """
    paged = page_table is not None or kv_lens is not None
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    if torch.compiler.is_compiling() and (paged or varlen or _serving_call(pattern, q, k, v, kernel_options)):
        return _compiled_serving(q, k, v, as_pattern(pattern), scale, return_lse, kernel_options, page_table,
                                 kv_lens, cu_seqlens_q, cu_seqlens_k)  # one custom op (runtime/compiled_op.py)
    if varlen and not paged and cu_seqlens_q is not None and cu_seqlens_k is not None:
        decode = _packed_decode_kernel(pattern, q, k, v, scale, kernel_options, cu_seqlens_q, cu_seqlens_k)
        if decode is not None:
            return decode.run(q, k, v, None, None, return_lse, cu_seqlens_q, cu_seqlens_k)
    elif not varlen:
        decode = _decode_kernel(pattern, q, k, v, scale, kernel_options, page_table, kv_lens, paged)
        if decode is not None:
            return decode.run(q, k, v, page_table, kv_lens, return_lse)
    kernel_options = {n: x for n, x in (kernel_options or {}).items() if n != "decode"}
    if paged or varlen:
        from .sequences import paged_call, varlen_call

        if paged and varlen:
            raise ValueError("give page_table/kv_lens (paged caches) or cu_seqlens_q/cu_seqlens_k (packed "
                             "sequences), not both")
        if paged and (page_table is None or kv_lens is None):
            raise ValueError("a paged call needs both page_table and kv_lens")
        if varlen and (cu_seqlens_q is None or cu_seqlens_k is None):
            raise ValueError("a variable-length call needs both cu_seqlens_q and cu_seqlens_k")
        if paged:
            k, v, pattern = paged_call(q, k, v, as_pattern(pattern), page_table, kv_lens)
        else:
            pattern = varlen_call(q, k, as_pattern(pattern), cu_seqlens_q, cu_seqlens_k)
    if (kernel_options or {}).get("kv_splits", 1) != 1:
        from .sequences import merge_splits, split_kv

        if torch.compiler.is_compiling():  # without gradients the serving op took it (_serving_call)
            raise ValueError("kernel_options kv_splits with gradients does not run under torch.compile yet "
                             "(without gradients it does)")
        check_qkv(q, k, v)
        options = dict(kernel_options)
        q2, k2, v2, split, S = split_kv(q, k, v, as_pattern(pattern), options.pop("kv_splits"))
        out, lse = merge_splits(*attention(q2, k2, v2, split, scale=check_scale(scale, q.shape[-1]), return_lse=True,
                                           kernel_options=options), S)
        return (out, lse) if return_lse else out
    if torch.compiler.is_compiling():  # one custom op (runtime/compiled_op.py) for torch.compile
        return _compiled_attention(q, k, v, as_pattern(pattern), scale, return_lse, kernel_options)
    kern, s = _kernel_for(pattern, q, k, v, scale, kernel_options, return_lse, reuse=not (paged or varlen))
    return kern.run(q, k, v, s, return_lse)


def _target_kernel(pattern, q, k, v, kernel_options, target: str, paged: bool):
    from .choices import TARGETS, check_options
    from .target import TargetKernel

    if target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    if paged:
        raise ValueError("ac.compile with a target describes the dense kernels; it takes no page_table / kv_lens")
    s = check_qkv(q, k, v)
    pattern = as_pattern(pattern)
    pattern.require_bound()
    options = check_options(kernel_options)
    if choose_decode(pattern, s.Q, s.KV, options, False):
        raise ValueError(f"on a GPU this call (Q_LEN {s.Q} over {s.KV} keys) runs attncc's split-KV decode kernel, "
                         "whose tiles and splits are chosen at run time: ac.explain(..., target=) describes it")
    kp, ks, layout, fold, chosen = kernel_form(pattern, s, options, _target_choice(q.dtype, target, options),
                                               (q, k, v), _target_model(target))
    return TargetKernel(kp, ks, q.dtype, target, options, layout, fold, chosen)


def _target_model(target: str):
    """kernel_form's `model` for the GPU `target` names: its shipped profile, block maps on the CPU."""
    from ..compiler.cost import load_profile

    return load_profile(target), torch.device("cpu")


def _target_choice(dtype, target: str, options: dict):
    """kernel_form's `choose` for a run on the GPU `target` names (runtime/choices.choose_on_target)."""
    from .choices import choose_on_target

    return lambda kp, ks, layout, fold: choose_on_target(kp, ks, dtype, target, options, layout)


def _kernel_for(pattern, q, k, v, scale, kernel_options, return_lse, reuse: bool = True):
    """(Kernel, Shapes) for this call; a repeat of a recent call (a pattern of the same value and
    layout, buffers by version, shapes, dtypes, device, scale and options) reuses its Kernel,
    skipping the choice (block-map lookups, FA4's refusal, the cost model): a few microseconds
    instead of a millisecond of Python before each launch. reuse=False (paged and packed calls,
    whose rewritten pattern is new every call): never kept."""
    s = check_qkv(q, k, v)
    pat = as_pattern(pattern)
    key = None
    if reuse:
        key = pattern_key(pat) + (pat.layout, s, q.dtype, k.dtype, v.dtype, q.device, scale, return_lse,
                                  _frozen(kernel_options or {}), view_class(q, k, v))

    def make():
        kernel_pattern, _, scale_, choice = _prepare(pat, q, k, v, scale, kernel_options, return_lse)
        return Kernel(kernel_pattern, s, q.device, scale_, choice, q.dtype)
    return _reused(_KERNELS, key, make), s


def _frozen(value):
    """kernel_options as a hashable key: dicts as sorted item tuples, lists as tuples (tiles given
    as [BLOCK_M, BLOCK_N, num_warps, num_stages], e.g. from JSON, reuse their Kernel too)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _reused(kernels: LRU, key: tuple | None, make):
    """kernels[key], else make() kept under key (never where key is None or unhashable)."""
    try:
        hash(key)
    except TypeError:  # an unhashable option value: no reuse
        key = None
    kern = None if key is None else kernels.get(key)
    if kern is None:
        kern = make()
        if key is not None:
            kernels.put(key, kern)
    return kern


_KERNELS = LRU(16)  # call key -> Kernel; each holds its block masks: a few recent calls, not a second cache


def _four_dim(*tensors) -> bool:
    return all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in tensors)


def _runs_decode(pattern, q, k, v, options: dict, paged: bool) -> bool:
    """Whether runtime/choices.choose_decode takes this paged (or dense) call of 4-dim q, k, v."""
    if not _four_dim(q, k, v):
        return False  # the other paths say what is wrong
    KV = None if paged else k.shape[2]
    if options.get("decode") is None and not decode_shaped(q.shape[2], KV):
        return False  # a training-shaped call: skip the rest of the choice (a third of its Python)
    pattern = as_pattern(pattern)
    return choose_decode(pattern, q.shape[2], KV, options, needs_grad(pattern, q, k, v))


def _decode_kernel(pattern, q, k, v, scale, kernel_options, page_table, kv_lens, paged: bool):
    """The DecodeKernel (runtime/decode.py) for this call where runtime/choices.choose_decode picks
    it (never under torch.compile nor with gradients required), else None. Reused while the
    pattern's value, shapes, dtypes, scale and options repeat (a step's layers, the next steps):
    on the CPU 89 instead of 205 us of Python per call before the launch."""
    options = kernel_options or {}
    if torch.compiler.is_compiling() or (paged and (page_table is None or kv_lens is None)):
        return None  # the other paths say what is wrong
    if not _runs_decode(pattern, q, k, v, options, paged):
        return None
    pattern = as_pattern(pattern)
    key = pattern_key(pattern) + (tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, k.dtype, v.dtype,
                                  q.device, scale, paged, tuple(sorted(options.items())))
    return _reused(_DECODE_KERNELS, key, lambda: DecodeKernel(
        pattern, q, k, v, scale=scale, kernel_options=options, page_table=page_table if paged else None,
        kv_lens=kv_lens if paged else None))


def _packed_decode_kernel(pattern, q, k, v, scale, kernel_options, cu_seqlens_q, cu_seqlens_k):
    """The DecodeKernel that reads a packed call's k, v in place (its queries padded to the most of
    any sequence, Q_LEN, where each sequence has 0 or at least Q_LEN keys: sequences.decode_queries)
    where runtime/choices.choose_decode takes it (as for a paged call), else None (the dense kernels
    over the packed call). Checks the cu_seqlens once per version (decode.packed_verdict)."""
    options = kernel_options or {}
    if torch.compiler.is_compiling() or not _four_dim(q, k, v):
        return None  # the other paths say what is wrong
    pattern = as_pattern(pattern)
    Q_LEN = packed_verdict(q, k, v, cu_seqlens_q, cu_seqlens_k)[2]
    if Q_LEN is None:
        if options.get("decode") is True:
            raise ValueError("kernel_options decode=True cannot run this call: a packed sequence has fewer keys "
                             "than the most queries of any (or none has queries)")
        return None
    if not choose_decode(pattern, Q_LEN, None, options, needs_grad(pattern, q, k, v)):
        return None
    key = pattern_key(pattern) + (tuple(q.shape), tuple(k.shape[:2]), tuple(k.shape[3:]), tuple(v.shape[:2]),
                                  tuple(v.shape[3:]), Q_LEN, q.dtype, k.dtype, v.dtype, q.device, scale, "packed",
                                  tuple(sorted(options.items())))
    return _reused(_DECODE_KERNELS, key, lambda: DecodeKernel(
        pattern, q, k, v, scale=scale, kernel_options=options, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k))


_DECODE_KERNELS = LRU(16)  # call key -> DecodeKernel: a decode step's next layer skips its checks and choices


def _compiled_attention(q, k, v, pattern: Pattern, scale, return_lse: bool, kernel_options):
    from .compiled_op import attention_op, options_json

    out, lse = attention_op(q, k, v, list(pattern.buffers.values()), pattern.uid, options_json(kernel_options),
                            scale)  # natural token order in and out: the Kernel folds or permutes
    return (out, lse) if return_lse else out


def _serving_call(pattern, q, k, v, kernel_options) -> bool:
    """Whether a dense call without gradients runs the serving path: the decode kernel (as the
    eager call chooses it: _runs_decode) or the keys split (kernel_options kv_splits)."""
    options = kernel_options or {}
    if options.get("kv_splits", 1) == 1:
        return _runs_decode(pattern, q, k, v, options, paged=False)  # the eager call's choice
    return _four_dim(q, k, v) and not needs_grad(as_pattern(pattern), q, k, v)


def _compiled_serving(q, k, v, pattern: Pattern, scale, return_lse: bool, kernel_options, page_table, kv_lens,
                      cu_seqlens_q, cu_seqlens_k):
    """A paged or packed call, or a dense one the decode kernel takes or kv_splits splits, under
    torch.compile: compiled_op.serving_op, inference only (the eager call's gradients gather the
    pages into dense tensors, which a graph would rather do itself)."""
    from .compiled_op import options_json, serving_op

    if needs_grad(pattern, q, k, v):
        raise ValueError("paged and variable-length calls under torch.compile are inference only: call them "
                         "under torch.no_grad() (or without torch.compile to get gradients)")
    out, lse = serving_op(q, k, v, page_table, kv_lens, cu_seqlens_q, cu_seqlens_k, list(pattern.buffers.values()),
                          pattern.uid, options_json(kernel_options), scale)
    return (out, lse) if return_lse else out


def prepare_kernel(pattern: Pattern, q, k, v, scale, kernel_options: dict):
    """(Kernel, Shapes) for these inputs, what the torch.compile custom ops and context
    parallelism call on every call: never the SDPA dispatch (they return the LSE, which SDPA does
    not); a repeat of a recent call reuses its Kernel (_kernel_for: on a CPU 91 -> ~10 us)."""
    return _kernel_for(pattern, q, k, v, scale, kernel_options, True)


def explain(pattern: Pattern | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
            target: str | None = None, kernel_options: dict | None = None, png: str | None = None,
            plan=None) -> str:
    """The cost model's report for this call (compiler/cost.py): tile classes (EMPTY / PARTIAL /
    FULL counts), live-pair density and tile efficiency (live pairs / pairs in computed tiles),
    the roofline time at the profile's peak matrix rate and bandwidth, and the forward
    configurations the simulator compares with their predicted times, the one that runs marked.

    target: a shipped profile ("h200", "h100") to explain a run there from any machine (q, k, v
    may then be meta tensors; block masks are built on the CPU); None: q's device and the profile
    matching its GPU's name (else "generic"). png: also write a picture of the block map of
    (b, h) = (0, 0) and each query tile's predicted load there (needs matplotlib). plan: a
    ShardPlan for these lengths: also its per-rank load and the predicted ring / all-gather times
    of context_parallel_attention (q, k, v the whole sequence's).
    """
    from ..compiler import cost
    from .calibrate import profile_for
    from .choices import (SDPA_CUDNN, TARGETS, check_options, choose_tiles, layout_copies_ms, sdpa_refusal,
                          triton_candidates)
    from . import fa4

    s = check_qkv(q, k, v)
    pattern = as_pattern(pattern)
    pattern.require_bound()
    options = check_options(kernel_options)
    if target is not None and target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    if target is None and q.device.type == "meta":
        raise ValueError("meta tensors need a target (e.g. target='h200'): there is no device to ask")
    profile = profile_for(q.device, target)
    if target is not None:
        lists = torch.device("cpu")
        kp, ks, layout, fold, chosen = kernel_form(pattern, s, options, _target_choice(q.dtype, target, options),
                                                   (q, k, v), _target_model(target))
        why_not_fa4 = fa4.refusal_on(kp, ks, TARGETS[target][1], q.dtype, lists, assume_installed=True)
        cudnn = sdpa_refusal(kp, ks, "cuda", q.dtype, False, assume_installed=True) is None
    else:
        lists = q.device
        kp, _, _, choice = _prepare(pattern, q, k, v, None, options, False)
        layout, fold = choice.layout, choice.fold
        ks = s if fold is None else fold.shapes(s)
        chosen = (choice.backend, choice.tiles)
        why_not_fa4 = fa4.refusal(kp, ks, q)
        cudnn = sdpa_refusal(kp, ks, q.device.type, q.dtype, False) is None
    fa4_ok = why_not_fa4 is None
    candidates = [("triton", t) for t in triton_candidates(ks.D)]
    if chosen[0] == "triton" and chosen[1] not in triton_candidates(ks.D):
        candidates.append(chosen)
    if fa4_ok and profile.models("fa4", ks.D):
        candidates.append(("fa4", fa4.TILE))
    if chosen[0] == SDPA_CUDNN or cudnn:  # listed where it runs or could, at the tiles it keeps for the rest
        candidates.append(chosen if chosen[0] == SDPA_CUDNN else
                          (SDPA_CUDNN, choose_tiles(ks, q.dtype, torch.device("cuda"), options)))
    copies = {"fa4": layout_copies_ms(ks, profile)} if layout is not None and fa4_ok else {}
    decode = choose_decode(pattern, s.Q, s.KV, options, False)
    text = cost.report(kp, ks, q.dtype, lists, profile, chosen, candidates, png, forward_runs=not decode,
                       copies_ms=copies)
    if not profiled(ks, q.dtype):
        text += (f"\nnot modelled: the profiles price fp16 / bf16 calls whose D and Dv share a head-dim class "
                 f"(this call: {q.dtype}, D={ks.D}, Dv={ks.Dv}); the times above are the nearest modelled call's, "
                 "to rank, not to time, and Kernel.predicted_ms is None")
    if fold is not None:
        text += f"\nruns folded: {fold.describe()}; the report above is the folded call's"
    if chosen[0] == SDPA_CUDNN and not decode:  # a decode call runs the decode kernel (below)
        text += ("\nruns: sdpa-cudnn (SDPA's cuDNN kernel" + ("" if profile.models(SDPA_CUDNN, ks.D) else
                                                            f", not modelled at head dim {ks.D} in this profile") +
                 "; a call asking for the LSE runs the Triton kernels at its tiles)")
    if decode:  # fa4 does not run decode calls: no word on it
        config = None if target is not None else DecodeKernel(pattern, q, k, v, kernel_options=kernel_options).config
        how = ("tiles and kv_splits chosen at run time (choices.choose_decode_tiles, cost.decode_splits)"
               if config is None else
               f"{config['BLOCK_M']}x{config['BLOCK_N']} tiles, kv_splits {config['kv_splits']}")
        text += f"\nruns: attncc's split-KV decode kernel (runtime/decode.py), {how}"
    elif not fa4_ok:
        text += f"\nfa4 cannot run this call: {why_not_fa4}"
    elif chosen[0] == "fa4" and fa4.dense_kind(kp, ks) is None and options.get("fa4_native", True):
        native = fa4.native_plan(kp, ks, lists)
        if native is not None:
            text += (f"\nfa4 runs the mask as FA4's own masks (compiler/bands.py), "
                     f"{'forward and backward' if native.whole() else 'in the backward'}: {native.describe()}")
    elif chosen[0] != "fa4":
        text += ("\nfa4 could run this call on permuted copies of q, k, v and the output (priced above at the "
                 "profile's bandwidth); attncc's Triton kernels gather the token layout's rows in place"
                 + ("" if profile.models("fa4", ks.D) else " (runtime/choices.fa4_measured_faster)")
                 if layout is not None else "\nfa4 could run this call; the marked one runs (runtime/choices.py)")
    text += "\n" + _backward_line(kp, ks, q.dtype, lists, options, profile, chosen[0])
    if plan is not None:
        from .parallel import explain_text

        text += "\n\n" + explain_text(plan, s, q.dtype, profile)
    return text


def _backward_line(pattern: Pattern, s, dtype, lists: torch.device, options: dict, profile, backend: str) -> str:
    """explain's lines on the backward: FA4's own backward predicted by cost.simulate_fa4_backward
    where it can run, attncc's Triton backward by cost.simulate_backward (where the profile models
    them), the one that runs marked (choices.fa4_backward_model_refusal decides between them)."""
    from .choices import (backward_modelled, choose_backward_tiles, fa4_own_backward_ms, modelled_backward_candidates,
                          pick_backward_tiles, triton_backward_ms)

    if backend == "sdpa-cudnn":
        return "backward: SDPA's cuDNN backward (not modelled)"
    deterministic = options.get("deterministic", True)
    native = options.get("fa4_native", True)
    cuda = torch.device("cuda")
    tiles = pick_backward_tiles(pattern, s, dtype, options, lists, profile)
    modelled = (modelled_backward_candidates(profile, choose_backward_tiles(s, dtype, cuda, options), s.D)
                if backward_modelled(s, dtype, cuda, options) else [])
    others = [c for c in modelled if c != tiles] if len(modelled) > 1 else []  # the pick's runners-up
    mine = triton_backward_ms(pattern, s, tiles, lists, profile)
    lines, fa4_runs = [], False
    if backend == "fa4":
        from . import fa4, sliver

        own = fa4.own_backward_calls(pattern, s, lists, native)
        how = "deterministic" if deterministic else "nondeterministic"
        if own is None and not deterministic and fa4.dense_kind(pattern, s) is None:
            lines.append("backward: FA4's block-sparse backward, nondeterministic (not modelled)")
            fa4_runs = True
        elif own is not None:
            ms = fa4_own_backward_ms(own, pattern, s, deterministic, profile)
            fa4_runs = ms is None or mine is None or mine >= ms
            slivers = sum(len(c) == 1 and sliver.runs(c[0], pattern.has_score_mod) for c in own)
            lines.append(f"backward: FA4's own kernels, {len(own) - slivers} call(s)"
                         + (f" and {slivers} sliver band(s) on attncc's kernel" if slivers else "") + f", {how}: " +
                         (f"no model at head dim {s.D} in the {profile.key!r} profile" if ms is None else
                          f"predicted {ms:.3f} ms (cost.simulate_fa4_backward)") + (" <- runs" if fa4_runs else ""))
    if mine is None:
        return lines[0] if lines else f"backward: no model at head dim {s.D} in the {profile.key!r} profile"
    lines.append(f"{'  attncc' if lines else 'backward: attncc'}'s Triton dK/dV {tiles.dkdv} + dQ {tiles.dq}: "
                 f"predicted {mine:.3f} ms" + ("" if not lines else " (not what runs)" if fa4_runs else " <- runs"))
    for other in others:
        lines.append(f"  runner-up: Triton dK/dV {other.dkdv} + dQ {other.dq}: predicted "
                     f"{triton_backward_ms(pattern, s, other, lists, profile):.3f} ms (choices.model_backward_tiles)")
    return "\n".join(lines)


def create_block_mask(pattern: Pattern | None, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int,
                      block_size: int | tuple[int, int] = 128, device=None) -> BlockMask:
    """Every tile of the mask classified EMPTY / PARTIAL / FULL, as the kernels' index lists.

    block_size: int or (BLOCK_M, BLOCK_N) (query rows, key columns per tile). B or H None
    broadcasts, allowed only when the mask ignores b or h. device: where the lists live (default:
    the pattern's buffers' device, else CPU). Built symbolically in O(tiles): no dense mask.
    """
    pattern = as_pattern(pattern)
    rows, cols = block_pair(block_size)
    return build_block_mask(pattern, B, H, Q_LEN, KV_LEN, rows, cols, device)
