"""Vertical-slash sparse attention (MInference, Jiang et al. 2024, "MInference 1.0: Accelerating
Pre-filling for Long-Context LLMs via Dynamic Sparse Attention"): per head, a set of key columns
every query sees ("vertical lines") and a set of diagonals q - kv every query sees ("slash lines"),
causal:

    mask = q >= kv and (kv in columns[h] or q - kv in offsets[h])

The index lists (`columns` int [H, Kc], `offsets` int [H, Ks], or lists of H per-head lists of
any lengths, 0 included) become two dense per-head lookup tables of `seq_len` = N entries, so the
mask reads one element of each whatever the counts:

    vertical[h, kv] or slash[h, max(q - kv, 0)]      (bool [H, N] buffers `vertical`, `slash`)

(the clamp keeps the index inside the table where q < kv, which the causal term masks anyway).
The tables cover Q_LEN <= N and KV_LEN <= N and the H heads given (h is the query head, also
under GQA; longer sequences or more heads are refused, never read out of bounds). Every entry
must lie in [0, N); repeats are harmless. Offset 0 is the diagonal: MInference's selection
usually includes it, but it is not added here. Rebind the tables, built the same way by
`vertical_slash_tables`, with `pattern.bind(vertical=..., slash=...)` (same shapes: same kernel).
"""
import torch

from ..dsl.pattern import Pattern
from ._checks import count


def vertical_slash_tables(columns, offsets, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(vertical, slash): bool [H, N] with vertical[h, c] for c in columns[h], slash[h, o] for o in offsets[h].

    columns / offsets: integer tensors [H, K], or lists of H per-head lists (of any lengths)."""
    N = count("seq_len", seq_len, 1)
    tables = [_table(what, idx, N, device) for what, idx in (("columns", columns), ("offsets", offsets))]
    if tables[0].shape[0] != tables[1].shape[0]:
        raise ValueError(f"columns and offsets must have one row per head each, got {tables[0].shape[0]} "
                         f"and {tables[1].shape[0]} rows")
    return tables[0], tables[1]


def _table(what: str, idx, N: int, device) -> torch.Tensor:
    if isinstance(idx, torch.Tensor):
        rows, dev = list(idx) if idx.dim() == 2 else [idx.reshape(-1, 1)], idx.device  # not [H, K]: refused below
    else:
        rows = [torch.as_tensor(r, device=device) for r in idx]
        rows = [r.long() if r.numel() == 0 else r for r in rows]  # [] reads as float32
        dev = rows[0].device if rows else device
    shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else "a list"
    if not rows or any(r.dim() != 1 or r.dtype.is_floating_point or r.dtype.is_complex or r.dtype == torch.bool
                       for r in rows):
        raise ValueError(f"{what} must be an integer tensor [H, K] or a list of H per-head lists of indices "
                         f"(H >= 1), got {shape}")
    table = torch.zeros(len(rows), N, dtype=torch.bool, device=dev)
    for h, r in enumerate(rows):
        if r.numel() and (r.min() < 0 or r.max() >= N):
            raise ValueError(f"{what} entries must lie in [0, seq_len = {N}), got values in "
                             f"[{int(r.min())}, {int(r.max())}] for head {h}")
        table[h, r.long()] = True
    return table


def vertical_slash(columns, offsets, seq_len: int, *, device=None) -> Pattern:
    """mask = q >= kv and (vertical[h, kv] or slash[h, max(q - kv, 0)]), tables of seq_len entries.

    The tables live on the index tensors' device (`device` for lists)."""
    vertical, slash = vertical_slash_tables(columns, offsets, seq_len, device)
    return Pattern(lambda b, h, q, kv: (q >= kv) & (vertical[h, kv] | slash[h, (q - kv).clamp(min=0)]),
                   name="vertical_slash")
