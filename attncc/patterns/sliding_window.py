"""Sliding-window causal attention (Longformer/Mistral): `q >= kv and q - kv <= W`.

Each query sees itself and the W keys before it. `W` is a param: rebinding never recompiles.
"""
from ..dsl.pattern import Pattern
from ..dsl.trace import param
from ._checks import count, flag


def sliding_window(window: int, causal: bool = True) -> Pattern:
    """mask = q >= kv and q - kv <= W, or |q - kv| <= W when causal=False (Longformer, Beltagy et
    al. 2020; Mistral 7B, Jiang et al. 2023).

    window: W, an int param (the query itself and the W keys before it); causal: one-sided."""
    W = param("W", count("window", window))
    if flag("causal", causal):
        return Pattern(lambda b, h, q, kv: (q >= kv) & (q - kv <= W), name="sliding_window")
    return Pattern(lambda b, h, q, kv: abs(q - kv) <= W, name="sliding_window")
