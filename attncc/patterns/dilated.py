"""Dilated (strided) local attention: `|q - kv| <= W and (q - kv) % d == 0` (the dilated sliding
window of Longformer, Beltagy et al. 2020, "Longformer: The Long-Document Transformer"; the
strided pattern of Sparse Transformers, Child et al. 2019).

`W` is a param (rebinding never recompiles). The dilation `d` is a compile-time constant: it
decides the sparsity structure, and a constant lets Triton strength-reduce `% d` (a mask for
powers of two) where a runtime divisor would cost an integer division per score.

Its residue classes (tokens i with equal i % d) attend only to themselves, each a plain sliding
window of W // d in class-local positions. Where Q_LEN and KV_LEN are multiples of d (and Hq ==
Hkv) a call runs them as d heads of one call on views of q, k, v (runtime/fold.py: dense tiles, and
FA4's own local-window kernel where fa4 runs). With `seq_len` (a multiple of d) the pattern also
carries a residue layout (compiler/layout.py: each class's tokens stored together), which attncc's
Triton kernels gather in place where the fold does not run on fa4. Results are the same, in natural
token order.
"""
from ..compiler.layout import default_layout
from ..dsl.pattern import Pattern
from ..dsl.trace import param
from ._checks import count


def dilated(window: int, dilation: int, seq_len: int | None = None) -> Pattern:
    """mask = abs(q - kv) <= W and (q - kv) % d == 0; `seq_len`: run in the residue layout
    (needs Q_LEN == KV_LEN == seq_len; ignored unless seq_len % dilation == 0)."""
    count("dilation", dilation, 1)
    if seq_len is not None:
        count("seq_len", seq_len, 1)
    W = param("W", count("window", window))
    pattern = Pattern(lambda b, h, q, kv: (abs(q - kv) <= W) & ((q - kv) % dilation == 0), name="dilated")
    if seq_len is not None and seq_len % dilation == 0:
        pattern = pattern.with_layout(default_layout((seq_len,), dilation))
    return pattern
