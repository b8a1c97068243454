"""Random typed expression terms for the IR and tracing property tests.

A term is a plain nested tuple, independent of the IR: ("var", name), ("const", value),
("param", name) (values in PARAMS), ("load", buffer, index_term) or ("op", name, (args...)).
From one term the tests build
- the simplified IR (`build`, through `ir.op`) and the unsimplified IR (`build_raw`, `ir.Op`),
- a plain-Python value at one point (`py_eval`, Python semantics: floor `//` and `%`),
- a FlexAttention-style Python function (`as_function`) that works on real tensors and proxies.
Integer divisors are never zero by construction; buffer indices are taken `% size`, so in range.
"""
from __future__ import annotations

import contextlib
import math
import random
from functools import lru_cache

import torch
from hypothesis import strategies as st

from attncc.dsl import ir

IBUF = torch.tensor([3, -2, 0, 7, -5, 1, 4, -1], dtype=torch.int64)
FBUF = torch.tensor([0.5, -1.25, 3.0, 0.0, -0.75, 2.5, 1e-3, -4.0], dtype=torch.float64)
BBUF = IBUF > 0
BUFFERS = {"ibuf": IBUF, "fbuf": FBUF, "bbuf": BBUF}
SCORES = (-3.0, -0.5, 0.0, 0.25, 1.0, 2.5)
PARAMS = {"P": 3, "F": 0.5}  # default values; P is also a (positive) divisor

MAX_DEPTH = 4
_INT_CONSTS = st.sampled_from([0, 1, -1, 2, -3, 5, 7, -7])
_FLOAT_CONSTS = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 2.5, -3.0, 1e-3, math.inf, -math.inf, math.nan])
_CMP = st.sampled_from(ir.COMPARE)


def _op(name, *args):
    return ("op", name, tuple(args))


def _ops(names, *arg_strategies):
    return st.builds(lambda n, *a: _op(n, *a), st.sampled_from(names), *arg_strategies)


def _dup(names, sub):
    """name(x, x): exercises the `a is b` simplification rules."""
    return st.builds(lambda n, x: _op(n, x, x), st.sampled_from(names), sub)


@lru_cache(maxsize=None)
def divisors(depth: int, score: bool = True) -> st.SearchStrategy:
    """Integer terms that are never zero (either sign)."""
    pos = st.one_of(st.sampled_from([("const", c) for c in (1, 2, 3, 5)] + [("param", "P")]),
                    st.builds(lambda v: _op("add", ("var", v), ("const", 1)), st.sampled_from(["q", "kv", "h"])))
    if depth > 0:
        pos = st.one_of(pos, st.builds(lambda x: _op("add", _op("abs", x), ("const", 1)), int_terms(depth - 1, score)))
    return st.one_of(pos, st.builds(lambda x: _op("neg", x), pos))


@lru_cache(maxsize=None)
def int_terms(depth: int = MAX_DEPTH, score: bool = True) -> st.SearchStrategy:
    """Integer terms; with score=False no part reads the score (for mask functions)."""
    leaves = st.one_of(st.sampled_from([("var", v) for v in ("b", "h", "q", "kv")] + [("param", "P")]),
                       st.builds(lambda c: ("const", c), _INT_CONSTS))
    if depth == 0:
        return leaves
    sub = int_terms(depth - 1, score)
    return st.one_of(
        leaves,
        _ops(["add", "sub", "mul", "min", "max"], sub, sub),
        _ops(["floordiv", "mod"], sub, divisors(depth - 1, score)),
        _ops(["neg", "abs"], sub),
        st.builds(lambda x, e: _op("pow", x, ("const", e)), leaves, st.sampled_from([0, 1, 2, 3])),
        _dup(["add", "sub", "mul", "min", "max"], sub),
        st.builds(lambda c, a, b: _op("where", c, a, b), bool_terms(depth - 1, score), sub, sub),
        st.builds(lambda c: _op("where", c, ("const", 1), ("const", 0)), bool_terms(depth - 1, score)),
        st.builds(lambda i: ("load", "ibuf", _op("mod", i, ("const", len(IBUF)))), sub),
    )


@lru_cache(maxsize=None)
def arith_float_terms(depth: int, score: bool = True) -> st.SearchStrategy:
    """Float terms without transcendental functions: exact in IEEE arithmetic, safe to compare."""
    leaves = st.one_of(st.builds(lambda c: ("const", c), _FLOAT_CONSTS), st.just(("param", "F")))
    if score:
        leaves = st.one_of(st.just(("var", "score")), leaves)
    else:
        leaves = st.one_of(st.builds(lambda v: _op("truediv", ("var", v), ("const", 2)), st.sampled_from(["q", "kv"])),
                           leaves)
    if depth == 0:
        return leaves
    sub = arith_float_terms(depth - 1, score)
    nonzero = st.sampled_from([("const", c) for c in (2.0, -0.5, 3.0)])
    return st.one_of(leaves, _ops(["add", "sub", "mul", "min", "max"], sub, sub), _ops(["neg", "abs"], sub),
                     _ops(["truediv"], sub, nonzero))


