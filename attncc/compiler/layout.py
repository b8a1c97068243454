"""Token layouts: a permutation of a sequence so that every kernel tile is a compact brick.

A 2-D neighbourhood over row-major tokens leaves most of every 1-D tile dead: a 64-token tile is
one image row, whose neighbours lie in rows above and below. A Layout reorders the N tokens
(kernel position p holds natural token `natural(p)`): bricks of a 1-D/2-D/3-D canvas stored one
after another, each brick row-major; along a dilated axis the residue classes first (positions
≡ 0 mod d, then ≡ 1, ...), so each class's neighbours are contiguous. Patterns stay written in
natural coordinates: `compose(pattern)` substitutes `natural(q)`, `natural(kv)` into the mask and
score, and the kernels run that on permuted q/k/v (`permute`), their output permuted back
(`unpermute`). `reference` and `create_mask` always speak natural order: a layout changes how a
pattern runs, never what it means.
"""
from __future__ import annotations

import math
import numbers
from functools import lru_cache

import torch

from ..dsl import ir


def axis_ints(value, ndim: int, what: str, minimum: int = 1) -> tuple[int, ...]:
    """An int (broadcast over the canvas's dims) or a tuple of ndim ints, each >= minimum."""
    items = (value,) * ndim if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    try:
        items = tuple(items)
    except TypeError:
        raise ValueError(f"{what} must be an int or a tuple of {ndim} ints, got {value!r}") from None
    if len(items) != ndim or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items):
        raise ValueError(f"{what} must be an int or a tuple of {ndim} ints (one per canvas dim), got {value!r}")
    items = tuple(int(v) for v in items)
    if any(v < minimum for v in items):
        raise ValueError(f"{what} must be >= {minimum} on every axis, got {value!r}")
    return items


def canvas_dims(canvas, what: str = "canvas", max_dims: int = 3) -> tuple[int, ...]:
    """The canvas as a tuple of 1..max_dims positive ints (an int is a 1-D canvas)."""
    if isinstance(canvas, numbers.Integral) and not isinstance(canvas, bool):
        canvas = (canvas,)
    try:
        canvas = tuple(canvas)
    except TypeError:
        raise ValueError(f"{what} must be an int or a tuple of 1 to {max_dims} ints, got {canvas!r}") from None
    if not 1 <= len(canvas) <= max_dims:
        raise ValueError(f"{what} must have 1 to {max_dims} dims, got {canvas!r}")
    return axis_ints(canvas, len(canvas), what)


