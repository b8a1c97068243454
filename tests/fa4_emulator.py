"""A CPU stand-in for the slice of FlashAttention-4's API runtime/fa4.py calls, with FA4's documented
semantics, so the fa4 backend's wiring (layouts, block-sparse lists, hooks, aux scalars and
tensors, LSE, the backward's routing, local windows and varlen batches) is tested without a GPU. The hooks run through
tests/cute_shim.py, element by element; the arithmetic around them is float64 torch.

Semantics emulated: q/k/v arrive as [B, N, H, D] views; with block-sparse tensors, a query tile's
FULL kv tiles are live without mask_mod, its PARTIAL ones where mask_mod says, the rest dead;
without them, every pair (causal=False) or kv <= q (causal=True) is live, and a local window
(window_size_left / _right, None: unbounded, causal meaning right = 0) keeps local row i and
column j where j - i - (Sk - Sq) lies in [-left, right] (aligned bottom-right, as FA4's mask.py);
varlen calls (cu_seqlens_q / _k) take q/k/v as [total, H, D] and lse as [H, total], each sequence
attending on its own; score_mod sees the scaled score; rows with no live key give out 0 and lse
-inf; the backward applies score_mod_bwd to dS."""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import NamedTuple

import torch

import cute_shim

I32, F32 = cute_shim._Type("i32"), cute_shim._Type("f32")


class Sparse(NamedTuple):
    mask_block_cnt: torch.Tensor
    mask_block_idx: torch.Tensor
    full_block_cnt: torch.Tensor | None = None
    full_block_idx: torch.Tensor | None = None
    cu_total_m_blocks: torch.Tensor | None = None
    cu_block_idx_offsets: torch.Tensor | None = None
    block_size: tuple | None = None
    dq_write_order: torch.Tensor | None = None
    dq_write_order_full: torch.Tensor | None = None
    spt: bool | None = None


def _scalar_hook(fn, lanes, *extra, **kw):
    """fn at one element: `lanes` (value, type) pairs as one-lane SSA vectors, then `extra`."""
    out = fn(*[cute_shim.SSA([x], t) for x, t in lanes], *extra, **kw)
    return out[0].v


def window_mask(Q, KV, left, right):
    """FA4's local window on Q rows x KV columns, aligned bottom-right: row i, column j live where
    j - i - (KV - Q) lies in [-left, right] (None: unbounded that side)."""
    d = torch.arange(KV)[None] - torch.arange(Q)[:, None] - (KV - Q)
    live = torch.ones(Q, KV, dtype=torch.bool)
    if left is not None:
        live &= d >= -left
    if right is not None:
        live &= d <= right
    return live


def _live(B, H, Q, KV, causal, sparse, mask_mod, aux, window=(None, None)):
    if sparse is None:
        left, right = window
        return window_mask(Q, KV, left, 0 if causal else right).expand(B, H, Q, KV)
    live = torch.zeros(B, H, Q, KV, dtype=torch.bool)
    BM, BN = sparse.block_size
    for b in range(B):
        for h in range(H):
            for qt in range(math.ceil(Q / BM)):
                rows = range(qt * BM, min(Q, qt * BM + BM))
                pick = lambda t: t[min(b, t.shape[0] - 1), min(h, t.shape[1] - 1)]  # noqa: E731 — broadcast dims
                for n in range(int(pick(sparse.full_block_cnt)[qt])):
                    kt = int(pick(sparse.full_block_idx)[qt, n])
                    live[b, h, rows.start:rows.stop, kt * BN:min(KV, kt * BN + BN)] = True
                for n in range(int(pick(sparse.mask_block_cnt)[qt])):
                    kt = int(pick(sparse.mask_block_idx)[qt, n])
                    for i in rows:
                        for j in range(kt * BN, min(KV, kt * BN + BN)):
                            live[b, h, i, j] = bool(_scalar_hook(
                                mask_mod, [(b, I32), (h, I32), (i, I32), (j, I32)], None, aux[0], aux[1]))
    return live


