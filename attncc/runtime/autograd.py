"""Autograd for attncc's kernels: `attention(kernel, q, k, v, ...)` as a torch.autograd.Function.

The forward saves q, k, v, the output and the log-sum-exp; the backward runs the generated
backward kernels (FlashAttention-2 style, deterministic: the same inputs give bitwise-equal
gradients). Gradients flow through `lse` too when it is returned. Gradients of the pattern's float
buffers (a learnable bias table, ALiBi slopes) are not built yet: a buffer that requires grad is a
NotImplementedError rather than a silently missing gradient.
"""
from __future__ import annotations

import torch

from ..dsl.pattern import Pattern


def needs_grad(pattern: Pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether autograd must record this call (grad mode on and q, k, v or a buffer requiring grad)."""
    if not torch.is_grad_enabled():
        return False
    return any(t.requires_grad for t in (q, k, v)) or any(
        t is not None and t.requires_grad for t in pattern.buffers.values())


def attention(kernel, q, k, v, s, return_lse: bool):
    """kernel's attention of q, k, v (shapes s) recorded for autograd; out (and lse)."""
    wanting = [name for name, t in kernel.pattern.buffers.items() if t is not None and t.requires_grad]
    if wanting:
        raise NotImplementedError(
            f"buffer(s) {wanting} require grad, but gradients of a pattern's buffers are not built yet "
            "(gradients of q, k and v are); detach them, e.g. pattern.bind(name=tensor.detach())")
    out, lse = _Attention.apply(q, k, v, kernel, s)
    return (out, lse) if return_lse else out


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kernel, s):
        out, lse = kernel.forward(q, k, v, s)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.kernel, ctx.shapes = kernel, s
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.kernel.backward(q, k, v, out, lse, dout, dlse, ctx.shapes)
        return dq, dk, dv, None, None
