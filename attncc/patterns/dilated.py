"""Dilated (strided) local attention: `|q - kv| <= W and (q - kv) % d == 0`.

`W` is a param (rebinding never recompiles). The dilation `d` is a compile-time constant: it
decides the sparsity structure, and a constant lets Triton strength-reduce `% d` (a mask for
powers of two) where a runtime divisor would cost an integer division per score.

With `seq_len` (a multiple of d) the kernels run in a residue layout (compiler/layout.py): the
tokens of each class i % d stored together, so each class is a plain sliding window of W // d
and tiles are dense instead of 1/d live. Results are the same, in natural token order.
"""
from ..compiler.layout import default_layout
from ..dsl.pattern import Pattern
from ..dsl.trace import param


def dilated(window: int, dilation: int, seq_len: int | None = None) -> Pattern:
    """mask = abs(q - kv) <= W and (q - kv) % d == 0; `seq_len`: run in the residue layout
    (needs Q_LEN == KV_LEN == seq_len; ignored unless seq_len % dilation == 0)."""
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
        raise ValueError(f"dilation must be a positive int, got {dilation!r}")
    W = param("W", window)
    pattern = Pattern(lambda b, h, q, kv: (abs(q - kv) <= W) & ((q - kv) % dilation == 0), name="dilated")
    if seq_len is not None and seq_len % dilation == 0:
        pattern = pattern.with_layout(default_layout((seq_len,), dilation))
    return pattern
