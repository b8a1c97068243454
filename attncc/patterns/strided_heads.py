"""Strided heads (S2-Attention, Lin et al. 2024, "S2-Attention: Hardware-Aware Context Sharding
Among Attention Heads"): the context is sharded among the heads; head h attends the keys of its
shard, `kv % S == h % S`, plus a dense causal local band of the W keys before the query:

    mask = q >= kv and (kv % S == h % S or q - kv <= W)

h is the query head (with GQA too). The shard count `S` is a compile-time constant (it decides
the sparsity structure; a constant `% S` strength-reduces); the local window `W` is a param and
counts like `sliding_window(W)`'s (the query itself and the W keys before it).
"""
from ..dsl.pattern import Pattern
from ..dsl.trace import param
from ._checks import count


def strided_heads(num_shards: int, local_window: int) -> Pattern:
    """mask = q >= kv and (kv % S == h % S or q - kv <= W); S = num_shards, W = local_window."""
    S = count("num_shards", num_shards, 1)
    W = param("W", count("local_window", local_window))
    return Pattern(lambda b, h, q, kv: (q >= kv) & ((kv % S == h % S) | (q - kv <= W)), name="strided_heads")