@lru_cache(maxsize=None)
def float_terms(depth: int = MAX_DEPTH) -> st.SearchStrategy:
    if depth == 0:
        return arith_float_terms(0)
    sub = float_terms(depth - 1)
    return st.one_of(
        arith_float_terms(min(depth, 2)),
        _ops(["add", "sub", "mul", "min", "max"], sub, sub),
        _ops(["add", "mul", "max"], int_terms(depth - 1), sub),
        _ops(["truediv"], int_terms(depth - 1), divisors(0)),
        _ops(["neg", "abs"], sub),
        _ops(list(ir.FLOAT_FUNCS), sub),
        _ops(list(ir.FLOAT_FUNCS), sub),  # twice: weight the functions up
        # no ** 0.5: torch computes x ** 0.5 as sqrt (nan at -inf) but pow(x, 0.5) gives inf
        st.builds(lambda x, e: _op("pow", x, ("const", e)), sub, st.sampled_from([2, 3, -1, 2.0])),
        _dup(["add", "sub", "mul", "min"], sub),
        st.builds(lambda c, a, b: _op("where", c, a, b), bool_terms(depth - 1), sub,
                  st.one_of(sub, int_terms(depth - 1))),
        st.builds(lambda i: ("load", "fbuf", _op("mod", i, ("const", len(FBUF)))), int_terms(depth - 1)),
    )


@lru_cache(maxsize=None)
def bool_terms(depth: int = MAX_DEPTH, score: bool = True) -> st.SearchStrategy:
    ints = int_terms(max(depth - 1, 0), score)
    leaves = st.one_of(st.sampled_from([("const", True), ("const", False)]),
                       st.builds(lambda n, a, b: _op(n, a, b), _CMP, int_terms(0), int_terms(0)))
    if depth == 0:
        return leaves
    sub = bool_terms(depth - 1, score)
    floats = arith_float_terms(min(depth - 1, 2), score)
    return st.one_of(
        leaves,
        st.builds(lambda n, a, b: _op(n, a, b), _CMP, ints, ints),
        st.builds(lambda n, a, b: _op(n, a, b), _CMP, floats, floats),
        _ops(["and", "or", "eq", "ne"], sub, sub),
        _ops(["not"], sub),
        st.builds(lambda i: ("load", "bbuf", _op("mod", i, ("const", len(BBUF)))), ints),
        _dup(["and", "or", "eq", "ne"], sub),
        _dup(["eq", "ge", "ne"], ints),
        st.builds(lambda c, a, b: _op("where", c, a, b), sub, sub, sub),
    )


TERMS = {"int": int_terms, "float": float_terms, "bool": bool_terms}


# ----------------------------------------------------------------------------------------------
# Term -> IR (simplified and not)

def build(term, raw: bool = False) -> ir.Node:
    """The term's IR through ir.op (simplified), or with raw=True made node by node, unsimplified."""
    const, load, op = (ir.Const, ir.Load, lambda n, *a: ir.Op(n, a)) if raw else (ir.const, ir.load, ir.op)
    tag = term[0]
    if tag == "var":
        return ir.Var(term[1])
    if tag == "const":
        return const(term[1])
    if tag == "param":
        return ir.Param(term[1], "int" if isinstance(PARAMS[term[1]], int) else "float")
    if tag == "load":
        return load(term[1], (build(term[2], raw),))
    return op(term[1], *(build(a, raw) for a in term[2]))


def build_raw(term) -> ir.Node:
    return build(term, raw=True)


# ----------------------------------------------------------------------------------------------
# Term -> plain Python value at one point

def _nan_min(a, b, f):
    """IEEE 754-2019 minimum / maximum (f: min or max): NaN propagates and -0.0 < +0.0 (Python's
    min / max return whichever zero comes first)."""
    if isinstance(a, float) and math.isnan(a) or isinstance(b, float) and math.isnan(b):
        return math.nan
    if a == 0 and b == 0 and (isinstance(a, float) or isinstance(b, float)):
        signs = (math.copysign(1.0, a), math.copysign(1.0, b))
        return (0.0 if max(signs) > 0 else -0.0) if f is max else (-0.0 if min(signs) < 0 else 0.0)
    return f(a, b)


