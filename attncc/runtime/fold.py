"""Residue folds: a dilated pattern's residue classes run as the heads of one call, on views.

Where the mask is q = kv (mod s) and a formula of kv - q alone (compiler/bands.residues: dilated
windows, `abs(q - kv) <= W and (q - kv) % s == 0`), every residue class attends to itself alone,
all by one class-local mask. A contiguous [B, H, N, D] tensor is, in memory, [B*H, N/s, s, D]:
token s*i + r of (b, h) is row i of head r in batch b*H + h. So the call runs as one of batch B*H,
s heads (query and kv alike) and N/s tokens over views of q, k, v, with the class-local mask
(`abs(s*q - s*kv) <= W`): dense tiles where the natural order leaves 1/s of each tile live, no
gathers, no copies of q, k, v or the output (FA4's output and gradients are written in this
layout; attncc's Triton output is copied back once), and on the fa4 backend FA4's own
local-window kernel. Exact: a pair of one class has kv - q = s * (kv' - q').

Needs Hq == Hkv (a batch of B*Hq query heads has no kv batch under GQA), Q and KV multiples of s,
no block predicate, no buffers and a score mod free of positions (the folded call renumbers b,
h, q and kv). Inputs whose batch and head strides do not merge are copied by the view (reshape).
kernel_options fold=False keeps the natural order (or the pattern's token layout).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compiler import bands
from ..dsl import ir
from ..dsl.pattern import Pattern
from .inputs import Shapes


@dataclass(frozen=True)
class Fold:
    """Residue classes mod `stride` as heads, for calls of `heads` heads; `pattern` is the mask in
    class-local positions (what the kernels run)."""
    stride: int
    heads: int
    pattern: Pattern

    def shapes(self, s: Shapes) -> Shapes:
        """The folded call's shapes: batch B*H, `stride` heads, Q/stride and KV/stride tokens."""
        n = self.stride
        return Shapes(s.B * s.Hq, n, n, s.Q // n, s.KV // n, s.D, s.Dv)

    def fold(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, N, ...] -> [B*H, stride, N/stride, ...] (token stride*i + r at head r, row i): a
        view where x's batch and head strides merge (contiguous x), else a copy."""
        B, H, N = x.shape[:3]
        return x.reshape(B * H, N // self.stride, self.stride, *x.shape[3:]).transpose(1, 2)

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """fold's inverse, [B*H, stride, n, ...] -> [B, H, stride*n, ...]: a view of a tensor laid
        out as fold's views are (FA4's results, empty_like of a view), else a copy."""
        BH, s, n = x.shape[:3]
        return x.transpose(1, 2).reshape(BH // self.heads, self.heads, s * n, *x.shape[3:])

    def describe(self) -> str:
        return (f"residue classes mod {self.stride} as heads: q, k, v viewed as [B*H, {self.stride}, N/{self.stride}, D], "
                f"mask {ir.to_text(self.pattern.mask)} in class-local positions (runtime/fold.py)")


def fold_for(pattern: Pattern, s: Shapes, options: dict) -> Fold | None:
    """The Fold this call runs in (see the module's docstring), or None: kernel_options fold=False,
    a mask that is not q = kv (mod s) and a formula of kv - q, or a call it cannot fold."""
    if (not options.get("fold", True) or s.Hq != s.Hkv or pattern.has_block_mask or pattern.buffers
            or ir.free_vars(pattern.score) - {ir.SCORE_VAR}):
        return None
    found = bands.residues(pattern.mask, pattern.params, s.Q, s.KV)
    if found is None:
        return None
    name = f"{pattern.name or 'pattern'}, residues mod {found.stride} as heads"
    return Fold(found.stride, s.Hq, Pattern.from_ir(found.mask, pattern.score, ir.TRUE, pattern.params, name=name))
