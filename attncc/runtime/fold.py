"""Residue folds: a dilated pattern's residue classes run as heads of one call, on views.

Where the mask is q = kv (mod s) and a formula of kv - q alone (compiler/bands.residues: dilated
windows, `abs(q - kv) <= W and (q - kv) % s == 0`), every residue class attends to itself alone,
all by one class-local mask. Token s*i + r of a sequence is then row i of class r, and the call runs
as one with the classes as heads and N/s tokens, the mask rewritten exactly to class-local positions
(`abs(s*q - s*kv) <= W`; a pair of one class has kv - q = s * (kv' - q')): dense tiles where natural
order leaves 1/s of each tile live, and on the fa4 backend FA4's own local-window kernel. The folded
tensors are views, in either of two memory layouts of q, k, v:

- [B, H, N, D] contiguous is [B*H, N/s, s, D]: batch b*H + h, head r (`by_batch`; needs Hq == Hkv);
- [B, N, H, D] contiguous (x.transpose(1, 2), as models make q, k, v) is [B, N/s, s*H, D]: batch b,
  head r*H + h (query head r*Hq + h reads kv head r*Hkv + h // group: GQA folds too).

The layout q, k and v fold as views under picks the mapping; inputs that fold as views under
neither are copied by the fold (reshape). FA4 writes its output and gradients in the folded layout,
so those unfold as views too. Needs Q and KV multiples of s, no block predicate, no buffers and a
score mod free of positions (the folded call renumbers b, h, q and kv). kernel_options fold=False
keeps the natural order (or the pattern's token layout).
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
    """Residue classes mod `stride` as heads (see the module's docstring): `by_batch` the [B*H, s,
    N/s, D] mapping for calls of `heads` heads, else the [B, s*H, N/s, D] one; `pattern` is the
    mask in class-local positions (what the kernels run)."""
    stride: int
    by_batch: bool
    heads: int
    pattern: Pattern

    def shapes(self, s: Shapes) -> Shapes:
        """The folded call's shapes."""
        n = self.stride
        if self.by_batch:
            return Shapes(s.B * s.Hq, n, n, s.Q // n, s.KV // n, s.D, s.Dv)
        return Shapes(s.B, n * s.Hq, n * s.Hkv, s.Q // n, s.KV // n, s.D, s.Dv)

    def fold(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, N, ...] -> the folded [B', H', N/stride, ...]: a view where x's memory is laid out
        as the mapping reads it, else a copy."""
        return _fold(x, self.stride, self.by_batch)

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """fold's inverse, [B', H', n, ...] -> [B, H, stride*n, ...]: a view of a tensor laid out as
        fold's views are (FA4's results, empty_like of a view), else a copy."""
        n = self.stride
        if self.by_batch:
            BH, _, m = x.shape[:3]
            return x.transpose(1, 2).reshape(BH // self.heads, self.heads, m * n, *x.shape[3:])
        B, SH, m = x.shape[:3]
        return x.transpose(1, 2).reshape(B, m * n, SH // n, *x.shape[3:]).transpose(1, 2)

    def copied_bytes(self, tensors: tuple, out_bytes: int) -> int:
        """Bytes a folded Triton call moves besides its kernels: its output (`out_bytes`) copied back
        to natural order, read and written (Triton's output is allocated folded, unfold copies it),
        and each of `tensors` (q, k, v) the mapping cannot read as a view, likewise."""
        inputs = sum(x.numel() * x.element_size() for x in tensors if not _folds_as_view(x, self.stride, self.by_batch))
        return 2 * (out_bytes + inputs)

    def describe(self) -> str:
        n = self.stride
        views = (f"[B*H, {n}, N/{n}, D] (batch b*H + h, head r = token % {n})" if self.by_batch
                 else f"[B, {n}*H, N/{n}, D] (head r*H + h, r = token % {n})")
        return (f"residue classes mod {n} as heads: q, k, v viewed as {views}, mask "
                f"{ir.to_text(self.pattern.mask)} in class-local positions (runtime/fold.py)")


def _fold(x: torch.Tensor, n: int, by_batch: bool, copy: bool = True) -> torch.Tensor:
    """Fold.fold; copy=False raises a RuntimeError where the mapping cannot read x as a view."""
    B, H, N = x.shape[:3]
    t = x if by_batch else x.transpose(1, 2)
    shape = (B * H, N // n, n) if by_batch else (B, N // n, n * H)
    return (t.reshape if copy else t.view)(*shape, *x.shape[3:]).transpose(1, 2)


def _folds_as_view(x: torch.Tensor, n: int, by_batch: bool) -> bool:
    """Whether fold's mapping reads x without a copy."""
    try:
        _fold(x, n, by_batch, copy=False)
    except RuntimeError:
        return False
    return True


def fold_for(pattern: Pattern, s: Shapes, options: dict, tensors: tuple = ()) -> Fold | None:
    """The Fold this call runs in (see the module's docstring), or None: kernel_options fold=False,
    a mask that is not q = kv (mod s) and a formula of kv - q, or a call it cannot fold. `tensors`
    (q, k, v; meta tensors do) pick the mapping under which they fold as views (by_batch where
    neither does and Hq == Hkv)."""
    if (not options.get("fold", True) or pattern.has_block_mask or pattern.buffers
            or ir.free_vars(pattern.score) - {ir.SCORE_VAR}):
        return None
    found = bands.residues(pattern.mask, pattern.params, s.Q, s.KV)
    if found is None:
        return None
    n = found.stride
    by_batch = s.Hq == s.Hkv and (all(_folds_as_view(x, n, True) for x in tensors)
                                  or not all(_folds_as_view(x, n, False) for x in tensors))
    name = f"{pattern.name or 'pattern'}, residues mod {n} as heads"
    return Fold(n, by_batch, s.Hq, Pattern.from_ir(found.mask, pattern.score, ir.TRUE, pattern.params, name=name))


def view_class(*tensors: torch.Tensor) -> tuple[bool, ...]:
    """Whether each tensor is laid out head-major ([B, H, N, D]-like) rather than token-major: what
    decides a fold's mapping, so a reused kernel (api._kernel_for) keeps reading views."""
    return tuple(x.stride(1) >= x.stride(2) for x in tensors)