def _modded(scores, live, score_mod, aux):
    if score_mod is None:
        return scores
    out = scores.clone()
    for b, h, i, j in live.nonzero().tolist():
        out[b, h, i, j] = _scalar_hook(score_mod, [(float(scores[b, h, i, j]), F32), (b, I32), (h, I32)],
                                       q_idx=cute_shim.SSA([i], I32), kv_idx=cute_shim.SSA([j], I32),
                                       seqlen_info=None, aux_tensors=aux[0], aux_scalars=aux[1])
    return out


def _expand(t, H):
    return t.repeat_interleave(H // t.shape[1], dim=1)


def _forward_parts(q, k, v, scale, causal, score_mod, mask_mod, sparse, aux, window=(None, None)):
    assert mask_mod is None or window == (None, None), "FA4 drops its window when a mask_mod is given"
    qf, kf, vf = (x.transpose(1, 2).double() for x in (q, k, v))  # [B, H, N, D]
    B, H, Q, _ = qf.shape
    kf, vf = _expand(kf, H), _expand(vf, H)
    raw = scale * qf @ kf.transpose(-1, -2)
    live = _live(B, H, Q, kf.shape[2], causal, sparse, mask_mod, aux, window)
    modded = _modded(raw, live, score_mod, aux).masked_fill(~live, -math.inf)
    m = modded.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), 0.0, m)
    p = torch.exp(modded - m)
    denom = p.sum(-1, keepdim=True)
    empty = denom == 0
    p = p / torch.where(empty, 1.0, denom)
    lse = torch.where(empty, -math.inf, denom.log() + m).squeeze(-1)
    return qf, kf, vf, raw, live, p, p @ vf, lse


def _aux(aux_tensors, aux_scalars):
    assert aux_tensors is None, "attncc passes buffers as addresses among aux_scalars"
    return None, aux_scalars


def _sequences(cu_q, cu_k):
    """The (rows, cols) token slices of each sequence of a varlen call."""
    return [(slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1])))
            for i in range(cu_q.numel() - 1)]


def flash_attn_fwd(q, k, v, softmax_scale, causal=False, score_mod=None, mask_mod=None, block_sparse_tensors=None,
                   aux_tensors=None, aux_scalars=None, return_lse=True, window_size_left=None, window_size_right=None,
                   cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, **unused):
    assert not unused, unused
    assert q.stride(-1) == 1
    if cu_seqlens_q is not None:
        assert q.dim() == 3 and block_sparse_tensors is None and max_seqlen_q >= int(cu_seqlens_q.diff().max())
        parts = [flash_attn_fwd(q[r][None], k[c][None], v[c][None], softmax_scale, causal, score_mod, mask_mod,
                                aux_tensors=aux_tensors, aux_scalars=aux_scalars, window_size_left=window_size_left,
                                window_size_right=window_size_right)[:2]
                 for r, c in _sequences(cu_seqlens_q, cu_seqlens_k)]  # [1, n, H, D], [1, H, n]
        return torch.cat([o[0] for o, _ in parts]), torch.cat([x[0] for _, x in parts], dim=1), None, None, None
    assert q.dim() == 4
    *_, out, lse = _forward_parts(q, k, v, softmax_scale, causal, score_mod, mask_mod, block_sparse_tensors,
                                  _aux(aux_tensors, aux_scalars), (window_size_left, window_size_right))
    return out.transpose(1, 2).to(q.dtype), lse.float(), None, None, None


def flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale, causal, deterministic=False, score_mod=None,
                   score_mod_bwd=None, mask_mod=None, aux_tensors=None, aux_scalars=None, block_sparse_tensors=None,
                   dlse=None, window_size_left=None, window_size_right=None, cu_seqlens_q=None, cu_seqlens_k=None,
                   max_seqlen_q=None, max_seqlen_k=None, dq=None, dk=None, dv=None):
    if any(x is not None for x in (dq, dk, dv)):  # FA4 writes into given outputs of the inputs' shapes
        grads = flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale, causal, deterministic, score_mod, score_mod_bwd,
                               mask_mod, aux_tensors, aux_scalars, block_sparse_tensors, dlse, window_size_left,
                               window_size_right, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        for given, g in zip((dq, dk, dv), grads):
            if given is not None:
                assert given.shape == g.shape and given.dtype == g.dtype
                given.copy_(g)
        return tuple(g if given is None else given for given, g in zip((dq, dk, dv), grads))
    if cu_seqlens_q is not None:
        assert q.dim() == 3 and lse.shape == (q.shape[1], q.shape[0])
        parts = [flash_attn_bwd(q[r][None], k[c][None], v[c][None], out[r][None], dout[r][None], lse[None, :, r],
                                softmax_scale, causal, deterministic, score_mod, score_mod_bwd, mask_mod, aux_tensors,
                                aux_scalars, None, None if dlse is None else dlse[None, :, r], window_size_left,
                                window_size_right)
                 for r, c in _sequences(cu_seqlens_q, cu_seqlens_k)]
        return tuple(torch.cat([p[i][0] for p in parts]) for i in range(3))
    aux = _aux(aux_tensors, aux_scalars)
    qf, kf, vf, raw, live, p, o, lse64 = _forward_parts(q, k, v, softmax_scale, causal, score_mod, mask_mod,
                                                        block_sparse_tensors, aux,
                                                        (window_size_left, window_size_right))
    # P and rowsum(dO * O) from the given out and lse, as FA4 does (attncc's bands pass the whole
    # attention's): p, normalised by this call's own lse, rescaled to the given one
    o = out.transpose(1, 2).double()
    given = lse.double()[..., None]
    p = torch.where(torch.isinf(given), 0.0, p * torch.exp(torch.where(torch.isinf(lse64[..., None]), given,
                                                                       lse64[..., None]) - given))
    do = dout.transpose(1, 2).double()
    delta = (do * o).sum(-1, keepdim=True)
    if dlse is not None:
        delta = delta - torch.where(torch.isinf(given[..., 0]), 0.0, dlse.double())[..., None]
    ds = p * (do @ vf.transpose(-1, -2) - delta)
    if score_mod_bwd is not None:
        for b, h, i, j in live.nonzero().tolist():
            ds[b, h, i, j] = _scalar_hook(score_mod_bwd, [(float(ds[b, h, i, j]), F32), (float(raw[b, h, i, j]), F32),
                                          (b, I32), (h, I32)], q_idx=cute_shim.SSA([i], I32),
                                          kv_idx=cute_shim.SSA([j], I32), seqlen_info=None, aux_tensors=aux[0],
                                          aux_scalars=aux[1])
    dq = softmax_scale * ds @ kf
    dk = softmax_scale * ds.transpose(-1, -2) @ qf
    dv = p.transpose(-1, -2) @ do
    Hkv = k.shape[2]
    group = lambda t: t.unflatten(1, (Hkv, -1)).sum(2)  # noqa: E731 — GQA: sum a group's query heads
    return tuple(x.transpose(1, 2).to(q.dtype) for x in (dq, group(dk), group(dv)))


def dq_write_order(*lists, spt=False):
    return torch.zeros_like(lists[5]), torch.zeros_like(lists[7])


def namespace():
    """What fa4._fa() returns, for the emulator (the hooks' `cutlass` is the shim's)."""
    cutlass, _ = cute_shim._make_modules()
    return SimpleNamespace(cutlass=cutlass, address=cute_shim.address_of, Sparse=Sparse, dq_write_order=dq_write_order,
                           interface=SimpleNamespace(_flash_attn_fwd=flash_attn_fwd, _flash_attn_bwd=flash_attn_bwd))
