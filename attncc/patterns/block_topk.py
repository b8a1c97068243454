"""Top-k block sparse attention (MoBA, Lu et al. 2025; the selection branch of NSA, Yuan et al.
2025): each block of `block_size` queries attends to the `topk` key blocks whose gate is largest.

The gate of query block i and key block j, per head, is the dot product of the mean-pooled
queries of block i and the mean-pooled keys of block j (a last, shorter block is the mean of the
tokens it has; GQA key heads serve the query heads of their group, kv head = h // (Hq / Hkv)):

    gate[b, h, i, j] = mean(q[b, h, i*bs : (i+1)*bs]) . mean(k[b, h // g, j*bs : (j+1)*bs])
    sel[b, h, i]     = the topk blocks j by gate, the diagonal block j = i always among them,
                       future blocks j > i never (when causal)
    mask(b, h, q, kv) = sel[b, h, q // bs, kv // bs] and q >= kv (when causal)

so with `causal` a query sees min(topk, i + 1) blocks, causally within its own (diagonal) block.
The selection is made once, in torch, when the pattern is built (`block_topk_selection`: float32
pooling, a float64 gate), into the bool buffer `sel` [B, H, QB, KB] that the mask reads; the
kernel's block mask then skips every unselected tile. Ties are broken deterministically: blocks
are ranked by a stable descending sort of the gate, so of equal gates the lower key-block index
wins (the diagonal ranks first, as +inf; excluded blocks last and never selected).

`block_topk(selected=sel, block_size=bs)` takes a selection made elsewhere (bool or int
[B, H, QB, KB], nonzero = attend) instead, used as given (no diagonal forced), with the same
token-level causality when `causal`. Positions are absolute, as in `causal()`: query block i
and key block i are the same positions.
"""
import torch

from ..dsl.pattern import Pattern
from ._checks import count


def _mean_pool(x: torch.Tensor, bs: int) -> torch.Tensor:
    """float32 [B, H, ceil(N / bs), D]: the mean of each block of bs tokens (the last: of its own)."""
    n = x.shape[2]
    whole = n // bs
    parts = []
    if whole:
        parts.append(x[:, :, :whole * bs].unflatten(2, (whole, bs)).sum(3, dtype=torch.float32) / bs)
    if n % bs:
        parts.append(x[:, :, whole * bs:].sum(2, keepdim=True, dtype=torch.float32) / (n % bs))
    return torch.cat(parts, 2)


def block_topk_selection(q: torch.Tensor, k: torch.Tensor, block_size: int, topk: int,
                         causal: bool = True) -> torch.Tensor:
    """bool [B, Hq, QB, KB]: the selected key blocks of each query block (module docstring).

    q [B, Hq, Q_LEN, D], k [B, Hkv, KV_LEN, D] with Hq a multiple of Hkv."""
    bs, topk = count("block_size", block_size, 1), count("topk", topk, 1)
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q [B, Hq, Q, D] and k [B, Hkv, KV, D] disagree: {tuple(q.shape)}, {tuple(k.shape)}")
    H, HKV = q.shape[1], k.shape[1]
    if H % HKV:
        raise ValueError(f"q has {H} heads, not a multiple of k's {HKV}")
    qp = _mean_pool(q.detach(), bs)
    kp = _mean_pool(k.detach(), bs).repeat_interleave(H // HKV, dim=1)
    gate = qp.double() @ kp.double().transpose(-1, -2)  # [B, H, QB, KB]
    QB, KB = gate.shape[-2:]
    i = torch.arange(QB, device=gate.device).view(QB, 1)
    j = torch.arange(KB, device=gate.device).view(1, KB)
    allowed = (j <= i) if causal else torch.ones(QB, KB, dtype=torch.bool, device=gate.device)
    ranked = gate.masked_fill(~allowed, -torch.inf).masked_fill(i == j, torch.inf)
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(KB, device=gate.device).expand_as(order))
    return (rank < topk) & allowed


def block_topk(q: torch.Tensor | None = None, k: torch.Tensor | None = None, block_size: int | None = None,
               topk: int | None = None, causal: bool = True, *, selected: torch.Tensor | None = None) -> Pattern:
    """mask = sel[b, h, q // bs, kv // bs] (and q >= kv when causal); sel from q, k or `selected`."""
    bs = count("block_size", block_size, 1)
    if selected is None:
        if q is None or k is None or topk is None:
            raise ValueError("block_topk() needs q, k and topk (or selected=)")
        sel = block_topk_selection(q, k, bs, topk, causal)
    else:
        if q is not None or k is not None or topk is not None:
            raise ValueError("block_topk(selected=...) takes the selection instead of q, k and topk")
        if not isinstance(selected, torch.Tensor) or selected.dim() != 4 or selected.is_floating_point():
            raise ValueError("selected must be a bool or int tensor [B, H, QB, KB], got "
                             + (f"{selected.dtype} {tuple(selected.shape)}" if isinstance(selected, torch.Tensor)
                                else type(selected).__name__))
        sel = selected

    if sel.dtype == torch.bool:
        def picked(b, h, q, kv):
            return sel[b, h, q // bs, kv // bs]
    else:
        def picked(b, h, q, kv):
            return sel[b, h, q // bs, kv // bs] != 0

    if causal:
        return Pattern(lambda b, h, q, kv: picked(b, h, q, kv) & (q >= kv), name="block_topk")
    return Pattern(picked, name="block_topk")
