"""Attention sinks (StreamingLLM, Xiao et al. 2023, "Efficient Streaming Language Models with
Attention Sinks"): causal; a query sees the first S tokens and a sliding window of the W keys
before it, `q >= kv and (kv < S or q - kv <= W)`.

The window counts like `sliding_window(W)`'s: the query itself (q - kv = 0) and the W keys before
it, so W = 0 leaves the sinks and the diagonal. `S` and `W` are params: rebinding never recompiles.
"""
from ..dsl.pattern import Pattern
from ..dsl.trace import param
from ._checks import count


def sinks(num_sinks: int, window: int) -> Pattern:
    """mask = q >= kv and (kv < S or q - kv <= W) (StreamingLLM, Xiao et al. 2023).

    num_sinks: S, int param >= 0, the first keys every query keeps; window: W, int param >= 0, the
    keys before the query it sees (the query itself always)."""
    S = param("S", count("num_sinks", num_sinks))
    W = param("W", count("window", window))
    return Pattern(lambda b, h, q, kv: (q >= kv) & ((kv < S) | (q - kv <= W)), name="sinks")
