"""IR -> Triton expression text, under a numeric plan (numerics.py): the body of `mask_mod` and
`score_mod` in every generated kernel.

Conventions inside the generated functions:
- `q` is a column of query indices `[BLOCK_M, 1]`, `kv` a row of key indices `[1, BLOCK_N]`,
  `b` and `h` are scalars, all int32; padded rows and columns arrive clamped to the last valid
  index, so buffer reads stay in bounds there too (the domain check proves it for valid indices).
- `score` is the float32 score tile in natural units (`scale * q.k`).
- A param `W` is the scalar `p_W`, loaded once per program in the type the plan gives it; a
  buffer `doc` is `buf_doc` (pointer) with strides `buf_doc_s0, ...`.
- Every value has the machine type the plan gives it: int32 or int64 (never overflowing), float32
  or float64 (float64 where a score-free float decides something discrete); operands are cast
  where their types differ, and float constants in float64 are built in float64.
- `//` and `%` follow torch's floor semantics; Triton's truncate towards zero, so operands not
  proved non-negative go through the `floordiv` / `floormod` helpers (floats: as torch, from fmod);
  by a power of two 2**k they are `x >> k` and `x & (2**k - 1)`, exact for every sign.
- `|e| <= c` (also `<`, and mirrored) for an int32 e and an integer constant 0 <= c < 2**30 is
  `(e + c)` read as uint32 `<= 2c`: one add and one compare (neighbourhood and band masks).
- `x / y` in float32 with y constant over the tile (params, b, h) is `x * (1.0 / y)`: one
  reciprocal per program. `tanh` in float32 is the GPU's `tanh.approx.f32` for 16-bit inputs on
  CUDA (constexpr FAST_TANH), else `2 / (1 + exp(-2x)) - 1` (a series below |x| = 1/8, where that
  cancels), which also runs in Triton's interpreter (libdevice does not). `a ** 0.5` is `tl.sqrt`
  (torch's too), `a ** k` for an integer constant k a product by repeated squaring; other powers go through the `pow_` helper (torch's
  sign and special-value rules); numerics refuses those where a float64 decision reads them.
- A subexpression used twice, or nested deeper than MAX_DEPTH, becomes a named temporary, so a
  1,000-term `or` is a few dozen lines and never hits Python's parser limits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from ..dsl import ir, ops
from .numerics import NumericPlan

MAX_DEPTH = 12  # operators nested in one emitted expression before a temporary is named
_TL = {"i32": "tl.int32", "i64": "tl.int64", "f32": "tl.float32", "f64": "tl.float64"}
_TILE_VARS = frozenset({"q", "kv", "score"})  # what varies inside a tile


@dataclass(frozen=True)
class BufferSpec:
    """What the code generator needs to know about a captured tensor."""
    name: str
    dtype: torch.dtype
    ndim: int

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> "BufferSpec":
        return cls(name, t.dtype, t.dim())


HELPERS = {
    "floordiv": '''@triton.jit
def floordiv(a, b):
    """a // b rounded towards -inf (torch semantics; Triton's // truncates towards zero)."""
    quot = a // b
    return tl.where((a % b != 0) & ((a < 0) != (b < 0)), quot - 1, quot)''',
    "floormod": '''@triton.jit
def floormod(a, b):
    """a % b with the sign of b (torch semantics; Triton's % takes the sign of a, for floats too)."""
    rem = a % b
    return tl.where((rem != 0) & ((rem < 0) != (b < 0)), rem + b, rem)''',
    "floordiv_f": '''@triton.jit
def floordiv_f(a, b):
    """a // b for floats as torch computes it: from fmod, not floor(a / b); by zero a / b (+-inf, NaN)."""
    mod = a % b
    div = (a - mod) / b
    div = tl.where((mod != 0) & ((b < 0) != (mod < 0)), div - 1.0, div)
    fl = tl.floor(div)
    fl = tl.where(div - fl > 0.5, fl + 1.0, fl)
    return tl.where(b == 0, a / b, tl.where(div != 0, fl, (a / b) * 0.0))''',
    "round_half_even": '''@triton.jit
