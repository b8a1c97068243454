"""torch.compile: ac.attention as one custom op (with fake implementations and its autograd), so a
model calling it compiles with fullgraph=True. The graph holds the pattern's `uid` and the kernel
options (JSON) as constant strings; q, k, v and the pattern's buffers are the op's tensor
arguments. The same kernels and backward as runtime/autograd.py's eager path. Paged and packed
calls and dense decode steps (serving: inference only) are a second op that runs ac.attention's
eager serving path (the split-KV decode kernel).

A module of its own because importing it imports torch._dynamo (for `assume_constant_result`):
1.7-3 s that an eager call never pays (api imports it only while torch.compile traces a call).
"""
from __future__ import annotations

import json
from typing import Optional

import torch

from ..dsl.pattern import Pattern


@torch._dynamo.assume_constant_result
def options_json(kernel_options: dict | None) -> str:
    """kernel_options as the JSON string the custom ops take (tuples become lists)."""
    try:
        return json.dumps(dict(sorted((kernel_options or {}).items())))
    except TypeError as e:
        raise ValueError(f"kernel_options must be JSON-like under torch.compile: {e}") from None


def _pattern(uid: str) -> Pattern:
    pattern = Pattern.by_uid(uid)
    if pattern is None:
        raise RuntimeError(f"the pattern {uid} is gone (a compiled graph outlived its pattern)")
    return pattern


def _kernel(q, k, v, uid: str, options: str, scale):
    from .api import prepare_kernel

    return prepare_kernel(_pattern(uid), q, k, v, scale, json.loads(options))


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


@torch.library.custom_op("attncc::serving_attention", mutates_args=())
def serving_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, page_table: Optional[torch.Tensor],
               kv_lens: Optional[torch.Tensor], cu_seqlens_q: Optional[torch.Tensor],
               cu_seqlens_k: Optional[torch.Tensor], buffers: list[torch.Tensor], uid: str, options: str,
               scale: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, Q, Dv] in q's dtype, lse float32 [B, Hq, Q]) of ac.attention's paged call
    (page_table, kv_lens; k, v caches [num_pages, page_size, Hkv, D|Dv]), packed call
    (cu_seqlens_q, cu_seqlens_k; k, v [1, Hkv, total_k, D|Dv]) or dense call (all four None: a
    decode step, or kernel_options kv_splits) of the pattern `uid`."""
    from .api import attention

    out, lse = attention(q, k, v, _pattern(uid), scale=scale, return_lse=True, kernel_options=json.loads(options),
                         page_table=page_table, kv_lens=kv_lens, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    return out.contiguous(), lse.contiguous()


@serving_op.register_fake
def _(q, k, v, page_table, kv_lens, cu_seqlens_q, cu_seqlens_k, buffers, uid, options, scale):
    B, H, Q = q.shape[:3]
    return q.new_empty(B, H, Q, v.shape[3]), q.new_empty(B, H, Q, dtype=torch.float32)
