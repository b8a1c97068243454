"""TileLists: the FULL and PARTIAL tile lists a generated kernel walks, in the form it reads them
(the forward's per query tile, the backward's per kv tile, the decode kernel's per (sequence, kv
head)); KernelMeta, BackwardMeta (runtime/kernel.py) and DecodeMeta (runtime/decode.py) extend it."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TileLists:
    """full_num / partial_num: int32 [B|1, H|1, *rows], each row's FULL / PARTIAL tile count;
    full_idx / partial_idx: int32 [.., width >= 1], its tiles ascending; stride_b / stride_h: the
    element strides of the counts over b and h, 0 on a broadcast dim; *_contiguous: every row's
    list is a run first..first+count-1 (the kernel then loads no indices)."""
    full_num: torch.Tensor
    full_idx: torch.Tensor
    partial_num: torch.Tensor
    partial_idx: torch.Tensor
    stride_b: int
    stride_h: int
    full_contiguous: bool
    partial_contiguous: bool

    @staticmethod
    def fields(full_num: torch.Tensor, full_idx: torch.Tensor, partial_num: torch.Tensor,
               partial_idx: torch.Tensor) -> dict:
        """TileLists' fields of these lists: contiguous copies, their strides and runs."""
        Bm, Hm = full_num.shape[:2]
        rows = math.prod(full_num.shape[2:])
        return dict(full_num=full_num.contiguous(), full_idx=full_idx.contiguous(),
                    partial_num=partial_num.contiguous(), partial_idx=partial_idx.contiguous(),
                    stride_b=Hm * rows if Bm > 1 else 0, stride_h=rows if Hm > 1 else 0,
                    full_contiguous=lists_contiguous(full_num, full_idx),
                    partial_contiguous=lists_contiguous(partial_num, partial_idx))


def lists_contiguous(num: torch.Tensor, idx: torch.Tensor) -> bool:
    """Whether every row's (ascending) list of `num` entries is a run of consecutive tiles."""
    if idx.shape[-1] == 0:
        return True
    last = idx.gather(-1, (num.long() - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return bool(((num == 0) | (last - idx[..., 0] == num - 1)).all())
