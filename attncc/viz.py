"""Pictures of patterns: ASCII for terminals, PNG (matplotlib) for files."""
from __future__ import annotations

import torch


def ascii_mask(mask: torch.Tensor, max_size: int = 64) -> str:
    """A bool [Q, KV] mask as text, '#' live and '.' dead, downsampled to at most max_size cells a side.

    A downsampled cell is '#' if all its pairs are live, '+' if some are, '.' if none.
    """
    if mask.dim() != 2:
        raise ValueError(f"ascii_mask needs a 2-D [Q, KV] mask, got shape {tuple(mask.shape)}")
    Q, KV = mask.shape
    rq, rk = -(-Q // max_size), -(-KV // max_size)
    m = mask.float().cpu()
    pad = torch.zeros(-(-Q // rq) * rq, -(-KV // rk) * rk)
    cnt = torch.zeros_like(pad)
    pad[:Q, :KV] = m
    cnt[:Q, :KV] = 1
    live = pad.view(pad.shape[0] // rq, rq, pad.shape[1] // rk, rk).sum((1, 3))
    total = cnt.view(cnt.shape[0] // rq, rq, cnt.shape[1] // rk, rk).sum((1, 3))
    rows = []
    for lr, tr in zip(live.tolist(), total.tolist()):
        rows.append("".join("#" if l == t else "." if l == 0 else "+" for l, t in zip(lr, tr)))
    return "\n".join(rows)
