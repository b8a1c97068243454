"""ALiBi (Press et al. 2022): `score + slope[h] * (kv - q)`, causal, slope_h = 2^(-8(h+1)/H)."""
import torch

from ..dsl.pattern import Pattern
from ._checks import count, flag


def alibi_slopes(num_heads: int, device=None) -> torch.Tensor:
    """float32 [H]: slope_h = 2^(-8 (h + 1) / H), the paper's formula. For H not a power of two the
    reference code (Press et al.'s get_slopes, as in BLOOM and MPT) interleaves the slopes of the
    nearest powers of two instead: a model ported from it passes its slopes with
    `alibi(H).bind(slope=its_slopes)`."""
    h = torch.arange(count("num_heads", num_heads, 1), dtype=torch.float32, device=device)
    return torch.exp2(-8.0 * (h + 1) / num_heads)


def alibi(num_heads: int, causal: bool = True, device=None) -> Pattern:
    """score = score + slope[h] * (kv - q), mask = q >= kv when causal (ALiBi, Press et al. 2022).

    num_heads: H, for slope_h = 2^(-8 (h + 1) / H) (alibi_slopes, a float buffer: learnable when it
    requires grad); causal: mask the future; device: where the slopes live."""
    slope = alibi_slopes(num_heads, device)
    mask = (lambda b, h, q, kv: q >= kv) if flag("causal", causal) else None
    return Pattern(mask, lambda s, b, h, q, kv: s + slope[h] * (kv - q), name="alibi")
