"""Logit soft-capping (Gemma 2, Grok): `score -> cap * tanh(score / cap)`, causal by default."""
from ..dsl.pattern import Pattern
from ..dsl.trace import param
from ._checks import flag


def softcap(cap: float = 30.0, causal: bool = True) -> Pattern:
    """score = cap * tanh(score / cap), mask = q >= kv when causal (logit soft-capping: Gemma 2,
    Gemma Team 2024; Grok-1).

    cap: a float param > 0 (rebinding never recompiles); causal: mask the future."""
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 < float(cap) < float("inf"):
        raise ValueError(f"cap must be a finite number > 0, got {cap!r}")
    c = param("cap", float(cap))
    mask = (lambda b, h, q, kv: q >= kv) if flag("causal", causal) else None
    return Pattern(mask, lambda s, b, h, q, kv: c * (s / c).tanh(), name="softcap")
