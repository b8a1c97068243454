"""Autograd for attncc's kernels: `attention(kernel, q, k, v, ...)` as a torch.autograd.Function.

The forward saves q, k, v, the output and the log-sum-exp; the backward runs the generated
backward kernels (FlashAttention-2 style, deterministic: the same inputs give bitwise-equal
gradients). Gradients flow through `lse` too when it is returned, and to the pattern's float
buffers that require grad (a learnable bias table, ALiBi slopes: runtime/buffer_grads.py). Under
torch.compile the same kernels run as the custom ops attncc::attention and
attncc::attention_backward (below).
"""
from __future__ import annotations

import json
from typing import Optional

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
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.kernel, ctx.shapes, ctx.names = kernel, s, names
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.kernel.backward(q, k, v, out, lse, dout, dlse, ctx.shapes)
        wanted = [n for n, need in zip(ctx.names, ctx.needs_input_grad[6:]) if need]
        grads = {}
        if wanted:
            grads = dict(zip(wanted, ctx.kernel.buffer_backward(wanted, q, k, v, out, lse, dout, dlse, ctx.shapes)))
        return (dq, dk, dv, None, None, None, *(grads.get(n) for n in ctx.names))


# ----------------------------------------------------------------------------------------------
# torch.compile: ac.attention is one custom op (with fake implementations and its autograd), so a
# model calling it compiles with fullgraph=True. The graph holds the pattern's `uid` and the
# kernel options (JSON) as constant strings; q, k, v and the pattern's buffers are the op's
# tensor arguments.

@torch._dynamo.assume_constant_result
def options_json(kernel_options: dict | None) -> str:
    """kernel_options as the JSON string the custom ops take (tuples become lists)."""
    try:
        return json.dumps(dict(sorted((kernel_options or {}).items())))
    except TypeError as e:
        raise ValueError(f"kernel_options must be JSON-like under torch.compile: {e}") from None


def _kernel(q, k, v, uid: str, options: str, scale):
    from .api import prepare_kernel

    pattern = Pattern.by_uid(uid)
    if pattern is None:
        raise RuntimeError(f"the pattern {uid} is gone (a compiled graph outlived its pattern)")
    return prepare_kernel(pattern, q, k, v, scale, json.loads(options))


@torch.library.custom_op("attncc::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, buffers: list[torch.Tensor], uid: str,
                 options: str, scale: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, Q, Dv] in q's dtype, lse float32 [B, Hq, Q]) of the pattern `uid`, with the
    kernel options `options` (JSON)."""
    kernel, s = _kernel(q, k, v, uid, options, scale)
    out, lse = kernel.forward(q, k, v, s)
    return out.contiguous(), lse  # the fake's strides (the fa4 backend returns a transposed view)


@attention_op.register_fake
def _(q, k, v, buffers, uid, options, scale):
    B, H, Q = q.shape[:3]
    return q.new_empty(B, H, Q, v.shape[3]), q.new_empty(B, H, Q, dtype=torch.float32)


@torch.library.custom_op("attncc::attention_backward", mutates_args=())
def attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                          lse: torch.Tensor, dout: Optional[torch.Tensor], dlse: Optional[torch.Tensor],
                          buffers: list[torch.Tensor], want: list[bool], uid: str, options: str,
                          scale: Optional[float]) -> list[torch.Tensor]:
    """[dq, dk, dv, then the gradient of each buffer whose `want` is True] of attention_op's call."""
    kernel, s = _kernel(q, k, v, uid, options, scale)
    names = [n for n, w in zip(kernel.pattern.buffers, want) if w]
    grads = [g.contiguous() for g in kernel.backward(q, k, v, out, lse, dout, dlse, s)]
    return grads + (kernel.buffer_backward(names, q, k, v, out, lse, dout, dlse, s) if names else [])


@attention_backward_op.register_fake
def _(q, k, v, out, lse, dout, dlse, buffers, want, uid, options, scale):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            *(torch.empty_like(b) for b, w in zip(buffers, want) if w)]


def _setup(ctx, inputs, output):
    q, k, v, buffers, uid, options, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.uid, ctx.options, ctx.scale, ctx.buffers = uid, options, scale, buffers
    ctx.want = [b.requires_grad for b in buffers]


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv, *grads = attention_backward_op(q, k, v, out, lse, dout, dlse, ctx.buffers, ctx.want, ctx.uid,
                                               ctx.options, ctx.scale)
    grads = iter(grads)
    return dq, dk, dv, [next(grads) if w else None for w in ctx.want], None, None, None


attention_op.register_autograd(_backward, setup_context=_setup)
