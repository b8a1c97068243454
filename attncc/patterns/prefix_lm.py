"""Prefix LM (T5/UniLM): bidirectional over the first P tokens, causal after: `kv < P or q >= kv`."""
from ..dsl.pattern import Pattern
from ..dsl.trace import param
from ._checks import count


def prefix_lm(prefix: int) -> Pattern:
    """mask = kv < P or q >= kv (prefix LM: UniLM, Dong et al. 2019; T5, Raffel et al. 2020).

    prefix: P, an int param: the first P keys are seen by every query, the rest causally."""
    P = param("P", count("prefix", prefix))
    return Pattern(lambda b, h, q, kv: (kv < P) | (q >= kv), name="prefix_lm")
