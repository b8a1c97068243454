"""Checks on user tensors: every problem is a ValueError naming the argument and what was expected."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)


def kernel_head_dim(d) -> bool:
    """Whether `d` is a head dim attncc's kernels take: an int in 16..256 (bools are not)."""
    return isinstance(d, int) and not isinstance(d, bool) and 16 <= d <= 256


def check_kernel_head_dims(D, Dv) -> None:
    """ValueError unless q's head dim D and v's Dv are both ones attncc's kernels take."""
    for name, d in (("q", D), ("v", Dv)):
        if not kernel_head_dim(d):
            raise ValueError(f"{name} has head dim {d}; attncc's kernels support 16..256")


@dataclass(frozen=True)
class Shapes:
    """Sizes read off q [B, Hq, Q, D], k [B, Hkv, KV, D], v [B, Hkv, KV, Dv]."""
    B: int
    Hq: int
    Hkv: int
    Q: int
    KV: int
    D: int
    Dv: int

    @property
    def group(self) -> int:
        """Query heads per kv head (GQA): query head h reads kv head h // group."""
        return self.Hq // self.Hkv


def check_qkv(q, k, v, dtypes=KERNEL_DTYPES) -> Shapes:
    """Validate attention inputs and return their sizes."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims [B, H, N, D], got shape {tuple(t.shape)}")
        if t.dtype not in dtypes:
            raise ValueError(f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, dtypes))}")
        if t.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); every size must be >= 1")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Hq, Q, D = q.shape
    Bk, Hkv, KV, Dk = k.shape
    Bv, Hv, KVv, Dv = v.shape
    if Bk != B or Bv != B:
        raise ValueError(f"batch sizes differ: q {B}, k {Bk}, v {Bv}")
    if Hv != Hkv:
        raise ValueError(f"k and v must have the same number of heads, got {Hkv} and {Hv}")
    if KVv != KV:
        raise ValueError(f"k and v must have the same length, got {KV} and {KVv}")
    if Dk != D:
        raise ValueError(f"q and k must have the same head dim, got {D} and {Dk}")
    if Hq % Hkv:
        raise ValueError(f"q has {Hq} heads, not a multiple of the {Hkv} heads of k and v "
                         "(GQA: query head h reads kv head h // (Hq // Hkv))")
    return Shapes(B, Hq, Hkv, Q, KV, D, Dv)


def check_scale(scale, D: int) -> float:
    """The softmax scale: 1/sqrt(D) by default; a finite number otherwise (ValueError)."""
    if scale is None:
        return D ** -0.5
    if isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        scale = float(scale)
    if not isinstance(scale, float):
        raise ValueError(f"scale must be a number, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale
