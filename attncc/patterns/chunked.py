"""Chunked local attention (Llama 4's iRoPE local layers; block-causal within fixed chunks):
the sequence is cut into chunks of C tokens and a query attends only inside its own chunk,
`q // C == kv // C and q >= kv` (`causal=False`: the whole chunk, bidirectional).

The chunk size `C` is a compile-time constant, like `dilated`'s dilation: it decides the
sparsity structure, and a constant lets Triton strength-reduce `// C` (a shift for powers of two,
Llama 4 uses 8192) where a runtime divisor would cost an integer division per score.
"""
from ..dsl.pattern import Pattern
from ._checks import count, flag


def chunked(chunk: int, causal: bool = True) -> Pattern:
    """mask = q // C == kv // C, and q >= kv when causal (Llama 4's chunked local attention).

    chunk: C, a compile-time int >= 1 (it shapes the block map); causal: within the chunk."""
    C = count("chunk", chunk, 1)
    if flag("causal", causal):
        return Pattern(lambda b, h, q, kv: (q // C == kv // C) & (q >= kv), name="chunked")
    return Pattern(lambda b, h, q, kv: q // C == kv // C, name="chunked")
