"""A CPU stand-in for the slice of FlashAttention-4's API runtime/fa4.py calls, with FA4's documented
semantics, so the fa4 backend's wiring (layouts, block-sparse lists, hooks, aux scalars and
tensors, LSE, the backward's routing) is tested without a GPU. The hooks run through
tests/cute_shim.py, element by element; the arithmetic around them is float64 torch.

Semantics emulated: q/k/v arrive as [B, N, H, D] views; with block-sparse tensors, a query tile's
FULL kv tiles are live without mask_mod, its PARTIAL ones where mask_mod says, the rest dead;
without them, every pair (causal=False) or kv <= q (causal=True) is live; score_mod sees the
scaled score; rows with no live key give out 0 and lse -inf; the backward applies score_mod_bwd
to dS."""
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


def _live(B, H, Q, KV, causal, sparse, mask_mod, aux):
    if sparse is None:
        live = torch.ones(B, H, Q, KV, dtype=torch.bool)
        return live.tril() if causal else live
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


def _forward_parts(q, k, v, scale, causal, score_mod, mask_mod, sparse, aux):
    qf, kf, vf = (x.transpose(1, 2).double() for x in (q, k, v))  # [B, H, N, D]
    B, H, Q, _ = qf.shape
    kf, vf = _expand(kf, H), _expand(vf, H)
    raw = scale * qf @ kf.transpose(-1, -2)
    live = _live(B, H, Q, kf.shape[2], causal, sparse, mask_mod, aux)
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
    return ([cute_shim.Buffer(t) for t in aux_tensors] if aux_tensors else [], aux_scalars)


def flash_attn_fwd(q, k, v, softmax_scale, causal=False, score_mod=None, mask_mod=None, block_sparse_tensors=None,
                   aux_tensors=None, aux_scalars=None, return_lse=True, **unused):
    assert not unused, unused
    assert q.stride(-1) == 1 and q.dim() == 4
    *_, out, lse = _forward_parts(q, k, v, softmax_scale, causal, score_mod, mask_mod, block_sparse_tensors,
                                  _aux(aux_tensors, aux_scalars))
    return out.transpose(1, 2).to(q.dtype), lse.float(), None, None, None


def flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale, causal, deterministic=False, score_mod=None,
                   score_mod_bwd=None, mask_mod=None, aux_tensors=None, aux_scalars=None, block_sparse_tensors=None,
                   dlse=None):
    aux = _aux(aux_tensors, aux_scalars)
    qf, kf, vf, raw, live, p, o, lse64 = _forward_parts(q, k, v, softmax_scale, causal, score_mod, mask_mod,
                                                        block_sparse_tensors, aux)
    do = dout.transpose(1, 2).double()
    delta = (do * o).sum(-1, keepdim=True)
    if dlse is not None:
        delta = delta - torch.where(torch.isinf(lse64), 0.0, dlse.double())[..., None]
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
    return SimpleNamespace(cutlass=cutlass, Sparse=Sparse, dq_write_order=dq_write_order,
                           interface=SimpleNamespace(_flash_attn_fwd=flash_attn_fwd, _flash_attn_bwd=flash_attn_bwd))