def _exp(x):
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _exp2(x):
    try:
        return 2.0 ** x
    except OverflowError:
        return math.inf


def _pow(a, b):
    try:
        r = a ** b
    except ZeroDivisionError:  # 0.0 ** -1
        return math.copysign(math.inf, a) if b % 2 == 1 else math.inf
    except OverflowError:
        return math.inf if a > 0 or b % 2 == 0 else -math.inf
    return math.nan if isinstance(r, complex) else r


def _log(x, f=math.log):
    return math.nan if math.isnan(x) or x < 0 else -math.inf if x == 0 else f(x)


def _sigmoid(x):
    if math.isnan(x):
        return x
    return 1.0 / (1.0 + _exp(-x)) if x > -700 else 0.0


def _where(c, a, b):
    """torch.where's value: the branch taken, a float where either branch is (-(b + b) at b = 0
    is then -0.0, whose reciprocal is -inf)."""
    pick = a if c else b
    return float(pick) if type(pick) is int and float in (type(a), type(b)) else pick


PY = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "truediv": lambda a, b: a / b, "floordiv": lambda a, b: a // b, "mod": lambda a, b: a % b,
    "pow": _pow,
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
    "and": lambda a, b: bool(a) and bool(b), "or": lambda a, b: bool(a) or bool(b), "not": lambda a: not a,
    "min": lambda a, b: _nan_min(a, b, min), "max": lambda a, b: _nan_min(a, b, max),
    "neg": lambda a: -a, "abs": abs, "where": lambda c, a, b: _where(c, a, b),
    "exp": _exp, "exp2": _exp2,
    "log": _log, "log2": lambda x: _log(x, math.log2),
    "sqrt": lambda x: math.nan if math.isnan(x) or x < 0 else math.sqrt(x),
    "tanh": math.tanh, "sigmoid": _sigmoid,
}


def py_eval(term, point: dict):
    """The term's value at `point` (variables; params default to PARAMS)."""
    tag = term[0]
    if tag == "var":
        return point[term[1]]
    if tag == "param":
        return point.get(term[1], PARAMS[term[1]])
    if tag == "const":
        return term[1]
    if tag == "load":
        return BUFFERS[term[1]][py_eval(term[2], point)].item()
    args = [py_eval(a, point) for a in term[2]]
    return PY[term[1]](*args)


# ----------------------------------------------------------------------------------------------
# Term -> a FlexAttention-style Python function (real tensors or tracing proxies)

def _t(x):
    """Python scalars as 0-dim tensors (tensors and proxies unchanged), for torch functions."""
    return torch.tensor(x) if isinstance(x, (bool, int, float)) else x


def _is_int_const(term) -> bool:
    return term[0] == "const" and type(term[1]) is int


# Each op -> several spellings a user might write; (args...) are the children's values.
SPELLINGS = {
    "add": [lambda a, b: a + b, lambda a, b: torch.add(_t(a), _t(b))],
    "sub": [lambda a, b: a - b, lambda a, b: torch.sub(_t(a), _t(b))],
    "mul": [lambda a, b: a * b, lambda a, b: torch.mul(_t(a), _t(b))],
    "truediv": [lambda a, b: a / b, lambda a, b: torch.div(_t(a), _t(b))],
    "floordiv": [lambda a, b: a // b, lambda a, b: torch.div(_t(a), _t(b), rounding_mode="floor"),
                 lambda a, b: torch.floor_divide(_t(a), _t(b))],
    "mod": [lambda a, b: a % b, lambda a, b: torch.remainder(_t(a), _t(b))],
    "pow": [lambda a, b: a ** b, lambda a, b: torch.pow(_t(a), b)],
    "neg": [lambda a: -a, lambda a: torch.neg(_t(a))],
    "abs": [lambda a: abs(a), lambda a: torch.abs(_t(a)), lambda a: _t(a).abs()],
    "min": [lambda a, b: torch.minimum(_t(a), _t(b)), lambda a, b: torch.min(_t(a), _t(b))],
    "max": [lambda a, b: torch.maximum(_t(a), _t(b)), lambda a, b: torch.max(_t(a), _t(b))],
    "where": [lambda c, a, b: torch.where(_t(c), _t(a), _t(b))],
    "and": [lambda a, b: _t(a) & _t(b), lambda a, b: torch.logical_and(_t(a), _t(b))],
    "or": [lambda a, b: _t(a) | _t(b), lambda a, b: torch.logical_or(_t(a), _t(b))],
    "not": [lambda a: ~_t(a), lambda a: torch.logical_not(_t(a))],
    "eq": [lambda a, b: a == b, lambda a, b: torch.eq(_t(a), _t(b))],
    "ne": [lambda a, b: a != b, lambda a, b: torch.ne(_t(a), _t(b))],
    "lt": [lambda a, b: a < b], "le": [lambda a, b: a <= b],
    "gt": [lambda a, b: a > b, lambda a, b: torch.gt(_t(a), _t(b))], "ge": [lambda a, b: a >= b],
    "exp": [lambda a: torch.exp(_t(a)), lambda a: _t(a).exp()],
    "exp2": [lambda a: torch.exp2(_t(a)), lambda a: torch.special.exp2(_t(a))],
    "log": [lambda a: torch.log(_t(a))], "log2": [lambda a: torch.log2(_t(a))],
    "sqrt": [lambda a: torch.sqrt(_t(a)), lambda a: _t(a).sqrt()],
    "tanh": [lambda a: torch.tanh(_t(a)), lambda a: _t(a).tanh()],
    "sigmoid": [lambda a: torch.sigmoid(_t(a)), lambda a: torch.special.expit(_t(a))],
}
# min/max against an int constant may also be written as clamp
_CLAMP = {"min": lambda a, b: _t(a).clamp(max=b), "max": lambda a, b: torch.clamp(_t(a), min=b)}
_XOR = lambda a, b: _t(a) ^ _t(b)  # noqa: E731  (ne of two booleans)


