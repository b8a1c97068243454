"""Autograd for attncc's kernels: `attention(kernel, q, k, v, ...)` as a torch.autograd.Function.

The forward saves q, k, v, the output and the log-sum-exp; the backward runs the generated
backward kernels (FlashAttention-2 style, deterministic: the same inputs give bitwise-equal
gradients). Gradients flow through `lse` too when it is returned. Gradients of the pattern's float
buffers (a learnable bias table, ALiBi slopes) are not built yet: a buffer that requires grad is a
NotImplementedError rather than a silently missing gradient. Under torch.compile the same
kernels run as the custom ops attncc::attention and attncc::attention_backward (below).
"""
from __future__ import annotations

import itertools
import threading
import weakref
from typing import Optional

import torch

from ..dsl.pattern import Pattern


def needs_grad(pattern: Pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether autograd must record this call (grad mode on and q, k, v or a buffer requiring grad)."""
    if not torch.is_grad_enabled():
        return False
    return any(t.requires_grad for t in (q, k, v)) or any(
        t is not None and t.requires_grad for t in pattern.buffers.values())


def refuse_buffer_grads(pattern: Pattern) -> None:
    """NotImplementedError when a buffer of the pattern requires grad (not built yet)."""
    wanting = [name for name, t in pattern.buffers.items() if t is not None and t.requires_grad]
    if wanting:
        raise NotImplementedError(
            f"buffer(s) {wanting} require grad, but gradients of a pattern's buffers are not built yet "
            "(gradients of q, k and v are); detach them, e.g. pattern.bind(name=tensor.detach())")


def attention(kernel, q, k, v, s, return_lse: bool):
    """kernel's attention of q, k, v (shapes s) recorded for autograd; out (and lse)."""
    refuse_buffer_grads(kernel.pattern)
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


# ----------------------------------------------------------------------------------------------
# torch.compile: ac.attention is one custom op (with fake implementations and its autograd), so a
# model calling it compiles with fullgraph=True. The pattern and kernel options travel as a key of
# a process-wide registry (dynamo bakes the key in as a constant); q, k, v and the pattern's
# buffers are the op's tensor arguments.

_REGISTRY: dict[str, tuple] = {}  # key -> (weakref to the Pattern, kernel_options)
_KEYS: dict[tuple, str] = {}      # (id(pattern), options) -> key
_KEY_LOCK = threading.Lock()


@torch._dynamo.assume_constant_result
def registry_key(pattern: Pattern, kernel_options: tuple) -> str:
    """The registry key of (pattern, kernel_options), registered on first use; dropped with the pattern."""
    with _KEY_LOCK:
        slot = (id(pattern), kernel_options)
        key = _KEYS.get(slot)
        if key is None or _REGISTRY[key][0]() is not pattern:
            key = f"attncc-pattern-{next(_COUNTER)}"
            _REGISTRY[key] = (weakref.ref(pattern), dict(kernel_options))
            _KEYS[slot] = key
            weakref.finalize(pattern, _forget, key, slot)
        return key


def _forget(key: str, slot: tuple) -> None:
    with _KEY_LOCK:
        _REGISTRY.pop(key, None)
        if _KEYS.get(slot) == key:
            del _KEYS[slot]


_COUNTER = itertools.count()


def _kernel(q, k, v, key: str, scale):
    from .api import prepare_kernel

    pattern = _REGISTRY[key][0]()
    if pattern is None:
        raise RuntimeError(f"the pattern of {key} is gone (a compiled graph outlived its pattern)")
    return prepare_kernel(pattern, q, k, v, scale, _REGISTRY[key][1])


@torch.library.custom_op("attncc::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, buffers: list[torch.Tensor], key: str,
                 scale: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, Q, Dv] in q's dtype, lse float32 [B, Hq, Q]) of the registered pattern `key`."""
    kernel, s = _kernel(q, k, v, key, scale)
    return kernel.forward(q, k, v, s)


@attention_op.register_fake
def _(q, k, v, buffers, key, scale):
    B, H, Q = q.shape[:3]
    return q.new_empty(B, H, Q, v.shape[3]), q.new_empty(B, H, Q, dtype=torch.float32)


@torch.library.custom_op("attncc::attention_backward", mutates_args=())
def attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                          lse: torch.Tensor, dout: Optional[torch.Tensor], dlse: Optional[torch.Tensor],
                          buffers: list[torch.Tensor], key: str, scale: Optional[float]
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of attention_op's call with the same arguments."""
    kernel, s = _kernel(q, k, v, key, scale)
    return kernel.backward(q, k, v, out, lse, dout, dlse, s)


@attention_backward_op.register_fake
def _(q, k, v, out, lse, dout, dlse, buffers, key, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, buffers, key, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.key, ctx.scale, ctx.buffers = key, scale, buffers


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(q, k, v, out, lse, dout, dlse, ctx.buffers, ctx.key, ctx.scale)
    return dq, dk, dv, [None] * len(ctx.buffers), None, None


attention_op.register_autograd(_backward, setup_context=_setup)
