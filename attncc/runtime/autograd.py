"""Autograd for attncc's kernels: `attention(kernel, q, k, v, ...)` as a torch.autograd.Function.

The forward saves q, k, v, the output and the log-sum-exp; the backward runs the generated
backward kernels (FlashAttention-2 style, deterministic: the same inputs give bitwise-equal
gradients). Gradients flow through `lse` too when it is returned, and to the pattern's float
buffers that require grad (a learnable bias table, ALiBi slopes: runtime/buffer_grads.py). Under
torch.compile the same kernels run as the custom ops attncc::attention and
attncc::attention_backward (runtime/compiled_op.py).
"""
from __future__ import annotations

import torch

from ..dsl.pattern import Pattern


def needs_grad(pattern: Pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether autograd must record this call (grad mode on and q, k, v or a buffer requiring grad)."""
    if not torch.is_grad_enabled():
        return False
    return any(t.requires_grad for t in (q, k, v)) or bool(grad_buffers(pattern))


def grad_buffers(pattern: Pattern) -> list[str]:
    """The names of the pattern's buffers that require grad (floating point by torch's rules)."""
    return [name for name, t in pattern.buffers.items() if t is not None and t.requires_grad]


def attention(kernel, q, k, v, s, return_lse: bool):
    """kernel's attention of q, k, v (shapes s) recorded for autograd; out (and lse)."""
    names = grad_buffers(kernel.pattern)
    out, lse = _Attention.apply(q, k, v, kernel, s, names, *(kernel.pattern.buffers[n] for n in names))
    return (out, lse) if return_lse else out


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kernel, s, names, *buffers):
        out, lse = kernel.forward(q, k, v, s)
        # every buffer the backward reads again is saved too, so a write to one between forward and
        # backward (a bias table stepped, doc ids copied in for the next batch) is torch's in-place
        # error at backward instead of gradients of a forward that never ran
        read = [t for t in kernel.pattern.buffers.values() if isinstance(t, torch.Tensor)]
        ctx.save_for_backward(q, k, v, out, lse, *read)
        ctx.kernel, ctx.shapes, ctx.names = kernel, s, names
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors[:5]  # unpacking all of them checks the buffers' versions
        dq, dk, dv = ctx.kernel.backward(q, k, v, out, lse, dout, dlse, ctx.shapes)
        wanted = [n for n, need in zip(ctx.names, ctx.needs_input_grad[6:]) if need]
        grads = {}
        if wanted:
            grads = dict(zip(wanted, ctx.kernel.buffer_backward(wanted, q, k, v, out, lse, dout, dlse, ctx.shapes)))
        return (dq, dk, dv, None, None, None, *(grads.get(n) for n in ctx.names))
