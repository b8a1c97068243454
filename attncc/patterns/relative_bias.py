"""Relative position bias (T5, Raffel et al. 2020; Shaw et al. 2018): `score + bias(q - kv)`.

Bucketed (T5), `num_buckets` given: the relative position kv - q is mapped to a bucket exactly as
Hugging Face's `T5Attention._relative_position_bucket(kv - q, bidirectional, num_buckets,
max_distance)`: with n = num_buckets // 2 if bidirectional (keys after the query take buckets
n..2n-1, `(kv > q) * n`, and r = |kv - q|) else n = num_buckets (r = max(q - kv, 0)), the first
n // 2 distances are exact buckets and longer ones log-spaced up to `max_distance`, beyond which
all share the last bucket:

    bucket(r) = r                                                   if r < n // 2
              = min(n - 1, n // 2 + int(log(r / (n // 2)) / log(max_distance / (n // 2)) * (n - n // 2)))
    score = score + table[bucket, h]         table [num_buckets, H]   (or [num_buckets]: table[bucket])

The bucket of every r <= max_distance is computed once by that formula in float32 (as HF does)
into an int32 lookup buffer `t5_bucket` [max_distance + 1] read at min(r, max_distance) (every
r >= max_distance is in the last bucket): exact, O(max_distance) memory, whatever the lengths,
and no log in the kernel.

Learnable table, no buckets: one bias per relative position d = q - kv (the query d tokens after
the key), the table's middle entry being d = 0:

    score = score + table[h, q - kv + N - 1]   table [H, 2N - 1]   (or [2N - 1]: shared by the heads)

so Q_LEN, KV_LEN <= N (a longer sequence is refused by the domain check, never read out of
bounds). Score mod only, no mask (T5 itself does not scale q.k by 1/sqrt(D): pass scale=1.0 to
attention to match it). The table may require grad: attncc computes its gradient
(runtime/buffer_grads.py).
"""
import math

import torch

from ..dsl.pattern import Pattern
from ._checks import flag


def t5_buckets(relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32,
               max_distance: int = 128) -> torch.Tensor:
    """T5's bucket of each relative position kv - q (int64), HF's `_relative_position_bucket`."""
    buckets = torch.zeros_like(relative_position, dtype=torch.long)
    rel = relative_position.long()
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.min(rel, torch.zeros_like(rel))
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(rel < max_exact, rel, large)


def relative_bias(table: torch.Tensor, num_buckets: int | None = None, max_distance: int | None = None,
                  bidirectional: bool = True) -> Pattern:
    """score = score + table[bucket(kv - q), h] (T5 buckets) or table[h, q - kv + N - 1] (no buckets).

    table: float [num_buckets, H] or [num_buckets] with num_buckets; float [H, 2N - 1] or
    [2N - 1] without. max_distance defaults to 128 (T5's); bidirectional only with buckets."""
    if not isinstance(table, torch.Tensor) or not table.is_floating_point() or table.dim() not in (1, 2):
        raise ValueError("table must be a float tensor of 1 or 2 dims, got "
                         + (f"{table.dtype} {tuple(table.shape)}" if isinstance(table, torch.Tensor)
                            else type(table).__name__))
    flag("bidirectional", bidirectional)
    if num_buckets is None:
        if not bidirectional:
            raise ValueError("bidirectional=False needs num_buckets (T5's one-sided buckets); a table of 2N - 1 "
                             "relative positions covers both directions: mask the future with & causal()")
        if max_distance is not None:
            raise ValueError("max_distance needs num_buckets (it bounds T5's log-spaced buckets)")
        width = table.shape[-1]
        if width % 2 == 0:
            raise ValueError(f"a relative-position table needs 2N - 1 entries (odd) in its last dim, got {width}")
        centre = (width - 1) // 2
        if table.dim() == 2:
            def relative_score(s, b, h, q, kv):
                return s + table[h, q - kv + centre]
        else:
            def relative_score(s, b, h, q, kv):
                return s + table[q - kv + centre]
        return Pattern(score_mod=relative_score, name="relative_bias")

    max_distance = 128 if max_distance is None else max_distance
    for name, value in (("num_buckets", num_buckets), ("max_distance", max_distance)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
    half = num_buckets // 2 if bidirectional else num_buckets
    if half < 2:
        raise ValueError(f"num_buckets={num_buckets} leaves {half} bucket(s) per direction; T5 needs at least 2")
    if max_distance <= half // 2:
        raise ValueError(f"max_distance={max_distance} must exceed the {half // 2} exact buckets")
    if table.shape[0] != num_buckets:
        raise ValueError(f"table has {table.shape[0]} rows, num_buckets is {num_buckets}")
    # bucket of each distance r = 0..max_distance (HF's unidirectional form takes kv - q = -r)
    distance = torch.arange(max_distance + 1, device=table.device)
    t5_bucket = t5_buckets(-distance, False, half, max_distance).to(torch.int32)
    per_head = table.dim() == 2

    def t5_score(s, b, h, q, kv):
        if bidirectional:
            bucket = t5_bucket[abs(kv - q).clamp(max=max_distance)] + (kv > q) * half
        else:
            bucket = t5_bucket[(q - kv).clamp(0, max_distance)]
        return s + (table[bucket, h] if per_head else table[bucket])

    return Pattern(score_mod=t5_score, name="t5_relative_bias")
