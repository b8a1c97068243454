"""Causal attention: a query attends to itself and every earlier key, `q >= kv`.

With Q_LEN != KV_LEN the indices are absolute (no implicit alignment); for decode-style
bottom-right alignment use `causal(offset=KV_LEN - Q_LEN)`: `q + offset >= kv`.
"""
from ..dsl.pattern import Pattern
from ..dsl.trace import param
from ._checks import integer


def causal(offset: int = 0) -> Pattern:
    """mask = q + offset >= kv (Vaswani et al. 2017, "Attention Is All You Need").

    offset: int param (rebinding never recompiles): 0 aligns query i with key i; KV_LEN - Q_LEN
    aligns the queries with the last keys (bottom-right, as in decoding)."""
    if integer("offset", offset) == 0:
        return Pattern(lambda b, h, q, kv: q >= kv, name="causal")
    off = param("offset", offset)
    return Pattern(lambda b, h, q, kv: q + off >= kv, name="causal")