@contextlib.contextmanager
def ieee_min_max():
    """torch.minimum / maximum (and two-tensor torch.min / max) with the reference's -0.0 < +0.0 in
    either operand order, for computing expected values: torch's vectorised CPU paths return
    either zero, so 1 / torch.minimum(0.0, -0.0) is +inf or -inf by memory position."""
    from attncc.dsl.ops import _torch_min_max

    originals = {name: getattr(torch, name) for name in ("minimum", "maximum", "min", "max")}
    ieee = {"min": _torch_min_max(originals["minimum"], True), "max": _torch_min_max(originals["maximum"], False)}

    def two_tensors(name: str):
        def f(*args, **kwargs):
            if len(args) == 2 and not kwargs and all(isinstance(a, torch.Tensor) for a in args):
                return ieee[name](*args)
            return originals[name](*args, **kwargs)
        return f
    patched = {"minimum": ieee["min"], "maximum": ieee["max"], "min": two_tensors("min"), "max": two_tensors("max")}
    try:
        for name, f in patched.items():
            setattr(torch, name, f)
        yield
    finally:
        for name, f in originals.items():
            setattr(torch, name, f)


def as_function(term, seed: int, buffers: dict = BUFFERS):
    """A callable `f(env)` computing `term` with randomly chosen spellings (fixed per seed)."""
    rng = random.Random(seed)

    def compile_(t):
        tag = t[0]
        if tag in ("var", "param"):
            return lambda env: env[t[1]]
        if tag == "const":
            value = t[1]
            return (lambda env: torch.tensor(value)) if isinstance(value, bool) else (lambda env: value)
        if tag == "load":
            index, buf = compile_(t[2]), buffers[t[1]]  # a captured tensor, indexed with traced values
            return lambda env: buf[index(env)]
        name, args = t[1], [compile_(a) for a in t[2]]
        options = list(SPELLINGS[name])
        if name in _CLAMP and _is_int_const(t[2][1]):
            options.append(_CLAMP[name])
        if name == "ne" and _bool_term(t[2][0]) and _bool_term(t[2][1]):
            options.append(_XOR)
        if name in ("truediv", "pow") and not _reads_tensors(t[2][0]):
            # torch computes number / tensor as reciprocal * number; Python's 0.0 ** -1 raises
            options.remove(SPELLINGS[name][0])
        if name == "where" and t[2][1:] == (("const", 1), ("const", 0)) and _is_int_const(t[2][1]):
            options += [lambda c, a, b: _t(c).long(), lambda c, a, b: _t(c).to(torch.int32)]
        f = rng.choice(options)
        return lambda env: f(*(a(env) for a in args))

    return compile_(term)


def _reads_tensors(t) -> bool:
    """Whether the term's value is a tensor when the function runs on real tensors."""
    return t[0] in ("var", "load") or (t[0] == "op" and any(_reads_tensors(a) for a in t[2]))


def _bool_term(t) -> bool:
    if t[0] == "const":
        return isinstance(t[1], bool)
    if t[0] == "op":
        return t[1] in ir.COMPARE or t[1] in ir.LOGIC or t[1] == "not" or (
            t[1] == "where" and _bool_term(t[2][1]))
    return False
