"""Evaluate IR with torch: dense masks, the reference's scores, exact per-tile evaluation.

Values are tensors that broadcast against each other: pass `q` as `[..., Q, 1]` and `kv` as
`[..., 1, KV]` and a mask comes back as `[..., Q, KV]`. Integer arithmetic is int64 with torch's
floor semantics for `//` and `%`; float arithmetic is in `float_dtype` (float64 for the oracle).
"""
from __future__ import annotations

import numbers
from typing import Callable, Mapping

import torch

from ..dsl import ir, ops
from ..dsl.pattern import Pattern, block_at_tokens
from ..dsl.trace import PatternError


def evaluate(node: ir.Node, env: Mapping[str, torch.Tensor], params: Mapping[str, ir.Value],
             buffers: Mapping[str, torch.Tensor], *, float_dtype: torch.dtype = torch.float64,
             check_bounds: bool = True, clamp_loads: bool = False) -> torch.Tensor:
    """The value of `node` with variables from `env` (int64 / float tensors, broadcastable).

    Buffer indices are checked against the buffer's shape (a PatternError, never a wrap-around)
    unless `check_bounds` is False (inside torch transforms such as vmap, where values are opaque);
    `clamp_loads` clamps them into the buffer instead (the domain check's probes, which decide
    whether the indices are in range). An integer division by zero gives an arbitrary value
    (the divisor reads as 1) instead of failing, as in the kernels: the domain check refuses
    patterns where such a value could matter.
    """
    device = next((t.device for t in env.values() if isinstance(t, torch.Tensor)), None)
    memo: dict[int, torch.Tensor] = {}
    for n in ir.walk(node):
        if isinstance(n, ir.Var):
            if n.name not in env:
                raise PatternError(f"variable {n.name!r} has no value here")
            val = env[n.name]
        elif isinstance(n, ir.Const):
            dtype = torch.bool if isinstance(n.value, bool) else torch.int64 if isinstance(n.value, int) else float_dtype
            val = torch.tensor(n.value, dtype=dtype, device=device)
        elif isinstance(n, ir.Param):
            if n.name not in params:
                raise PatternError(f"param {n.name!r} has no value here")
            dtype = torch.int64 if n.kind == "int" else float_dtype
            val = torch.tensor(params[n.name], dtype=dtype, device=device)
        elif isinstance(n, ir.Load):
            val = _load(n, buffers, [memo[id(i)] for i in n.index], device, float_dtype, check_bounds, clamp_loads)
        else:
            row = ops.TABLE[n.op]
            args = _operands(row, n, [memo[id(a)] for a in n.args], float_dtype)
            if n.op == "pow" and isinstance(n.args[1], ir.Const):  # `x ** c` as torch computes it for a
                val = torch.pow(args[0], n.args[1].value)      # number c (** 0.5 is sqrt, ** 2 is x * x)
            else:
                val = row.torch(*args)
        memo[id(n)] = val
    return memo[id(node)]


def _operands(row: ops.Operator, n: ir.Op, args: list[torch.Tensor], float_dtype) -> list[torch.Tensor]:
    """The operands converted as the operator's row says: booleans, floats, or a common numeric type."""
    if row.operands == "bool":
        return [a.bool() for a in args]
    if row.operands == "where":
        return [args[0].bool(), *_promote(args[1:], float_dtype)]
    if row.kind == "float" or (row.kind == "pow" and ir.kind_of(n) == "float"):  # q ** -1 is 1 / q, not 0
        return [_number(a, float_dtype) for a in args]
    if row.kind == "int" or row.arity == 1:
        return [a.long() if a.dtype == torch.bool else a for a in args]
    args = _promote(args, float_dtype)
    if n.op in ("floordiv", "mod") and not args[1].is_floating_point():
        args[1] = torch.where(args[1] == 0, 1, args[1])
    return args


def _number(x: torch.Tensor, float_dtype) -> torch.Tensor:
    return x if x.is_floating_point() else x.to(float_dtype)


def _promote(xs, float_dtype) -> list[torch.Tensor]:
    if any(x.is_floating_point() for x in xs):
        return [x.to(float_dtype) for x in xs]
    if any(x.dtype != torch.bool for x in xs):
        return [x.long() if x.dtype == torch.bool else x for x in xs]
    return list(xs)


