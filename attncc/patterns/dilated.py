"""Dilated (strided) local attention: `|q - kv| <= W and (q - kv) % d == 0`."""
from ..dsl.pattern import Pattern
from ..dsl.trace import param


def dilated(window: int, dilation: int) -> Pattern:
    """mask = abs(q - kv) <= W and (q - kv) % d == 0."""
    W, d = param("W", window), param("d", dilation)
    return Pattern(lambda b, h, q, kv: (abs(q - kv) <= W) & ((q - kv) % d == 0), name="dilated")
