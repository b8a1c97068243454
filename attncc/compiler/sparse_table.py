"""Range reductions of a buffer along one dim through sparse tables: min, max, and max |step|.

The table of level k holds the reduction over every window of 2**k consecutive positions, so
the reduction over any positions [start, stop] is that of two overlapping windows: two lookups a
query. Tables are built on first use and kept in the caller's `tables` dict (shared across the
chunks of one classification).
"""
from __future__ import annotations

from typing import Mapping

import torch


def _table(tables: dict, buffers: Mapping[str, torch.Tensor], name: str, dim: int, k: int,
           kind: str) -> torch.Tensor:
    """Windows of 2**k along `dim` (moved last): min ("min") or max ("max") of the buffer, or the
    max of |x[i+1] - x[i]| ("step"). Shape [..., n - 2**k + 1] (n - 2**k for "step")."""
    key = (name, dim, k, kind)
    if key not in tables:
        x = buffers[name].movedim(dim, -1).double()
        if kind == "step":
            x = (x[..., 1:] - x[..., :-1]).abs()
        f = torch.minimum if kind == "min" else torch.maximum
        for j in range(k):
            s = 1 << j
            x = f(x[..., :-s], x[..., s:])
        tables[key] = x
    return tables[key]


def range_reduce(tables: dict, buffers: Mapping[str, torch.Tensor], name: str, dim: int, kind: str,
                 points: list, start: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    """The `kind` reduction of buffer `name` along `dim` over positions [start, stop] (float64
    tensors), the other dims at `points` (int64 tensors, one per other dim), broadcast together."""
    length = stop - start + 1
    level = torch.floor(torch.log2(length))
    level = level - (torch.exp2(level) > length).double() + (torch.exp2(level + 1) <= length).double()
    f = torch.minimum if kind == "min" else torch.maximum
    out = None
    for k in torch.unique(level).tolist():
        tab = _table(tables, buffers, name, dim, int(k), kind)
        n = tab.shape[-1]
        a = start.long().clamp(0, n - 1)
        b = (stop - (1 << int(k)) + 1).long().clamp(0, n - 1)
        v = f(tab[(*points, a)], tab[(*points, b)])
        out = v if out is None else torch.where(level == k, v, out)
    return out
