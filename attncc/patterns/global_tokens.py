"""Global + local attention (Longformer, Beltagy et al. 2020, "Longformer: The Long-Document
Transformer"): global tokens attend everywhere and every token attends to them; the others see a
local band `|q - kv| <= W`:

    mask = is_global[q] or is_global[kv] or |q - kv| <= W      (and q >= kv when causal)

`is_global` (bool [N], the buffer `is_global`) marks the global positions; it covers sequences of
up to N tokens (queries and keys). `window=None` drops the band: a non-global query then sees only
the global keys (and no key at all if there is none); `window=0` adds the diagonal. `W` is a param.
"""
import torch

from ..dsl.pattern import Pattern
from ..dsl.trace import param
from ._checks import count, flag


def global_tokens(is_global: torch.Tensor, window: int | None = None, causal: bool = False) -> Pattern:
    """mask = is_global[q] | is_global[kv] | (|q - kv| <= W), & q >= kv when causal (Longformer,
    Beltagy et al. 2020).

    is_global: bool [N], the global positions (covers sequences up to N); window: W, an int param,
    or None for no band; causal: keep only q >= kv."""
    if not isinstance(is_global, torch.Tensor) or is_global.dtype != torch.bool or is_global.dim() != 1:
        got = (f"{is_global.dtype} of shape {tuple(is_global.shape)}" if isinstance(is_global, torch.Tensor)
               else type(is_global).__name__)
        raise ValueError(f"is_global must be a 1-D bool tensor [N] marking the global positions, got {got}")
    W = None if window is None else param("W", count("window", window))
    flag("causal", causal)

    def mask(b, h, q, kv):
        live = is_global[q] | is_global[kv]
        if W is not None:
            live = live | (abs(q - kv) <= W)
        return live & (q >= kv) if causal else live

    return Pattern(mask, name="global_tokens")