def round_half_even(x):
    """x rounded to the nearest integer, ties to even (torch.round); exact for every float."""
    r = tl.floor(x)
    d = x - r
    up = (d > 0.5) | ((d == 0.5) & (r - 2.0 * tl.floor(r * 0.5) == 1.0))
    return tl.where(up, r + 1.0, r)''',
    "pow_": '''@triton.jit
def pow_(a, b):
    """a ** b with torch's rules: negative bases take integer powers, x ** 0 and 1 ** y are 1 (NaN
    too), (-1) ** +-inf is 1."""
    r = tl.exp2(b * tl.log2(tl.abs(a)))
    whole = tl.floor(b) == b
    odd = whole & (tl.floor(b * 0.5) * 2.0 != b)
    r = tl.where(a < 0, tl.where(whole, tl.where(odd, -r, r), float("nan")), r)
    r = tl.where(a == -1.0, tl.where(tl.abs(b) == float("inf"), 1.0, r), r)
    return tl.where(b == 0, 1.0, tl.where(a == 1.0, 1.0, r))''',
    "tanh": '''@triton.jit
def tanh(x, FAST_TANH: tl.constexpr):
    """tanh(x): one MUFU instruction (max rel. error ~2^-11) when FAST_TANH, else to a few ulp."""
    if FAST_TANH:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:  # 2 / (1 + exp(-2x)) - 1 cancels near 0 (1e6 * tanh(s * 1e-6) was off by 0.04): a series there
        x2 = x * x
        series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 - x2 * (17.0 / 315.0))))
        return tl.where(tl.abs(x) < 0.125, series, 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0)''',
}


def literal(value: ir.Value, T: str) -> str:
    """A constant as Triton text of machine type T (float64 constants are built in float64)."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if T in ("f32", "f64"):
        value = float(value)
        text = repr(value) if math.isfinite(value) else f'float("{value}")'
        return f"tl.full([], {text}, tl.float64)" if T == "f64" else f"({text})" if text.startswith("-") else text
    text = repr(value)
    return f"({text})" if text.startswith("-") else text


def _unify(types: list[str]) -> str:
    """The type two operands are compared or combined in."""
    if "f64" in types:
        return "f64"
    if "f32" in types:
        return "f32"
    if "i64" in types:
        return "i64"
    return "i32" if "i32" in types else "bool"


def _abs_bound(n: ir.Op) -> tuple[ir.Op, int] | None:
    """(abs node, c) when n says |e| <= c for an integer constant 0 <= c < 2**30 (as <=, <, >=, >)."""
    x, y = n.args
    op = n.op
    if op in ("ge", "gt"):
        x, y, op = y, x, {"ge": "le", "gt": "lt"}[op]
    if not (isinstance(x, ir.Op) and x.op == "abs" and isinstance(y, ir.Const)):
        return None
    c = y.value
    if isinstance(c, bool) or not isinstance(c, int):
        return None
    c = c - 1 if op == "lt" else c
    return (x, c) if 0 <= c < 2 ** 30 else None


class Lowering:
    """Lowers expressions to Triton text; repeated or deep subexpressions become temporaries.

    A printer for another target (compiler/cute.py) subclasses it: `column` names the operator
    table's column it reads, `cast` and `literal` spell conversions and constants, and the
    methods the column calls (truediv, floor_op, ...) and `_load` are overridden."""

    column = "triton"

    def __init__(self, buffers: Mapping[str, BufferSpec], plan: NumericPlan):
        self.buffers, self.plan = buffers, plan
        self.lines: list[str] = []
        self.text: dict[ir.Node, str] = {}
        self.compute: dict[ir.Node, str] = {}  # the type an integer operator computes in

    def lower(self, root: ir.Node) -> str:
        """Text of `root` (at its plan type); the temporaries it needs are in `self.lines`."""
        uses: dict[ir.Node, int] = {}
        for n in ir.walk(root):
            for c in n.children():
                uses[c] = uses.get(c, 0) + 1
        depth: dict[ir.Node, int] = {}
        for n in ir.walk(root):
            text = self._expr(n)
            d = 1 + max((depth[c] for c in n.children()), default=0) if isinstance(n, (ir.Op, ir.Load)) else 0
            if n is not root and d and (uses.get(n, 0) > 1 or d > MAX_DEPTH):
                text, d = self.temporary(text), 0
            self.text[n], depth[n] = text, d
        return self.text[root]

    def temporary(self, text: str) -> str:
        name = f"t{len(self.lines)}"
        self.lines.append(f"{name} = {text}")
        return name

    def typed(self, n: ir.Node, T: str) -> str:
        """n's value as machine type T."""
        if isinstance(n, ir.Const):
            return self.literal(n.value, T)
        text, P = self.text[n], self.plan.types[n]
        if P == T:
            return text
        if T == "bool":
            return f"({text} != 0)"
        return self.cast(text, T)

    def cast(self, text: str, T: str) -> str:
        """`text` converted to machine type T."""
        return f"({text}).to({_TL[T]})"

    @staticmethod
    def literal(value: ir.Value, T: str) -> str:
        return literal(value, T)

    def _expr(self, n: ir.Node) -> str:
        if isinstance(n, ir.Var):
            return n.name
        if isinstance(n, ir.Const):
            return self.literal(n.value, self.plan.types[n])
        if isinstance(n, ir.Param):
            return f"p_{n.name}"
        if isinstance(n, ir.Load):
            return self._load(n)
        row = ops.TABLE[n.op]
        T = self.plan.types[n]
        C = T
        if row.operands == "bool":
            a = [self.typed(x, "bool") for x in n.args]
        elif row.operands == "where":
            a = [self.typed(n.args[0], "bool"), self.typed(n.args[1], T), self.typed(n.args[2], T)]
        elif n.op in ops.COMPARE:
            C = _unify([self.plan.types[x] for x in n.args])
            a = [self.typed(x, C) for x in n.args]
        elif n.op == "int":
            a = [self.text[n.args[0]]]
        else:
            C = _unify([T] + [self.plan.types[x] for x in n.args])
            a = [self.typed(x, C) for x in n.args]
        self.compute[n] = C
        spell = getattr(row, self.column)
        if spell is None:
            raise ir.IRError(f"operator {n.op!r} has no {self.column} lowering")
        text = spell.format(*a) if isinstance(spell, str) else spell(self, n, a)
        if n.op in ops.COMPARE and C in ("f32", "f64") and self.column == "triton" \
                and not ir.free_vars(n) & _TILE_VARS:
            # a per-program float comparison: Triton's interpreter gives a bool scalar that `&` with a
            # tensor refuses; `!= 0` makes it one it takes (the compiler folds it away)
            text = f"({text} != 0)"
        if C != T and T != "bool":
            text = self.cast(text, T)  # computed wide (integers: proved to fit the narrow type)
        return text

    # -- the table's Triton column calls these for operators that need more than a template

    def truediv(self, n: ir.Op, a: list[str]) -> str:
        if self.plan.types[n] == "f32" and not ir.free_vars(n.args[1]) & _TILE_VARS:
            return f"({a[0]} * (1.0 / {a[1]}))"  # a per-program scalar: one reciprocal
        return f"({a[0]} / {a[1]})"

    def equality(self, n: ir.Op, a: list[str]) -> str:
        x = n.args[0]
        symbol = ir.SYMBOL[n.op]
        if isinstance(x, ir.Op) and x.op == "mod" and self.compute.get(x) in ("i32", "i64") \
                and n.args[1] is ir.Const(0):
            # (x floor-mod y) == 0 exactly when the truncating x % y == 0: skip the sign fix-up
            u, v = (self.typed(c, self.compute[x]) for c in x.args)
            return f"(({u} % {v}) {symbol} 0)"
        return f"({a[0]} {symbol} {a[1]})"

    def ordering(self, n: ir.Op, a: list[str]) -> str:
        bound = _abs_bound(n)
        if bound is not None and self.compute[n] == "i32" and self.compute.get(bound[0]) == "i32":
            # |e| <= c as one add and an unsigned compare: e + c lands in [0, 2c] exactly when
            # -c <= e <= c; below -c it is negative, so as uint32 >= 2**31 > 2c (0 <= c < 2**30)
            e = self.typed(bound[0].args[0], "i32")
            c = bound[1]
            return f"(({e} + {c}).to(tl.uint32, bitcast=True) <= {2 * c})"
        return f"({a[0]} {ir.SYMBOL[n.op]} {a[1]})"

    def floor_op(self, n: ir.Op, a: list[str]) -> str:
        if self.compute[n] in ("f32", "f64"):
            return f"floordiv_f({a[0]}, {a[1]})" if n.op == "floordiv" else f"floormod({a[0]}, {a[1]})"
        k = ir.power_of_two_divisor(n)
        if k is not None:
            # by 2**k in two's complement: floor division is the arithmetic shift, floor mod the
            # low k bits, for every sign of the dividend (no sign fix-up, no division)
            return f"({a[0]} >> {k})" if n.op == "floordiv" else f"({a[0]} & {(1 << k) - 1})"
        if all(x in self.plan.nonneg for x in n.args):
            return f"({a[0]} {ir.SYMBOL[n.op]} {a[1]})"
        return f"{'floordiv' if n.op == 'floordiv' else 'floormod'}({a[0]}, {a[1]})"

    def pow(self, n: ir.Op, a: list[str]) -> str:
        base, expo = n.args
        C = self.compute[n]
        k = expo.value if isinstance(expo, ir.Const) and not isinstance(expo.value, bool) else None
        if k == 0.5:  # torch's x ** 0.5 is sqrt (exact), not pow
            return getattr(ops.TABLE["sqrt"], self.column).format(a[0])
        if k is None or not float(k).is_integer() or abs(k) > 64:
            return f"pow_({a[0]}, {a[1]})"
        k = int(k)
        one = self.literal(1, C)
        if k == 0:
            return one
        x = a[0] if a[0].isidentifier() else self.temporary(a[0])
        result = None
        while True:  # binary exponentiation: x, x^2, x^4, ... as temporaries
            if abs(k) & 1:
                result = x if result is None else f"({result} * {x})"
            k = (abs(k) >> 1) * (1 if k > 0 else -1)
            if k == 0:
                break
            x = self.temporary(f"{x} * {x}")
        return f"({one} / {result})" if int(expo.value) < 0 else result

    def tanh(self, n: ir.Op, a: list[str]) -> str:
        return f"tanh({a[0]}, {'FAST_TANH' if self.plan.types[n] == 'f32' else 'False'})"

    def round(self, n: ir.Op, a: list[str]) -> str:
        return f"round_half_even({a[0]})"

    def to_int(self, n: ir.Op, a: list[str]) -> str:
        return self.cast(a[0], self.plan.types[n])

    def spec(self, n: ir.Load) -> BufferSpec:
        """The buffer a read reads (an IRError if it is unbound or indexed with the wrong rank)."""
        spec = self.buffers.get(n.buffer)
        if spec is None:
            raise ir.IRError(f"buffer {n.buffer!r} has no tensor; bind it before compiling")
        if spec.ndim != len(n.index):
            raise ir.IRError(f"buffer {n.buffer!r} has {spec.ndim} dims but is indexed with {len(n.index)}")
        return spec

    def _load(self, n: ir.Load) -> str:
        self.spec(n)
        O = self.plan.offsets[n]
        offset = " + ".join(f"{self.typed(i, O)} * buf_{n.buffer}_s{d}" for d, i in enumerate(n.index))
        text = f"tl.load(buf_{n.buffer} + {offset})"
        T = self.plan.types[n]
        return f"({text} != 0)" if T == "bool" else self.cast(text, T)


def lower_function(name: str, args: str, root: ir.Node, doc: str, buffers: Mapping[str, BufferSpec],
                   plan: NumericPlan, helpers: set[str]) -> str:
    """A `@triton.jit def name(args)` returning the lowering of `root`; adds the helpers it calls."""
    low = Lowering(buffers, plan)
    result = low.lower(root)
    free = ir.free_vars(root)
    if name == "mask_mod" and not free & {"q", "kv"} and not isinstance(root, ir.Const):  # per program:
        # as a tile of the pairs' shape (a constant is one Triton takes as it is)
        result = f"tl.where(({result}) != 0, (q >= 0) & (kv >= 0), False)"
    elif name == "score_mod" and ir.SCORE_VAR not in free:  # a score free of the score: the scores' shape
        result = f"(tl.full(score.shape, 0.0, score.dtype) + ({result})).to(score.dtype)"
    body = [f"    {line}" for line in low.lines] + [f"    return {result}"]
    helpers |= {h for h in HELPERS if any(f"{h}(" in line for line in body)}
    return "\n".join(["@triton.jit", f"def {name}({args}):", f'    """{doc}"""', *body])