def buffer_of(n: ir.Load, buffers: Mapping[str, torch.Tensor | None]) -> torch.Tensor:
    """The tensor `n` reads; PatternError when it is unbound or its rank is not len(n.index)."""
    buf = buffers.get(n.buffer)
    if buf is None:
        raise PatternError(f"buffer {n.buffer!r} has no tensor; bind it first")
    if buf.dim() != len(n.index):
        raise PatternError(f"buffer {n.buffer!r} has {buf.dim()} dims but is indexed with {len(n.index)}")
    return buf


def _load(n: ir.Load, buffers, index: list[torch.Tensor], device, float_dtype, check_bounds, clamp) -> torch.Tensor:
    buf = buffer_of(n, buffers)
    if device is not None and buf.device != device:
        buf = buf.to(device)
    for d, i in enumerate(index):  # e.g. doc[slopes[h]]: torch would refuse, never truncate
        if i.is_floating_point() or i.dtype == torch.bool:
            raise PatternError(f"index {n.index[d]} of buffer {n.buffer!r} is {i.dtype}, not an integer")
    index = [i.long() for i in index]
    if clamp:
        index = [i.clamp(0, buf.shape[d] - 1) for d, i in enumerate(index)]
    elif check_bounds:
        for d, i in enumerate(index):
            lo, hi = int(i.min()), int(i.max())
            if lo < 0 or hi >= buf.shape[d]:
                raise PatternError(f"index {n.index[d]} of buffer {n.buffer!r} reaches {lo if lo < 0 else hi}, "
                                   f"outside dim {d} of size {buf.shape[d]}")
    val = buf[tuple(index)]
    if val.is_floating_point():
        return val.to(float_dtype)
    return val if val.dtype == torch.bool else val.long()


def token_mask(pattern: Pattern) -> ir.Node:
    """The full token-level mask: the mask and the block predicate at its own granularity
    (`block[qb := q // BQ, kb := kv // BK]`)."""
    return ir.op("and", pattern.mask, block_at_tokens(pattern.block, pattern.block_size))


def check_size(name: str, value, reads: bool | None = None) -> int:
    """A positive size. For B and H, `reads` says whether the mask reads b / h: None then means
    1 (broadcast), allowed only if it does not. Lengths and tiles (reads None) must be ints.
    """
    if value is None and reads is not None:
        if reads:
            raise ValueError(f"{name}=None, but the pattern's mask depends on {name[0].lower()}; pass {name}")
        return 1
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)  # numpy integers too
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def index_env(B: int, H: int, Q: int, KV: int, device=None) -> dict[str, torch.Tensor]:
    """b, h, q, kv as int64 tensors shaped to broadcast to [B, H, Q, KV]."""
    ar = lambda n: torch.arange(n, device=device, dtype=torch.int64)
    return {"b": ar(B).view(B, 1, 1, 1), "h": ar(H).view(1, H, 1, 1),
            "q": ar(Q).view(1, 1, Q, 1), "kv": ar(KV).view(1, 1, 1, KV)}


def dense_mask(pattern: Pattern, B: int, H: int, Q: int, KV: int, device=None) -> torch.Tensor:
    """bool [B, H, Q, KV]: which pairs attend (B or H of 1 when the pattern ignores b or h)."""
    from .domain import check_domain

    pattern.require_bound()
    mask = token_mask(pattern)
    check_domain(pattern, (mask,), B, H, Q, KV, device)
    m = evaluate(mask, index_env(B, H, Q, KV, device), pattern.params, pattern.buffers)
    return m.bool().expand(B, H, Q, KV)


def as_flex_mods(pattern: Pattern) -> tuple[Callable, Callable | None]:
    """(mask_mod, score_mod) callables with FlexAttention's signatures computing this pattern.

    The block predicate is folded into the mask at the pattern's block size.
    """
    pattern.require_bound()
    mask_ir = token_mask(pattern)

    def mask_mod(b, h, q_idx, kv_idx):
        env = {"b": b, "h": h, "q": q_idx, "kv": kv_idx}
        return evaluate(mask_ir, env, pattern.params, pattern.buffers, float_dtype=torch.float32,
                        check_bounds=False).bool()

    def score_mod(score, b, h, q_idx, kv_idx):
        env = {"score": score, "b": b, "h": h, "q": q_idx, "kv": kv_idx}
        return evaluate(pattern.score, env, pattern.params, pattern.buffers, float_dtype=score.dtype,
                        check_bounds=False)

    return mask_mod, (score_mod if pattern.has_score_mod else None)
