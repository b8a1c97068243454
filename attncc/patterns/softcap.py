"""Logit soft-capping (Gemma 2, Grok): `score -> cap * tanh(score / cap)`, causal by default."""
from ..dsl.pattern import Pattern
from ..dsl.trace import param


def softcap(cap: float = 30.0, causal: bool = True) -> Pattern:
    """score = cap * tanh(score / cap); mask = q >= kv when causal."""
    c = param("cap", float(cap))
    mask = (lambda b, h, q, kv: q >= kv) if causal else None
    return Pattern(mask, lambda s, b, h, q, kv: c * (s / c).tanh(), name="softcap")
