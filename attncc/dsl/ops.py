"""The operator table: one row per IR operator, one column per interpreter.

Every interpreter of the IR reads its column of this table and nothing else about operators:
`ir` (arity, result kind, operand check, constant folding), the printer and the text DSL
(`spelling`, `form`, `prec`), `compiler.evaluate` (`torch`), `compiler.intervals` (`interval`),
`compiler.codegen` (`triton`), and, as they land, `compiler.derivative` (`derivative`) and the
CuTe printer (`cute`). Adding an operator is adding a row; `tests/test_ops.py` checks that no row
lacks a column its interpreters need.

Columns that are code take the interpreter as their first argument (`I` below: the intervals
module, the Triton printer, `D`: compiler.derivative, whose add/mul/... treat None as an exact
zero), so this module imports no interpreter and the rooms stay layered. `derivative` is forward
mode: d(node) from the operands and their derivatives; piecewise-constant and boolean operators
have none (None), `where` passes its branches', min / max split ties evenly and abs is 0 at 0,
as torch's autograd does.

Operand classes (`operands`): "number" (int or float; booleans are refused, the tracer lifts them
to 0/1 first), "bool", "any" (eq / ne: two numbers or two booleans), "where" (a boolean, then two
numbers or two booleans). Result kinds (`kind`): "bool", "float", "int", "join" (float if any
operand is, else int), "pow" (int ** non-negative int constant is int, else float), "branches".
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Operator:
    """One IR operator and how each interpreter treats it."""
    name: str
    arity: int
    kind: str                    # result kind rule (see the module docstring)
    operands: str                # operand class (see the module docstring)
    spelling: str                # DSL / printer spelling: a symbol or a function name
    form: str                    # "infix", "prefix" or "call"
    prec: int | None             # printer precedence (infix and prefix forms)
    fold: Callable               # Python values -> Python value (constant folding)
    torch: Callable              # tensors -> tensor (reference, dense masks, exact tile evaluation)
    interval: Callable           # (I, box, *abstract values) -> abstract value (block classification)
    triton: str | Callable       # "{0} + {1}" over operand texts, or (printer, node, texts) -> str
    derivative: Callable | None = None  # (D, node, operands, their derivatives) -> derivative; D = compiler.derivative
    cute: str | Callable | None = None  # (P, node, texts) -> CuTe-DSL text (compiler/cute.py), or a template
    commutative: bool = False    # operands may be swapped (the canonical order puts the smaller first)
    mirror: str | None = None    # comparisons: the operator meaning the same with operands swapped
    discards: bool = False       # some operand's value may not reach the result (where)


def _min_max(smaller: bool):
    """Python min / max with the reference's rules (IEEE 754-2019 minimum / maximum): NaN
    propagates (Python's min(0, nan) is 0) and -0.0 < +0.0, so the result does not depend on the
    operands' order (Python returns the first of equal values)."""
    def f(a, b):
        if a != a or b != b:
            return a + b
        if a == b == 0 and isinstance(a + b, float):
            negative = (math.copysign(1.0, a) < 0, math.copysign(1.0, b) < 0)
            return -0.0 if (any(negative) if smaller else all(negative)) else 0.0
        return min(a, b) if smaller else max(a, b)
    return f


def _torch_min_max(f, smaller: bool):
    """torch.minimum / maximum with -0.0 < +0.0 for any operand order: their vectorised CPU paths
    return either zero (torch.maximum(0.0, -0.0) is -0.0 in SIMD lanes, +0.0 in the scalar tail)."""
    def g(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = f(a, b)
        if not out.is_floating_point():
            return out
        zeros = (a == 0) & (b == 0)
        signed = -((-a) + (-b)) if smaller else a + b  # -0 + +0 is +0: max; -(+0 + -0) is -0: min
        # halved: the same zero, and a tie's gradient split 1/2, 1/2 as torch.maximum and the kernels do
        return torch.where(zeros, signed * 0.5, out)
    return g


def _round_half_even(a: float) -> float:
    return float(round(a)) if math.isfinite(a) else a


def _trunc(a: float) -> int:
    if not math.isfinite(a):
        raise ValueError("int() of a non-finite value")
    return int(a)


def _floor_div(a, b):
    return torch.div(a, b, rounding_mode="floor")


def _torch_round(a):
    return torch.round(a) if a.is_floating_point() else a


def _torch_floor(a):
    return torch.floor(a) if a.is_floating_point() else a


def _torch_ceil(a):
    return torch.ceil(a) if a.is_floating_point() else a


def _arith(name, spelling, prec, fold, torch_fn, interval, triton, **kw):
    return Operator(name, 2, "join", "number", spelling, "infix", prec, fold, torch_fn, interval, triton, **kw)


COMPARE_NAMES = ("eq", "ne", "lt", "le", "gt", "ge")


def _compare(name, spelling, fold, torch_fn, mirror):
    equality = name in ("eq", "ne")
    triton = (lambda P, n, a: P.equality(n, a)) if equality else (lambda P, n, a: P.ordering(n, a))
    return Operator(name, 2, "bool", "any" if equality else "number", spelling, "infix", 4, fold, torch_fn,
                    lambda I, box, x, y: I.compare(box, name, x, y), triton, commutative=equality, mirror=mirror)


def _float_fn(name, fold, torch_fn, triton, interval=None):
    rule = interval or (lambda I, box, x: I.monotone(box, torch_fn, x))
    return Operator(name, 1, "float", "number", name, "call", None, fold, torch_fn, rule, triton)


def _rounding(name, fold, torch_fn, triton):
    return Operator(name, 1, "join", "number", name, "call", None, fold, torch_fn,
                    lambda I, box, x: I.rounding(box, torch_fn, x), triton)


ROWS = [
    _arith("add", "+", 5, lambda a, b: a + b, torch.add, lambda I, box, x, y: I.add(box, x, y),
           "({0} + {1})", commutative=True),
    _arith("sub", "-", 5, lambda a, b: a - b, torch.sub, lambda I, box, x, y: I.add(box, x, y, sign=-1),
           "({0} - {1})"),
    _arith("mul", "*", 6, lambda a, b: a * b, torch.mul, lambda I, box, x, y: I.mul(box, x, y),
           "({0} * {1})", commutative=True),
    Operator("truediv", 2, "float", "number", "/", "infix", 6, lambda a, b: a / b, torch.true_divide,
             lambda I, box, x, y: I.truediv(box, x, y), lambda P, n, a: P.truediv(n, a)),
    _arith("floordiv", "//", 6, lambda a, b: a // b, _floor_div, lambda I, box, x, y: I.floordiv(box, x, y),
           lambda P, n, a: P.floor_op(n, a)),
    _arith("mod", "%", 6, lambda a, b: a % b, torch.remainder, lambda I, box, x, y: I.mod(box, x, y),
           lambda P, n, a: P.floor_op(n, a)),
    Operator("pow", 2, "pow", "number", "**", "infix", 8, lambda a, b: a ** b, torch.pow,
             lambda I, box, x, y: I.power(box, x, y), lambda P, n, a: P.pow(n, a)),
    Operator("neg", 1, "join", "number", "-", "prefix", 7, lambda a: -a, torch.neg,
             lambda I, box, x: I.neg(box, x), "(-{0})"),
    Operator("abs", 1, "join", "number", "abs", "call", None, abs, torch.abs,
             lambda I, box, x: I.absolute(box, x), "tl.abs({0})"),
    # Triton: PropagateNan.ALL lowers to llvm.minimum / maximum (NaN propagates, -0 < +0), as the
    # reference; the default would be minnum / maxnum, which drop a NaN operand on the GPU
    Operator("min", 2, "join", "number", "min", "call", None, _min_max(True), _torch_min_max(torch.minimum, True),
             lambda I, box, x, y: I.minmax(box, x, y, True),
             "tl.minimum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)", commutative=True),
    Operator("max", 2, "join", "number", "max", "call", None, _min_max(False), _torch_min_max(torch.maximum, False),
             lambda I, box, x, y: I.minmax(box, x, y, False),
             "tl.maximum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)", commutative=True),
    _compare("eq", "==", lambda a, b: a == b, torch.eq, "eq"),
    _compare("ne", "!=", lambda a, b: a != b, torch.ne, "ne"),
    _compare("lt", "<", lambda a, b: a < b, torch.lt, "gt"),
    _compare("le", "<=", lambda a, b: a <= b, torch.le, "ge"),
    _compare("gt", ">", lambda a, b: a > b, torch.gt, "lt"),
    _compare("ge", ">=", lambda a, b: a >= b, torch.ge, "le"),
    Operator("and", 2, "bool", "bool", "and", "infix", 2, lambda a, b: a and b, torch.logical_and,
             lambda I, box, x, y: I.and_(x, y), "({0} & {1})"),
    Operator("or", 2, "bool", "bool", "or", "infix", 1, lambda a, b: a or b, torch.logical_or,
             lambda I, box, x, y: I.or_(x, y), "({0} | {1})"),
    Operator("not", 1, "bool", "bool", "not", "prefix", 3, lambda a: not a, torch.logical_not,
             lambda I, box, x: I.not_(x), "(~{0})"),
    Operator("where", 3, "branches", "where", "where", "call", None, lambda c, a, b: a if c else b,
             torch.where, lambda I, box, c, x, y: I.where(box, c, x, y), "tl.where({0}, {1}, {2})",
             discards=True),
    _float_fn("exp", math.exp, torch.exp, "tl.exp({0})"),
    _float_fn("exp2", lambda a: 2.0 ** a, torch.exp2, "tl.exp2({0})"),
    _float_fn("log", math.log, torch.log, "tl.log({0})"),
    _float_fn("log2", math.log2, torch.log2, "tl.log2({0})"),
    _float_fn("sqrt", math.sqrt, torch.sqrt, "tl.sqrt({0})"),
    _float_fn("tanh", math.tanh, torch.tanh, lambda P, n, a: P.tanh(n, a)),
    # not tl.sigmoid: a triton.language @jit function, which the interpreter cannot always run
    _float_fn("sigmoid", lambda a: 1.0 / (1.0 + math.exp(-a)), torch.sigmoid, "(1.0 / (1.0 + tl.exp(-{0})))"),
    _rounding("floor", lambda a: float(math.floor(a)) if math.isfinite(a) else a, _torch_floor, "tl.floor({0})"),
    _rounding("ceil", lambda a: float(math.ceil(a)) if math.isfinite(a) else a, _torch_ceil, "tl.ceil({0})"),
    _rounding("round", _round_half_even, _torch_round, lambda P, n, a: P.round(n, a)),
    # truncation towards zero, what `.long()` / `.int()` / `.to(torch.int64)` do to a float in torch
    Operator("int", 1, "int", "number", "int", "call", None, _trunc, lambda a: a.trunc().long() if a.is_floating_point() else a,
             lambda I, box, x: I.to_int(box, x), lambda P, n, a: P.to_int(n, a)),
]

_LN2 = math.log(2.0)
_ZERO = lambda D, n, a, d: None  # noqa: E731 — boolean or piecewise-constant: no derivative
DERIVATIVES: dict[str, Callable] = {
    "add": lambda D, n, a, d: D.add(d[0], d[1]),
    "sub": lambda D, n, a, d: D.sub(d[0], d[1]),
    "mul": lambda D, n, a, d: D.add(D.mul(d[0], a[1]), D.mul(a[0], d[1])),
    "truediv": lambda D, n, a, d: D.div(D.sub(d[0], D.mul(n, d[1])), a[1]),
    "floordiv": _ZERO,
    "mod": lambda D, n, a, d: D.sub(d[0], D.mul(D.op("floordiv", a[0], a[1]), d[1])),
    "pow": lambda D, n, a, d: D.add(D.mul(D.mul(a[1], D.op("pow", a[0], D.op("sub", a[1], D.const(1)))), d[0]),
                                    D.mul(D.mul(n, D.op("log", a[0])), d[1])),
    "neg": lambda D, n, a, d: D.neg(d[0]),
    "abs": lambda D, n, a, d: D.where(D.op("gt", a[0], D.const(0)), d[0],
                                      D.where(D.op("lt", a[0], D.const(0)), D.neg(d[0]), None)),
    "min": lambda D, n, a, d: D.where(D.op("lt", a[0], a[1]), d[0], D.where(D.op("gt", a[0], a[1]), d[1],
                                                                            D.mul(D.add(d[0], d[1]), D.const(0.5)))),
    "max": lambda D, n, a, d: D.where(D.op("gt", a[0], a[1]), d[0], D.where(D.op("lt", a[0], a[1]), d[1],
                                                                            D.mul(D.add(d[0], d[1]), D.const(0.5)))),
    "where": lambda D, n, a, d: D.where(a[0], d[1], d[2]),
    "exp": lambda D, n, a, d: D.mul(n, d[0]),
    "exp2": lambda D, n, a, d: D.mul(D.mul(n, D.const(_LN2)), d[0]),
    "log": lambda D, n, a, d: D.div(d[0], a[0]),
    "log2": lambda D, n, a, d: D.div(d[0], D.op("mul", a[0], D.const(_LN2))),
    "sqrt": lambda D, n, a, d: D.div(d[0], D.op("mul", D.const(2.0), n)),
    "tanh": lambda D, n, a, d: D.mul(D.op("sub", D.const(1.0), D.op("mul", n, n)), d[0]),
    "sigmoid": lambda D, n, a, d: D.mul(D.op("mul", n, D.op("sub", D.const(1.0), n)), d[0]),
    **{name: _ZERO for name in COMPARE_NAMES + ("and", "or", "not", "floor", "ceil", "round", "int")},
}
# CuTe-DSL scalar spellings (compiler/cute.py, the FlashAttention-4 hooks; P: its printer)
_CUTE_INFIX = {"add": "+", "sub": "-", "mul": "*", "lt": "<", "le": "<=", "gt": ">", "ge": ">=",
               "and": "&", "or": "|"}
CUTE: dict[str, str | Callable] = {
    **{name: "({0} " + symbol + " {1})" for name, symbol in _CUTE_INFIX.items()},
    "truediv": lambda P, n, a: P.truediv(n, a),
    "floordiv": lambda P, n, a: P.floor_op(n, a),
    "mod": lambda P, n, a: P.floor_op(n, a),
    "pow": lambda P, n, a: P.pow(n, a),
    "neg": "(-{0})",
    "abs": lambda P, n, a: P.absolute(n, a),
    "min": lambda P, n, a: P.minmax(n, a),
    "max": lambda P, n, a: P.minmax(n, a),
    "eq": lambda P, n, a: P.equality(n, a),
    "ne": lambda P, n, a: P.equality(n, a),
    "not": "(~{0})",
    "where": "({1} if {0} else {2})",
    **{name: "cute.math." + name + "({0})" for name in ("exp", "exp2", "log", "log2", "sqrt")},
    "tanh": lambda P, n, a: P.tanh(n, a),
    "sigmoid": lambda P, n, a: P.sigmoid(n, a),
    **{name: (lambda P, n, a: P.rounding(n, a)) for name in ("floor", "ceil", "round")},
    "int": lambda P, n, a: P.to_int(n, a),
}
ROWS = [dataclasses.replace(row, derivative=DERIVATIVES[row.name], cute=CUTE[row.name]) for row in ROWS]
TABLE: dict[str, Operator] = {row.name: row for row in ROWS}

COMPARE = tuple(r.name for r in ROWS if r.mirror is not None)
LOGIC = ("and", "or")
NOT_ON_BOOLS = frozenset({"neg", "sub", "abs", "floordiv", "mod", "pow"})  # torch refuses these on bool tensors
FLOAT_FUNCS = tuple(r.name for r in ROWS if r.kind == "float" and r.form == "call")
ROUNDING = ("floor", "ceil", "round")
# functions the text DSL can call by name, with their arity (clamp is spelled out as min/max)
FUNCTIONS = {r.spelling: r.arity for r in ROWS if r.form == "call"}
INFIX = {r.spelling: r.name for r in ROWS if r.form == "infix"}
