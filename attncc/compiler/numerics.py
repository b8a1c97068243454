"""The numeric plan: the machine type of every subexpression a generated kernel computes.

- Integers are int32 where the interval analysis over the whole domain (every b, h, q, kv, with
  the current params and buffers) bounds the value within int32, int64 where it may pass 2**31,
  and a PatternError where it may leave int64 (the arithmetic would wrap). The values are then
  exactly the reference's and the domain check's, which compute in int64: an index that passes
  the bounds check is the index the kernel reads.
- Floats are float64 where the value decides something discrete — a comparison, a rounding, a
  conversion to an integer, a floor division — and does not depend on the score (float masks,
  bucket indices): kernels then decide exactly as the reference and the block classifier, which
  evaluate in float64. Elsewhere (the score and what flows into it continuously) float32.

The plan depends on param values, shapes and buffer contents only through these choices, so a new
value recompiles nothing unless it moves a value across 2**31 (or a sign, see `nonneg`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ..dsl import ir, ops
from ..dsl.trace import PatternError
from . import intervals
from .domain import whole_domain

INT32 = (-2 ** 31, 2 ** 31 - 1)
INT64_SAFE = 2.0 ** 63 - 2.0 ** 13  # below int64's limit by more than float64's rounding there

# consumers that make a score-free float operand decide something discrete
_DISCRETE = frozenset(ops.COMPARE) | {"int", "floor", "ceil", "round", "floordiv", "mod"}


@dataclass(frozen=True)
class NumericPlan:
    """types: node -> "i32" | "i64" | "f32" | "f64" | "bool" (the type the kernel holds its value
    in); nonneg: integer nodes >= 0 everywhere (`//` and `%` on them skip the sign fix-up);
    offsets: load node -> "i32" | "i64", the width of its element-offset arithmetic."""
    types: dict
    nonneg: frozenset
    offsets: dict
    signature: str


def numeric_plan(roots: tuple[ir.Node, ...], params: dict, buffers: dict, B: int, H: int,
                 Q_LEN: int, KV_LEN: int, device=None) -> NumericPlan:
    """The plan for kernels evaluating `roots` over b < B, h < H, q < Q_LEN, kv < KV_LEN.

    The domain check (domain.py) must have passed: buffer indices are taken to be in range.
    """
    nodes = _nodes(roots)
    kinds = concrete_kinds(nodes, buffers)
    ranges = _int_ranges(nodes, kinds, params, buffers, B, H, Q_LEN, KV_LEN, device)
    discrete = _discrete_floats(nodes, kinds)
    _check_exact_powers(discrete, kinds)
    types = {n: _type(n, kinds[n], ranges, discrete) for n in nodes}
    nonneg = frozenset(n for n, (lo, _) in ranges.items() if lo >= 0)
    offsets = {n: _offset_type(n, buffers) for n in nodes if isinstance(n, ir.Load)}
    code = ";".join(",".join(f"{types[n]}{'+' if n in nonneg else ''}{offsets.get(n, '')}"
                             for n in ir.walk(root)) for root in roots)
    return NumericPlan(types, nonneg, offsets, hashlib.sha256(code.encode()).hexdigest()[:16])


EXACT_EXPONENTS = (0, 0.5, 1, 2, 3, -1, -2)  # x ** c that the kernels compute bit for bit as torch does


def _check_exact_powers(discrete, kinds) -> None:
    """A float `**` computed in float64 (it decides something discrete) must be one the kernels
    compute exactly as torch: a constant exponent of EXACT_EXPONENTS (sqrt, products, quotients).
    Others go through exp2(y * log2(x)) in the kernels and a libm pow in torch, which differ in
    the last bits (a comparison at the boundary would flip): refused."""
    for n in discrete:
        if isinstance(n, ir.Op) and n.op == "pow" and kinds[n] == "float":
            expo = n.args[1]
            if not (isinstance(expo, ir.Const) and not isinstance(expo.value, bool)
                    and expo.value in EXACT_EXPONENTS):
                raise PatternError(
                    f"{n} decides a comparison, rounding or conversion, so it is computed in float64 as "
                    f"torch computes it; the kernels match torch's ** bit for bit only for the constant "
                    f"exponents {', '.join(map(str, EXACT_EXPONENTS))}: write the power as a product "
                    f"(x * x * x * x), which computes as written")


def _nodes(roots) -> list[ir.Node]:
    """Every distinct node of `roots`, children before parents."""
    seen, out = set(), []
    for root in roots:
        for n in ir.walk(root):
            if n not in seen:
                seen.add(n)
                out.append(n)
    return out


def concrete_kinds(nodes, buffers) -> dict[ir.Node, str]:
    """The kind of every node with the buffers bound ("any" resolved by the buffers' dtypes)."""
    out: dict[ir.Node, str] = {}
    for n in nodes:
        kind = ir.kind_of(n)
        if kind == "any" and isinstance(n, ir.Load):
            t = buffers[n.buffer]
            kind = "bool" if t.dtype == torch.bool else "float" if t.is_floating_point() else "int"
        elif kind == "any":
            kind = ir.result_kind(ops.TABLE[n.op].kind, [out[c] for c in n.args], n.args)
        if isinstance(n, ir.Op) and n.op in ops.NOT_ON_BOOLS and all(out[c] == "bool" for c in n.args):
            raise PatternError(f"{n}: torch does not compute {n.op} of booleans (here a bool buffer's values); "
                               f"read them as integers first (.long())" + (", or use ^" if n.op == "sub" else ""))
        if isinstance(n, ir.Op) and ops.TABLE[n.op].operands == "bool" and any(out[c] != "bool" for c in n.args):
            bad = next(c for c in n.args if out[c] != "bool")
            raise PatternError(f"{n}: {bad} holds {out[bad]} values, and torch's &, |, ~ on them are bitwise, which "
                               f"attncc does not compute: compare them first (e.g. {bad} != 0)")
        out[n] = kind
    return out


def check_int64(roots: tuple[ir.Node, ...], params: dict, buffers: dict, B: int, H: int, Q_LEN: int, KV_LEN: int,
                device=None) -> None:
    """PatternError unless every integer expression of `roots` stays within int64 over the domain
    (domain.check_domain runs it, so the reference and the block masks refuse what the kernels do)."""
    nodes = _nodes(roots)
    _int_ranges(nodes, concrete_kinds(nodes, buffers), params, buffers, B, H, Q_LEN, KV_LEN, device)


def _int_ranges(nodes, kinds, params, buffers, B, H, Q_LEN, KV_LEN, device) -> dict[ir.Node, tuple[float, float]]:
    """(lo, hi) over the whole domain of every integer node (float64 bounds)."""
    box = whole_domain(B, H, Q_LEN, KV_LEN, params, buffers, device)
    values: dict[ir.Node, object] = {}
    out = {}
    for n in nodes:
        values[n] = intervals.evaluate_node(n, [values[c] for c in n.children()], box)
        if kinds[n] == "int":
            num = intervals.as_num(box, values[n])
            lo, hi = float(num.lo.min()), float(num.hi.max())
            # a buffer read holds what its (at most 64-bit) buffer holds, whatever its float64 bounds say
            if not isinstance(n, ir.Load) and not (-INT64_SAFE <= lo and hi <= INT64_SAFE):
                bad = hi if hi > INT64_SAFE else lo
                raise PatternError(f"the integer expression {n} may reach {bad:.4g}, beyond what int64 holds "
                                   f"(attncc vouches for |values| <= 2**63 - 2**13, its bounds being float64); "
                                   "bound it (clamp, %) before it grows")
            out[n] = (lo, hi)
    return out


def _discrete_floats(nodes, kinds) -> set[ir.Node]:
    """Score-free float nodes whose value decides something discrete (see the module docstring)."""
    parents: dict[ir.Node, list[ir.Node]] = {}
    for n in nodes:
        for c in n.children():
            parents.setdefault(c, []).append(n)
    out: set[ir.Node] = set()
    for n in reversed(nodes):  # parents first
        if kinds[n] != "float" or not ir.score_free(n):
            continue
        for p in parents.get(n, ()):
            if (isinstance(p, ir.Op) and p.op in _DISCRETE and ir.score_free(p)) \
                    or p in out:
                out.add(n)
                break
    return out


def _width(lo: float, hi: float) -> str:
    return "i32" if INT32[0] <= lo and hi <= INT32[1] else "i64"


def _type(n: ir.Node, kind: str, ranges, discrete) -> str:
    if kind == "bool":
        return "bool"
    if kind == "float":
        return "f64" if n in discrete else "f32"
    if isinstance(n, ir.Var):
        return "i32"
    return _width(*ranges[n])  # an operator may compute wider (its operands' type) and narrow the result


def _offset_type(n: ir.Load, buffers) -> str:
    """i32 when every element offset sum(index_d * stride_d) of the (in-range) read fits int32."""
    t = buffers[n.buffer]
    reach = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    return "i32" if reach <= INT32[1] else "i64"