class Layout:
    """Bricks of `brick` tokens over a row-major `canvas` (1-3 dims, outermost first), each axis
    first split into its `dilation` residue classes. Needs canvas[i] % (dilation[i] * brick[i]) == 0.

    n: tokens; perm int64 [n]: perm[p] = the natural index at kernel position p; inverse: its inverse.
    """

    def __init__(self, canvas, brick, dilation=1):
        self.canvas = canvas = canvas_dims(canvas)
        self.brick = axis_ints(brick, len(canvas), "brick")
        self.dilation = axis_ints(dilation, len(canvas), "dilation")
        for size, b, d in zip(self.canvas, self.brick, self.dilation):
            if size % (b * d):
                raise ValueError(f"canvas {self.canvas} is not a whole number of bricks {self.brick} per "
                                 f"dilation class {self.dilation}")
        self.n = math.prod(self.canvas)
        if self.n >= 2 ** 30:
            raise ValueError(f"canvas {self.canvas} has {self.n} tokens; layouts support fewer than 2**30")
        p = torch.arange(self.n)
        self.perm = self._natural(p, lambda x, y: x // y, lambda x, y: x % y)
        self.inverse = torch.empty_like(self.perm)
        self.inverse[self.perm] = p
        self._copies: dict = {}

    def __repr__(self) -> str:
        return f"Layout(canvas={self.canvas}, brick={self.brick}, dilation={self.dilation})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Layout) and (self.canvas, self.brick, self.dilation) == (
            other.canvas, other.brick, other.dilation)

    def __hash__(self) -> int:
        return hash((self.canvas, self.brick, self.dilation))

    def _natural(self, p, div, mod):
        """The natural index of kernel position p, with `div` / `mod` the floor operations of p's
        kind (torch tensors or IR nodes)."""
        per_brick = math.prod(self.brick)
        grid = [s // b for s, b in zip(self.canvas, self.brick)]
        brick_id, offset = div(p, per_brick), mod(p, per_brick)
        index = None
        for axis, (size, b, d) in enumerate(zip(self.canvas, self.brick, self.dilation)):
            inner = math.prod(grid[axis + 1:])
            within = math.prod(self.brick[axis + 1:])
            g = mod(div(brick_id, inner), grid[axis]) if axis else div(brick_id, inner)
            w = mod(div(offset, within), b) if axis else div(offset, within)
            coord = g * b + w  # along the axis in layout order: residue classes one after another
            if d > 1:
                per_class = size // d
                coord = mod(coord, per_class) * d + div(coord, per_class)
            index = coord if index is None else index * size + coord
        return index

    def natural(self, p: ir.Node) -> ir.Node:
        """IR of the natural index of kernel position p (an integer IR node)."""
        const = ir.const

        def div(x, y):
            return _Expr(ir.op("floordiv", _node(x), const(y)))

        def mod(x, y):
            return _Expr(ir.op("mod", _node(x), const(y)))
        return _node(self._natural(_Expr(p), div, mod))

    def row_expression(self, p: str) -> str:
        """Triton source of the natural index of kernel position `p` (a name of an int32 tensor >= 0;
        every intermediate value stays below n + n, so int32 holds it: n < 2**30 is checked)."""
        return str(self._natural(_Text(p), _Text.div, _Text.mod))

    def compose(self, pattern):
        """The pattern in kernel coordinates: its token mask and score with q, kv replaced by
        natural(q), natural(kv) (block predicate folded in; params and buffers kept)."""
        from ..dsl.pattern import Pattern
        from .evaluate import token_mask

        nat = {"q": self.natural(ir.Var("q")), "kv": self.natural(ir.Var("kv"))}

        def swap(n):
            return nat.get(n.name) if isinstance(n, ir.Var) else None
        mask = cancel_digits(ir.substitute(token_mask(pattern), swap))
        score = cancel_digits(ir.substitute(pattern.score, swap))
        return Pattern.from_ir(mask, score, ir.TRUE, pattern.params, pattern.buffers,
                               f"{pattern.name or 'pattern'} in {self!r}")

    def check(self, n_q: int, n_kv: int, hint: str = "") -> None:
        """ValueError unless both lengths are this layout's n (a layout permutes one sequence);
        `hint`, what the caller advises, ends the message."""
        if n_q != self.n or n_kv != self.n:
            raise ValueError(f"{self!r} permutes {self.n} tokens, but Q_LEN = {n_q}, KV_LEN = {n_kv}"
                             + (f": {hint}" if hint else ""))

    def applies(self, n_q: int, n_kv: int) -> bool:
        """Whether a dense call of n_q queries over n_kv keys runs in this layout: at n tokens each;
        not where the lengths differ (decode steps, chunked prefill: the kernels run in natural
        order, with the same results). A square call of another length is a ValueError: the
        canvas and the call disagree (`with_layout(None)` runs it in natural order)."""
        if n_q != n_kv:
            return False
        self.check(n_q, n_kv, "the canvas and the call disagree (pattern.with_layout(None) runs it in natural "
                              "token order)")
        return True

    def permute(self, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """x (natural token order along `dim`, n tokens) in kernel order: x.index_select(dim, perm)."""
        self._check_tokens(x, dim)
        return x.index_select(dim, self._on(x.device, self.perm))

    def unpermute(self, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        """x (kernel order along `dim`, n tokens) back in natural token order."""
        self._check_tokens(x, dim)
        return x.index_select(dim, self._on(x.device, self.inverse))

    def _check_tokens(self, x: torch.Tensor, dim: int) -> None:
        """ValueError unless x holds this layout's n tokens along `dim` (none dropped, none missing)."""
        if not isinstance(x, torch.Tensor) or not -x.dim() <= dim < x.dim() or x.shape[dim] != self.n:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{self!r} permutes {self.n} tokens along dim {dim}, got {got}")

    def _on(self, device: torch.device, index: torch.Tensor) -> torch.Tensor:
        """`index` on `device`, copied there once (a copy per call would wait for the GPU)."""
        key = (device, index is self.perm)
        if key not in self._copies:
            self._copies[key] = index.to(device)
        return self._copies[key]


def cancel_digits(node: ir.Node) -> ir.Node:
    """`node` with every floor division or modulo of an integer sum by a constant m, `m*X + R`,
    replaced by X + R // m (resp. R % m), and by X (resp. R) where 0 <= R < m is provable from
    R's parts' ranges; exact for any integers X, R. A natural index rebuilt from a layout's brick
    digits and cut into coordinates by the pattern (`natural(q) // W`, `natural(q) % W`) so reads
    the digits directly: fewer operations in the kernel, and tile ranges the interval analysis
    decides without evaluating pairs (no division or modulo sees a sum of many digits)."""
    def cancelled(n: ir.Node) -> ir.Node | None:
        if not (isinstance(n, ir.Op) and n.op in ("floordiv", "mod")):
            return None
        x, m = n.args
        if not (isinstance(m, ir.Const) and type(m.value) is int and m.value > 0) or ir.kind_of(x) != "int":
            return None
        terms = _affine(x)
        if terms is None:
            return None
        whole = [(c // m.value, t) for c, t in terms if t is not None and c % m.value == 0]
        rest = [(c, t) for c, t in terms if t is None or c % m.value]
        if not whole:
            return None
        lo, hi = _sum_range(rest)
        if 0 <= lo <= hi < m.value:
            return _linear(whole if n.op == "floordiv" else rest)
        if n.op == "mod":
            return ir.op("mod", _linear(rest), m)
        return ir.op("add", _linear(whole), ir.op("floordiv", _linear(rest), m))

    def visit(n: ir.Node) -> ir.Node | None:
        out = cancelled(n)
        _range(n if out is None else out)  # bottom-up, so _range never recurses deeply
        return out
    return ir.substitute(node, visit)


def _affine(node: ir.Node) -> list | None:
    """An integer expression as [(coefficient, term)] (term None: the constant), flattening +, -,
    negation and products by integer constants; None if the expression is not an integer."""
    out: list = []
    stack = [(1, node)]
    while stack:
        c, n = stack.pop()
        if isinstance(n, ir.Const):
            if type(n.value) is not int:
                return None
            out.append((c * n.value, None))
        elif isinstance(n, ir.Op) and n.op == "add":
            stack += [(c, a) for a in n.args]
        elif isinstance(n, ir.Op) and n.op == "sub":
            stack += [(c, n.args[0]), (-c, n.args[1])]
        elif isinstance(n, ir.Op) and n.op == "neg":
            stack.append((-c, n.args[0]))
        elif isinstance(n, ir.Op) and n.op == "mul" and any(_int_const(a) for a in n.args):
            k, t = n.args if _int_const(n.args[0]) else n.args[::-1]
            stack.append((c * k.value, t))
        elif ir.kind_of(n) == "int":
            out.append((c, n))
        else:
            return None
    return [(c, t) for c, t in out if c]


def _int_const(n: ir.Node) -> bool:
    return isinstance(n, ir.Const) and type(n.value) is int


def _sum_range(terms: list) -> tuple:
    """Bounds of sum(c * t): each term's bounds from `_range` (the constant's its value)."""
    lo = hi = 0
    for c, t in terms:
        a, b = (1, 1) if t is None else _range(t)
        a, b = (c * a, c * b) if c > 0 else (c * b, c * a)
        lo, hi = lo + a, hi + b
    return lo, hi


@lru_cache(maxsize=1 << 16)
def _range(n: ir.Node) -> tuple:
    """Integer bounds of a term over token indices q, kv >= 0 ((-inf, inf) where not known)."""
    unknown = (-math.inf, math.inf)
    if isinstance(n, ir.Var):
        return (0, math.inf) if n.name in ("q", "kv", "b", "h") else unknown
    if isinstance(n, ir.Const):
        return (n.value, n.value) if _int_const(n) else unknown
    if not (isinstance(n, ir.Op) and n.op in ("floordiv", "mod") and _int_const(n.args[1]) and n.args[1].value > 0):
        return unknown
    m = n.args[1].value
    lo, hi = _sum_range(_affine(n.args[0]) or [(1, n.args[0])]) if ir.kind_of(n.args[0]) == "int" else unknown
    if n.op == "floordiv":
        return (lo // m if lo > -math.inf else lo, hi // m if hi < math.inf else hi)
    return (lo, hi) if 0 <= lo and hi < m else (0, m - 1)


def _linear(terms: list) -> ir.Node:
    """The IR of sum(c * t) (t None: the constant c), negative terms subtracted."""
    node = None
    for c, t in terms:
        term = ir.const(abs(c)) if t is None else t if abs(c) == 1 else ir.op("mul", ir.const(abs(c)), t)
        if node is None:
            node = term if c > 0 else ir.op("neg", term)
        else:
            node = ir.op("add" if c > 0 else "sub", node, term)
    return ir.const(0) if node is None else node


class _Text(str):
    """Source text with + and * by ints (and floor ops by ints), so `_natural` prints Triton
    expressions; the identities x * 1, x + 0, x // 1 and x % 1 = 0 print nothing, and floor
    operations by powers of two print as shifts and masks."""

    def __add__(self, other):
        return self if str(other) == "0" else _Text(other) if self == "0" else _Text(f"({self} + {other})")

    def __mul__(self, other):
        return self if other == 1 else _Text(f"({self} * {other})")

    def div(self, y: int):
        if y & (y - 1) == 0:  # a power of two (p >= 0): a shift, not a division
            return self if y == 1 else _Text(f"({self} >> {y.bit_length() - 1})")
        return _Text(f"({self} // {y})")

    def mod(self, y: int):
        return _Text("0") if y == 1 else _Text(f"({self} & {y - 1})") if y & (y - 1) == 0 else _Text(f"({self} % {y})")


class _Expr:
    """An IR node with + and * by ints, so `_natural` reads the same over IR as over tensors."""

    def __init__(self, node: ir.Node):
        self.node = node

    def __add__(self, other):
        return _Expr(ir.op("add", _node(self), _node(other)))

    def __mul__(self, other):
        return _Expr(ir.op("mul", _node(self), _node(other)))


def _node(x) -> ir.Node:
    if isinstance(x, _Expr):
        return x.node
    if isinstance(x, int):
        return ir.const(x)
    return x


# bricks tried per canvas rank, best first: one brick = a 128-row query tile, and a 64-key kv
# tile is half a brick (16x8 on natten2d 64x128, kernel 17, tiles 128x64: 672 live tiles of 8192
# against 2176 in row-major order; 8x16: 1012; 4x32: 1560)
_BRICKS = {1: ((1,),), 2: ((16, 8), (8, 8), (8, 4), (4, 4)), 3: ((2, 8, 8), (4, 4, 8), (2, 4, 8), (2, 4, 4))}


def default_layout(canvas, dilation=1) -> Layout | None:
    """The brick layout the catalogue's multi-dimensional patterns use by default: the first brick
    of _BRICKS that divides every (dilation class of an) axis, or None when none does or the
    layout would be the identity (1-D, no dilation)."""
    canvas = canvas_dims(canvas)
    dims = len(canvas)
    dil = axis_ints(dilation, dims, "dilation")
    if dims == 1 and dil == (1,):
        return None
    for brick in _BRICKS[dims]:
        if all(s % (b * d) == 0 for s, b, d in zip(canvas, brick, dil)):
            return Layout(canvas, brick, dil)
    return None
