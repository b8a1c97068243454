"""Gradients of the float buffers a score mod reads (a learnable bias table, ALiBi slopes, a
per-head scale): exact and deterministic.

dLoss/dbuf[j] = sum over the live (b, h, q, kv) whose read L of the buffer lands on element j of
ds(b, h, q, kv) * d(score)/d(L), with ds = p * (dp - delta) the gradient of the modded score and
d(score)/d(L) the derivative IR of compiler/derivative.py. It is computed with torch over chunks
of query rows (float32; each chunk's keys cut to the kv tiles the block mask leaves live),
evaluated by compiler/evaluate.py. Each read's contributions are first summed over the axes its
index ignores (slopes[h]: over q and kv), then reduced per buffer element in a fixed order (a
stable sort by flat index, float64 prefix sums per run), never with atomics: the same inputs give
bitwise-equal gradients. Dense over each chunk's live kv range, so slower than the kernels.
"""
from __future__ import annotations

import math

import torch

from ..compiler.derivative import derivative
from ..compiler.evaluate import evaluate, index_env, token_mask
from ..dsl import ir
from ..dsl.pattern import Pattern

_CHUNK_ELEMENTS = 1 << 25  # scores per chunk: a few float32 [B, H, rows, keys] tensors of this size


def buffer_reads(pattern: Pattern, name: str) -> list[tuple[ir.Load, ir.Node]]:
    """(read, d(score)/d(read)) for every read of buffer `name` in the score mod that it changes."""
    reads = [n for n in ir.walk(pattern.score) if isinstance(n, ir.Load) and n.buffer == name]
    pairs = [(n, derivative(pattern.score, n)) for n in dict.fromkeys(reads)]
    return [(n, d) for n, d in pairs if d is not None]


def buffer_grads(pattern: Pattern, names: list[str], q, k, v, out, lse, dout, dlse, scale: float,
                 kv_span: tuple[torch.Tensor, torch.Tensor, int, int]) -> list[torch.Tensor]:
    """The gradients of buffers `names` (each in its buffer's shape, dtype and device).

    q [B, H, Q, D], k / v [B, Hkv, KV, D|Dv], out / dout [B, H, Q, Dv], lse float32 [B, H, Q],
    dlse (or None) as in Kernel.backward. kv_span: (first, end) int64 [QB] live key tiles per
    query tile over all (b, h), and the tiles' (BLOCK_M, BLOCK_N).
    """
    B, H, Q, _ = q.shape
    HKV, KV = k.shape[1], k.shape[2]
    first, end, BM, BN = kv_span
    first, end = first.tolist(), end.tolist()  # one sync, not one per chunk
    delta = (dout.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - torch.where(torch.isinf(lse), 0.0, dlse.float())
    lse = torch.where(torch.isinf(lse), 0.0, lse.float())
    heads = torch.arange(H, device=q.device) // (H // HKV)
    bufs = {n: t.detach().to(q.device) for n, t in pattern.buffers.items()}
    floats = {n: t.float() if t.is_floating_point() else t for n, t in bufs.items()}
    reads = {n: buffer_reads(pattern, n) for n in names}
    mask = token_mask(pattern)
    sums = {n: torch.zeros(bufs[n].numel(), dtype=torch.float64, device=q.device) for n in names}
    for r0, r1, lo, hi in _chunks(first, end, Q, KV, BM, BN, _CHUNK_ELEMENTS // (B * H)):
        env = index_env(B, H, r1 - r0, hi - lo, q.device)
        env["q"], env["kv"] = env["q"] + r0, env["kv"] + lo
        s = scale * (q[:, :, r0:r1].float() @ k[:, heads, lo:hi].float().transpose(-1, -2))
        env_s = {**env, "score": s}
        z = evaluate(pattern.score, env_s, pattern.params, floats, float_dtype=torch.float32)
        live = evaluate(mask, env, pattern.params, bufs).bool()  # float64 where the kernels decide in it
        p = torch.where(live, torch.exp(z - lse[:, :, r0:r1, None]), 0.0)
        dp = dout[:, :, r0:r1].float() @ v[:, heads, lo:hi].float().transpose(-1, -2)
        ds = p * (dp - delta[:, :, r0:r1, None])
        for name in names:
            shape = bufs[name].shape
            for read, d in reads[name]:
                g = evaluate(d, env_s, pattern.params, floats, float_dtype=torch.float32)
                c = torch.where(p == 0.0, 0.0, ds * g)  # [B, H, rows, keys]; d may be inf where p is 0
                index = [evaluate(i, env, pattern.params, bufs).long() for i in read.index]
                _accumulate(sums[name], c, index, shape)
    return [sums[n].view(bufs[n].shape).to(pattern.buffers[n].device, pattern.buffers[n].dtype) for n in names]


def _chunks(first: list[int], end: list[int], Q: int, KV: int, BM: int, BN: int, budget: int):
    """(r0, r1, lo, hi): runs of whole query tiles with their live keys lo..hi-1, each at most
    `budget` (rows x keys) unless a single tile exceeds it; tiles with no live key are skipped."""
    t, QB = 0, len(first)
    while t < QB:
        if first[t] >= end[t]:
            t += 1
            continue
        lo, hi, u = first[t], end[t], t + 1
        while u < QB and first[u] < end[u]:
            nlo, nhi = min(lo, first[u]), max(hi, end[u])
            if (u + 1 - t) * BM * (nhi - nlo) * BN > budget:
                break
            lo, hi, u = nlo, nhi, u + 1
        yield t * BM, min(Q, u * BM), lo * BN, min(KV, hi * BN)
        t = u


def _accumulate(total: torch.Tensor, c: torch.Tensor, index: list[torch.Tensor], shape) -> None:
    """total[flat(index)] += c, deterministically: c [B, H, R, K]; index broadcastable to it."""
    ignored = [a for a in range(4) if all(i.dim() < 4 - a or i.shape[a - 4] == 1 for i in index)]
    if ignored:
        c = c.sum(dim=ignored, keepdim=True)
    flat = torch.zeros((), dtype=torch.int64, device=c.device)
    for i, stride in zip(index, _strides(shape)):
        flat = flat + i * stride
    flat = flat.expand(c.shape).reshape(-1)
    order = torch.sort(flat, stable=True).indices
    keys, counts = torch.unique_consecutive(flat[order], return_counts=True)
    prefix = c.reshape(-1)[order].double().cumsum(0)
    ends = counts.cumsum(0) - 1
    runs = prefix[ends] - torch.cat([prefix.new_zeros(1), prefix[ends[:-1]]])
    total[keys] += runs


def _strides(shape) -> list[int]:
    """Row-major element strides of `shape`."""
    return [math.prod(shape[d + 1:]) for d in range(len(shape))]
