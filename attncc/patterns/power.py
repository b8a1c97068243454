"""Power-of-two distances (PowerAttention, Chen et al. 2025, "PowerAttention: Exponentially
Scaling of Receptive Fields for Effective Sparse Attention"): causal; a query attends the keys at
distance 0 or a power of two, plus an optional local window of the W keys before it:

    mask = q >= kv and (q - kv in {0, 1, 2, 4, 8, ...} or q - kv <= W)

The IR has no integer bitwise and (`d & (d - 1) == 0`: `&` means `and` on masks only), so "is a
power of two" is a lookup table over distances, the bool [N] buffer `pow2` with `pow2[d]` for
d = 0 and d = 2^k < N = `seq_len`; the mask reads `pow2[max(q - kv, 0)]` (the clamp keeps the
index in the table where q < kv, which the causal term masks anyway), so it covers Q_LEN <= N.
`W` (default 0: the diagonal only, already in the set) is a param and counts like
`sliding_window(W)`'s. The paper applies the rule to blocks of tokens; here it is per token.
"""
import torch

from ..dsl.pattern import Pattern
from ..dsl.trace import param
from ._checks import count


def power_table(seq_len: int, device=None) -> torch.Tensor:
    """bool [N]: True at 0 and at the powers of two below N."""
    N = count("seq_len", seq_len, 1)
    table = torch.zeros(N, dtype=torch.bool, device=device)
    table[0] = True
    table[[1 << k for k in range(N.bit_length()) if 1 << k < N]] = True
    return table


def power(seq_len: int, window: int = 0, *, device=None) -> Pattern:
    """mask = q >= kv and (pow2[max(q - kv, 0)] or q - kv <= W); pow2 over seq_len distances."""
    pow2 = power_table(seq_len, device)
    W = param("W", count("window", window))
    return Pattern(lambda b, h, q, kv: (q >= kv) & (pow2[(q - kv).clamp(min=0)] | (q - kv <= W)), name="power")
