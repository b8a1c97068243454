"""Autograd for attncc's kernels. The backward kernel is not built yet: inputs that require grad
are refused with a clear error rather than silently returning outputs without gradients."""
from __future__ import annotations

import torch


def check_no_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise NotImplementedError when autograd would need a gradient of q, k or v."""
    if not torch.is_grad_enabled():
        return
    wanting = [n for n, t in (("q", q), ("k", k), ("v", v)) if t.requires_grad]
    if wanting:
        raise NotImplementedError(
            f"{', '.join(wanting)} require grad, but attncc's backward kernel is not built yet; "
            "call under torch.no_grad() or pass detached tensors")
