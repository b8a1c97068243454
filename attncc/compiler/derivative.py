"""Derivatives of score mods as IR: d(score)/d(raw score) and d(score)/d(a buffer read).

`derivative(root, wrt)` runs forward mode over the IR: every node's derivative from its operands'
by the `derivative` column of the operator table (dsl/ops.py), built with `ir.op` like any other
IR, so the backward kernels print it with the same lowering as the mods themselves. `None` is an
exact zero throughout (integers, booleans, floor / ceil / round / int / comparisons, and anything
not depending on `wrt`), so zero terms never reach the kernel. A small algebraic pass through sympy
(`simplify`) then cancels what forward mode leaves behind (`cap * ((1 - t*t) * (1 / cap))` ->
`1 - t ** 2` for soft-capping) where that makes the expression smaller. Its results are kept in
attncc's disk cache by the expression's shape (leaves abstracted), so a process that meets a
known score mod never imports sympy (0.3 s of a first call).

Conventions are torch's autograd: min / max split ties evenly, abs has derivative 0 at 0, the
derivative of `where(c, x, y)` is that of the branch taken.
"""
from __future__ import annotations

import json
import math

from ..dsl import ir, ops

ONE = ir.const(1.0)
ZERO = ir.const(0.0)
_SIMPLIFY_LIMIT = 80  # nodes: larger derivatives are kept as forward mode built them


def derivative(root: ir.Node, wrt: ir.Node) -> ir.Node | None:
    """d(root)/d(wrt) as a float IR expression, or None where it is identically zero.

    root: a score expression (float); wrt: `ir.Var("score")` or one `ir.Load` node of a float
    buffer (its other reads of the same buffer are other variables: sum their gradients).
    """
    d: dict[ir.Node, ir.Node | None] = {}
    for n in ir.walk(root):
        if n is wrt:
            d[n] = ONE
        elif not isinstance(n, ir.Op) or ir.kind_of(n) in ("int", "bool"):
            d[n] = None
        else:
            da = [d[a] for a in n.args]
            d[n] = None if all(x is None for x in da) else ops.TABLE[n.op].derivative(_SELF, n, n.args, da)
    out = d[root]
    if out is not None and ir.kind_of(out) != "float":
        out = ir.op("mul", ONE, out)
    return None if out is None else simplify(out)


# -- the builders the table's derivative column calls (D): None is an exact zero

def add(x, y):
    if x is None:
        return y
    return x if y is None else ir.op("add", x, y)


def sub(x, y):
    if y is None:
        return x
    return ir.op("neg", y) if x is None else ir.op("sub", x, y)


def mul(x, y):
    return None if x is None or y is None else ir.op("mul", x, y)


def div(x, y):
    return None if x is None else ir.op("truediv", x, y)


def neg(x):
    return None if x is None else ir.op("neg", x)


def where(c, x, y):
    if x is None and y is None:
        return None
    return ir.op("where", c, ZERO if x is None else x, ZERO if y is None else y)


op, const = ir.op, ir.const
_SELF = __import__("sys").modules[__name__]


# ----------------------------------------------------------------------------------------------
# Algebraic simplification through sympy: arithmetic, exp, log, sqrt, tanh; leaves are symbols.

def simplify(node: ir.Node) -> ir.Node:
    """A smaller equivalent of `node` where sympy finds one (only + - * / ** exp log sqrt tanh and
    leaves: anything else, or a larger result, returns `node` unchanged). Memoised in memory and
    on disk by `node`'s shape: its leaves numbered in order of first appearance."""
    if not isinstance(node, ir.Op) or sum(1 for _ in ir.walk(node)) > _SIMPLIFY_LIMIT:
        return node  # a leaf (the 1 of every additive score mod) needs no sympy import (0.3 s)
    leaves: dict[ir.Node, int] = {}
    try:
        shape = json.dumps(_shape(node, leaves))
    except _Unsupported:
        return node
    found = _SIMPLIFIED.get(shape)
    if found is None:
        from ..runtime import cache  # (the runtime imports the compiler)

        found = _SIMPLIFIED[shape] = json.loads(cache.load_text(
            {"kind": "derivative-simplify", "shape": shape}, lambda: json.dumps(_simplified_shape(node, leaves))))
    return node if found is None else _rebuild(found, list(leaves))


_SIMPLIFIED: dict[str, list | None] = {}  # a shape -> its simplified shape (None: keep it)


class _Unsupported(Exception):
    pass


def _shape(n: ir.Node, leaves: dict[ir.Node, int]) -> list:
    """n as nested lists: ["c", value] constants, ["x", i] leaves (what sympy sees as symbols:
    variables, params, loads, integer terms; numbered into `leaves`), [op, *args] operators."""
    if isinstance(n, ir.Const):
        if isinstance(n.value, bool) or not math.isfinite(float(n.value)):
            raise _Unsupported
        return ["c", n.value]
    if not isinstance(n, ir.Op) or ir.kind_of(n) == "int":
        return ["x", leaves.setdefault(n, len(leaves))]
    if n.op not in _SYMPY_OPS:
        raise _Unsupported
    return [n.op] + [_shape(a, leaves) for a in n.args]


