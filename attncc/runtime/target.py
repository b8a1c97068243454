"""TargetKernel: what `ac.compile(..., target=...)` returns — the kernel the automatic choice
takes on a GPU named by a shipped profile (runtime/choices.TARGETS), described on any machine.

q, k, v only lend their shapes and dtype (meta tensors do); block masks are built on the CPU.
It has a Kernel's `config`, `source`, `block_mask` and `predicted_ms`, and cannot be called.
"""
from __future__ import annotations

import functools

import torch

from ..compiler import cost
from ..compiler.codegen import BackwardTiles, generate
from ..compiler.lowering import BufferSpec
from ..dsl.pattern import Pattern
from . import fa4
from .choices import TARGETS, choose_tma, pick_backward_tiles, tile_tuple
from .inputs import Shapes

_CPU = torch.device("cpu")


class TargetKernel:
    """`chosen` = (backend, forward tiles), the choice (choices.choose_on_target) for `pattern` (in
    kernel order; `layout` its token layout or None, `fold` its residue fold or None) at the
    kernels' shapes s and `dtype` on the GPU `target` names, with FlashAttention-4 and cuDNN taken
    to be installed."""

    def __init__(self, pattern: Pattern, s: Shapes, dtype: torch.dtype, target: str, options: dict, layout,
                 fold, chosen: tuple):
        from .kernel import META_CACHE

        self.pattern, self.target, self.layout, self.fold, self._shapes = pattern, target, layout, fold, s
        self._dtype, self._options = dtype, options
        self.backend, self.tiles = chosen
        self.block_mask, self._meta = META_CACHE.get(pattern, s, self.tiles, _CPU)

    @property
    def shapes(self) -> Shapes:
        """The shapes the kernels run at (the folded call's where the call folds)."""
        return self._shapes

    @functools.cached_property
    def backward_tiles(self) -> BackwardTiles:
        """The tiles attncc's Triton backward would run at on the target (choices.pick_backward_tiles)."""
        return pick_backward_tiles(self.pattern, self._shapes, self._dtype, self._options, _CPU,
                                   cost.load_profile(self.target))

    @property
    def config(self) -> dict:
        t = self.tiles
        out = {"backend": self.backend, "target": self.target, "BLOCK_M": t.BLOCK_M, "BLOCK_N": t.BLOCK_N}
        if self.backend != "fa4":
            out.update(num_warps=t.num_warps, num_stages=t.num_stages,
                       tma=choose_tma(self._shapes, torch.device("cuda"), self._options))
        if self.backend != "sdpa-cudnn":  # fa4: where attncc's Triton backward runs after FA4's forward
            b = self.backward_tiles
            out.update(dkdv_tiles=tile_tuple(b.dkdv), dq_tiles=tile_tuple(b.dq))
        if self.fold is not None:
            out["fold"] = self.fold.describe()
        return out

    @property
    def predicted_ms(self) -> float | None:
        """The simulator's forward ms on the target's profile, fa4's copies of a token layout included
        (None outside what it models: float32, a backend it lacks at this head dim)."""
        from .choices import modelled_ms

        return modelled_ms(self.pattern, self._shapes, self.backend, self.tiles, self._dtype,
                           cost.load_profile(self.target), _CPU, self.layout)

    @property
    def source(self) -> str:
        """fa4: the CuTe hooks and FA4's calls; otherwise attncc's Triton forward (for sdpa-cudnn the
        fallback that runs where cuDNN cannot)."""
        if self.backend == "fa4":
            return fa4.describe(self.pattern, self._shapes, _CPU)
        import attncc

        specs = {n: BufferSpec.of(n, t) for n, t in self.pattern.buffers.items()}
        return generate("forward", self.pattern, specs, self.tiles, self._meta.plan, attncc.__version__,
                        self.layout if self.backend == "triton" else None)

    def __call__(self, *args, **kwargs):
        raise ValueError(f"this kernel describes a run on the {TARGETS[self.target][0]} (ac.compile(..., "
                         f"target={self.target!r})); compile with tensors on a GPU to run one")

    def __repr__(self) -> str:
        return f"TargetKernel({self.pattern!r}, {self.config})"

