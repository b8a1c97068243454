"""Dilated (strided) local attention: `|q - kv| <= W and (q - kv) % d == 0`.

`W` is a param (rebinding never recompiles). The dilation `d` is a compile-time constant: it
decides the sparsity structure, and a constant lets Triton strength-reduce `% d` (a mask for
powers of two) where a runtime divisor would cost an integer division per score.
"""
from ..dsl.pattern import Pattern
from ..dsl.trace import param


def dilated(window: int, dilation: int) -> Pattern:
    """mask = abs(q - kv) <= W and (q - kv) % d == 0."""
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be a positive int, got {dilation!r}")
    W = param("W", window)
    return Pattern(lambda b, h, q, kv: (abs(q - kv) <= W) & ((q - kv) % dilation == 0), name="dilated")