def _rebuild(shape: list, leaves: list[ir.Node]) -> ir.Node:
    """_shape's inverse, through ir.op / ir.const."""
    if shape[0] == "c":
        return ir.const(shape[1])
    if shape[0] == "x":
        return leaves[shape[1]]
    return ir.op(shape[0], *(_rebuild(a, leaves) for a in shape[1:]))


def _simplified_shape(node: ir.Node, leaves: dict[ir.Node, int]) -> list | None:
    """The shape of sympy's simplification of `node` over the same leaves, or None where it finds
    nothing smaller."""
    import sympy

    symbols = {n: sympy.Symbol(f"x{i}") for n, i in leaves.items()}
    try:
        back = _from_sympy(sympy.powsimp(_to_sympy(node, sympy, dict(symbols), {})), sympy,
                           {s: n for n, s in symbols.items()})
    except _Unsupported:
        return None
    if ir.kind_of(back) != "float":
        back = ir.op("mul", ONE, back)
    size = lambda n: sum(1 for _ in ir.walk(n))  # noqa: E731
    if size(back) >= size(node):
        return None
    known = dict(leaves)
    try:
        shape = _shape(back, known)
    except _Unsupported:  # a constant sympy folded past float range: keep node
        return None
    return shape if len(known) == len(leaves) else None  # a leaf of its own (none expected): keep node


_SYMPY_FUNCS = ("exp", "log", "sqrt", "tanh")
_SYMPY_OPS = ("add", "sub", "mul", "truediv", "neg", "pow") + _SYMPY_FUNCS


def _to_sympy(n: ir.Node, sympy, leaves: dict, memo: dict):
    if n in memo:
        return memo[n]
    if isinstance(n, ir.Const):
        if isinstance(n.value, bool) or not math.isfinite(float(n.value)):
            raise _Unsupported
        out = sympy.Integer(n.value) if isinstance(n.value, int) else sympy.Float(n.value, 17)
    elif not isinstance(n, ir.Op) or ir.kind_of(n) == "int":  # variables, params, loads, integer terms
        out = leaves.setdefault(n, sympy.Symbol(f"x{len(leaves)}"))
    else:
        a = [_to_sympy(x, sympy, leaves, memo) for x in n.args]
        if n.op == "add":
            out = a[0] + a[1]
        elif n.op == "sub":
            out = a[0] - a[1]
        elif n.op == "mul":
            out = a[0] * a[1]
        elif n.op == "truediv":
            out = a[0] / a[1]
        elif n.op == "neg":
            out = -a[0]
        elif n.op == "pow":
            out = a[0] ** a[1]
        elif n.op in _SYMPY_FUNCS:
            out = getattr(sympy, n.op)(a[0])
        else:
            raise _Unsupported
    memo[n] = out
    return out


def _from_sympy(e, sympy, leaves: dict) -> ir.Node:
    if e in leaves:
        return leaves[e]
    if e.is_Number:
        if not e.is_real:
            raise _Unsupported
        return ir.const(float(e))
    if e.is_Add:
        terms = list(e.as_ordered_terms())
        out = _from_sympy(terms[0], sympy, leaves)
        for t in terms[1:]:
            c, rest = t.as_coeff_Mul()
            if c < 0:
                out = ir.op("sub", out, _from_sympy(-t, sympy, leaves))
            else:
                out = ir.op("add", out, _from_sympy(t, sympy, leaves))
        return out
    if e.is_Mul:
        c, rest = e.as_coeff_Mul()
        if c < 0:
            return ir.op("neg", _from_sympy(-e, sympy, leaves))
        num, den = sympy.fraction(e)
        if den != 1:
            return ir.op("truediv", _from_sympy(num, sympy, leaves), _from_sympy(den, sympy, leaves))
        factors = e.as_ordered_factors()
        out = _from_sympy(factors[0], sympy, leaves)
        for f in factors[1:]:
            out = ir.op("mul", out, _from_sympy(f, sympy, leaves))
        return out
    if e.is_Pow:
        base, expo = e.as_base_exp()
        if expo == sympy.Rational(1, 2):
            return ir.op("sqrt", _from_sympy(base, sympy, leaves))
        if expo.is_Integer and expo < 0:
            return ir.op("truediv", ONE, _from_sympy(base ** -expo, sympy, leaves))
        k = int(expo) if expo.is_Integer else None
        return ir.op("pow", _from_sympy(base, sympy, leaves), ir.const(k) if k is not None else _from_sympy(expo, sympy, leaves))
    for name in _SYMPY_FUNCS:
        if e.func == getattr(sympy, name):
            return ir.op(name, _from_sympy(e.args[0], sympy, leaves))
    raise _Unsupported
