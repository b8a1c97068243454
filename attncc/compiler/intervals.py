"""Tri-state analysis of a mask over tiles: interval evaluation of the IR, vectorised with torch.

A tile is the box `q in [q_lo, q_hi] x kv in [kv_lo, kv_hi]` (ragged last tiles clipped to the
lengths) with `b`, `h` fixed. `analyse` evaluates a boolean IR expression over many tiles at
once; all tensors broadcast to the layout of the `Box` (a chunk of tile rows [B, H, R, KB], or
the [P, S, S] tiles of P super-tiles). Values are float64: integers are exact below 2**53.

- A number becomes a `Num`: bounds `lo <= value <= hi` on the tile, whether both bounds are
  *attained* by some pair, whether every integer between them is (*dense*), which of `q`, `kv`
  it varies with (`deps`), and for affine integer expressions the linear form `a*q + c*kv + r`
  (`r` constant on the tile), whose bounds come exactly from the box corners.
- A boolean becomes a `Tri`: `t` (true on every pair), `f` (false on every pair) and `exact`
  (the class is known: decided, or certainly mixed).

Everything is sound: `t`/`f` hold only when true for every existing pair. Tiles with none of
`t`, `f`, `exact` are left for exact element-wise evaluation (see blockmask.py). A buffer read
along one varying index gets its exact min/max over the tile from sparse_table.py.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Union

import torch

from ..dsl import ir, ops
from ..dsl.trace import PatternError
from .evaluate import buffer_of

INT_CONVERSION_LIMIT = 2 ** 62  # domain.py proves a converted score-free float lies within +- this where it matters
from .sparse_table import range_reduce

Flag = Union[bool, torch.Tensor]
INF = math.inf
EXACT_INT = 2.0 ** 53  # float64 holds every integer below this exactly


# ----------------------------------------------------------------------------------------------
# Flags are python bools where they are known statically (cheap), else bool tensors.

def _and(*xs: Flag) -> Flag:
    out: Flag = True
    for x in xs:
        if x is False or (isinstance(x, bool) and not x):
            return False
        if not isinstance(x, bool):
            out = x if out is True else out & x
    return out


def _or(*xs: Flag) -> Flag:
    out: Flag = False
    for x in xs:
        if x is True or (isinstance(x, bool) and x):
            return True
        if not isinstance(x, bool):
            out = x if out is False else out | x
    return out


def _not(x: Flag) -> Flag:
    return (not x) if isinstance(x, bool) else ~x


def _pick(c: Flag, a: Flag, b: Flag) -> Flag:
    """where(c, a, b) for flags."""
    if isinstance(c, bool):
        return a if c else b
    return _or(_and(c, a), _and(_not(c), b))


def _all(x: Flag) -> bool:
    return x if isinstance(x, bool) else bool(x.all())


# ----------------------------------------------------------------------------------------------
# Abstract values.

@dataclass
class Num:
    """A number over each tile: lo <= value <= hi (float64 tensors)."""
    lo: torch.Tensor
    hi: torch.Tensor
    att: Flag            # lo and hi are both values of some pair of the tile
    dense: Flag          # every integer in [lo, hi] is a value (integers only)
    deps: frozenset      # subset of {"q", "kv"}: empty means constant on each tile
    is_int: bool
    lin: tuple | None = None   # (a, c, r): value == a*q + c*kv + r, r constant on the tile
    const: ir.Value | None = None  # the python value when it is one constant everywhere


@dataclass
class Tri:
    """A boolean over each tile: t = true everywhere, f = false everywhere, exact = class known."""
    t: Flag
    f: Flag
    exact: Flag
    deps: frozenset


class Box:
    """Tiles and what evaluation needs: params, buffers, range tables (shared across chunks).

    q_lo, q_hi, kv_lo, kv_hi, b, h: float64 tensors broadcasting to the tile layout, e.g.
    [1, 1, R, 1], [1, 1, 1, KB], [B, 1, 1, 1], [1, H, 1, 1] for a chunk of R rows of tiles.
    """

    def __init__(self, q_lo, q_hi, kv_lo, kv_hi, b, h, params, buffers, tables: dict):
        self.q_lo, self.q_hi, self.kv_lo, self.kv_hi, self.b, self.h = q_lo, q_hi, kv_lo, kv_hi, b, h
        self.params, self.buffers, self.tables = params, buffers, tables
        self.device = q_lo.device
        self.nq = q_hi - q_lo + 1
        self.nk = kv_hi - kv_lo + 1

    def tensor(self, value) -> torch.Tensor:
        return torch.tensor(float(value), dtype=torch.float64, device=self.device)


def point(box: Box, value, is_int: bool) -> Num:
    """A value constant on each tile (a python number or a float64 tensor)."""
    const = value if not isinstance(value, torch.Tensor) else None
    v = box.tensor(value) if const is not None else value
    return Num(v, v, True, True, frozenset(), is_int, (0, 0, v) if is_int else None, const)


def _scaled(a, lo: torch.Tensor, hi: torch.Tensor):
    """Bounds of a*x for x in [lo, hi] (a a python number or a tensor)."""
    if isinstance(a, torch.Tensor):
        p, q = a * lo, a * hi
        return torch.minimum(p, q), torch.maximum(p, q)
    if a == 0:
        return 0.0, 0.0
    if a == 1:
        return lo, hi
    return (a * lo, a * hi) if a > 0 else (a * hi, a * lo)


def _lin_dense(a, c, nq: torch.Tensor, nk: torch.Tensor) -> Flag:
    """Whether {a*i + c*j} over nq consecutive i and nk consecutive j is an integer interval."""
    if isinstance(a, torch.Tensor) or isinstance(c, torch.Tensor):
        aa, cc = torch.as_tensor(a).abs(), torch.as_tensor(c).abs()
        return (((aa == 1) & ((cc == 0) | (nk == 1) | (nq >= cc)))
                | ((cc == 1) & ((aa == 0) | (nq == 1) | (nk >= aa)))
                | (((aa == 0) | (nq == 1)) & ((cc == 0) | (nk == 1))))
    aa, cc = abs(a), abs(c)
    if aa <= 1 and cc <= 1:
        return True
    if aa == 0:
        return nk == 1
    if cc == 0:
        return nq == 1
    if aa == 1:
        return (nk == 1) | (nq >= cc)
    if cc == 1:
        return (nq == 1) | (nk >= aa)
    return (nq == 1) & (nk == 1)


def linear(box: Box, a, c, r) -> Num:
    """The exact abstraction of a*q + c*kv + r (a, c python ints or tensors, r constant per tile)."""
    # a coefficient past int64 (q * 2**62 * 4): float64 bounds and no linear form; the int64 check
    # refuses the expression wherever it can reach them
    huge = any(isinstance(x, int) and not -2 ** 63 <= x < 2 ** 63 for x in (a, c, r))
    if huge:
        a, c, r = (float(x) if isinstance(x, int) else x for x in (a, c, r))
    lq, hq = _scaled(a, box.q_lo, box.q_hi)
    lk, hk = _scaled(c, box.kv_lo, box.kv_hi)
    r_t = r if isinstance(r, torch.Tensor) else box.tensor(r)
    lo, hi = r_t + lq + lk, r_t + hq + hk
    deps = frozenset(v for v, coef in (("q", a), ("kv", c)) if isinstance(coef, torch.Tensor) or coef != 0)
    if huge:
        return Num(lo, hi, True, False, deps, True)
    const = r if not deps and not isinstance(r, torch.Tensor) else None
    return Num(lo, hi, True, _lin_dense(a, c, box.nq, box.nk), deps, True, (a, c, r_t), const)


def _lin_op(f, x: Num, y: Num) -> tuple:
    return tuple(f(u, v) for u, v in zip(x.lin, y.lin))


# ----------------------------------------------------------------------------------------------
# Arithmetic.

def _combine(lo, hi, x: Num, y: Num, is_int: bool, dense: Flag = False) -> Num:
    """A result whose bounds are reached at (attained) bounds of x and y chosen independently."""
    indep = not (x.deps & y.deps)
    return Num(lo, hi, _and(indep, x.att, y.att), _and(indep, is_int, dense), x.deps | y.deps, is_int)


def _fix_nan(box: Box, n: Num) -> Num:
    bad = torch.isnan(n.lo) | torch.isnan(n.hi)
    if not bool(bad.any()):
        return n
    return _widened(n, bad)


def _widened(n: Num, where: torch.Tensor) -> Num:
    """n, but the whole line (-inf, inf), attained nowhere, on the tiles `where` is true."""
    return Num(torch.where(where, -INF, n.lo), torch.where(where, INF, n.hi), _and(n.att, ~where),
               _and(n.dense, ~where), n.deps, n.is_int)


def _unsure(*xs: Num) -> torch.Tensor:
    """Where some x may be NaN: a NaN arises only where a value reaches an infinity (inf - inf,
    0 * inf, ...; a float buffer's NaN entries load() reads as the whole line), and arithmetic
    then widens the bounds to (-inf, inf) (_fix_nan, corners). A function that narrows its
    argument's bounds (abs, min/max, %, monotone functions, even powers) must not narrow an
    infinite one: `abs(x) >= 0` is false where x is NaN. Integers are never NaN (their infinite
    bounds, past 2**53, are only not exact)."""
    flags = [~torch.isfinite(b) for x in xs if not x.is_int for b in (x.lo, x.hi)]
    return torch.stack(torch.broadcast_tensors(*flags)).any(0) if flags else torch.tensor(False)


def _narrowing(fn):
    """Wrap a narrowing transfer function: its result widened where an argument may be NaN."""
    def wrapped(box: Box, *args):
        nums = [a for a in args if isinstance(a, Num)]
        unsure = _unsure(*nums)
        out = fn(box, *args)
        return _widened(out, unsure) if bool(unsure.any()) else out
    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


def add(box: Box, x: Num, y: Num, sign: int = 1) -> Num:
    if x.lin is not None and y.lin is not None:
        return linear(box, *_lin_op(lambda u, v: u + sign * v, x, y))
    lo, hi = (x.lo + y.lo, x.hi + y.hi) if sign > 0 else (x.lo - y.hi, x.hi - y.lo)
    is_int = x.is_int and y.is_int
    return _combine(lo, hi, x, y, is_int, _and(x.dense, y.dense))


def neg(box: Box, x: Num) -> Num:
    if x.lin is not None:
        return linear(box, *(-u for u in x.lin))
    return Num(-x.hi, -x.lo, x.att, x.dense, x.deps, x.is_int)


def _corners(box: Box, f, x: Num, y: Num, is_int: bool) -> Num:
    vals = torch.stack(torch.broadcast_tensors(f(x.lo, y.lo), f(x.lo, y.hi), f(x.hi, y.lo), f(x.hi, y.hi)))
    return _fix_nan(box, _combine(vals.amin(0), vals.amax(0), x, y, is_int))


def mul(box: Box, x: Num, y: Num) -> Num:
    if not y.deps and x.lin is not None and y.lin is not None:
        x, y = y, x
    if not x.deps and y.lin is not None and x.lin is not None:
        s = x.const if x.const is not None else x.lo
        return linear(box, *(s * u for u in y.lin))
    return _corners(box, torch.mul, x, y, x.is_int and y.is_int)


def _divide(box: Box, f, x: Num, y: Num, is_int: bool) -> Num:
    bad = (y.lo <= 0) & (y.hi >= 0)
    safe = Num(torch.where(bad, 1.0, y.lo), torch.where(bad, 1.0, y.hi), y.att, y.dense, y.deps, y.is_int)
    r = _corners(box, f, x, safe, is_int)
    if not bool(bad.any()):
        return r
    return Num(torch.where(bad, -INF, r.lo), torch.where(bad, INF, r.hi), _and(r.att, ~bad), False, r.deps, is_int)


def _positive_point(y: Num) -> bool:
    return not y.deps and y.is_int and bool((y.lo > 0).all())


def floordiv(box: Box, x: Num, y: Num) -> Num:
    is_int = x.is_int and y.is_int
    if not _positive_point(y):
        r = _divide(box, lambda u, v: torch.div(u, v, rounding_mode="floor"), x, y, is_int)
        if is_int:  # a non-zero integer divisor (the domain check) never grows |x|: |x // y| <= |x|
            m = torch.maximum(x.lo.abs(), x.hi.abs())
            r = Num(torch.maximum(r.lo, -m), torch.minimum(r.hi, m), r.att, r.dense, r.deps, True)
        return r
    d = y.const if y.const is not None else y.lo
    lo, hi = torch.div(x.lo, d, rounding_mode="floor"), torch.div(x.hi, d, rounding_mode="floor")
    if is_int and bool((lo == hi).all()):
        return point(box, lo, True)
    return Num(lo, hi, x.att, _and(is_int, x.dense), x.deps, is_int)


@_narrowing
def mod(box: Box, x: Num, y: Num) -> Num:
    is_int = x.is_int and y.is_int
    if not (is_int and _positive_point(y)) or bool(_big(x).any()):
        return _mod_bound(box, x, y, is_int)
    d = y.const if y.const is not None else y.lo
    f_lo, f_hi = torch.div(x.lo, d, rounding_mode="floor"), torch.div(x.hi, d, rounding_mode="floor")
    same = f_lo == f_hi
    shift = d * f_lo
    if bool(same.all()):
        if x.lin is not None:
            a, c, r = x.lin
            return linear(box, a, c, r - shift)
        return Num(x.lo - shift, x.hi - shift, x.att, x.dense, x.deps, True)
    # Crossing a multiple of d: a dense x passes through both 0 and d - 1.
    m_lo, m_hi = x.lo - shift, x.hi - d * f_hi
    covers = (x.hi - x.lo + 1 >= d) | (m_hi + 1 >= m_lo)
    lo = torch.where(same, m_lo, 0.0)
    hi = torch.where(same, x.hi - shift, d - 1.0)
    return Num(lo, hi, _pick(same, x.att, x.dense), _pick(same, x.dense, _and(x.dense, covers)), x.deps, True)


def _mod_bound(box: Box, x: Num, y: Num, is_int: bool) -> Num:
    """Sound bounds of x % y (torch's floor semantics: the sign of y, |x % y| < |y|) for any y."""
    top = y.hi - 1 if is_int else y.hi
    bot = y.lo + 1 if is_int else y.lo
    pos, negv = y.lo > 0, y.hi < 0
    m = torch.maximum(y.lo.abs(), y.hi.abs()) - (1 if is_int else 0)
    lo = torch.where(pos, 0.0, torch.where(negv, bot, -m))
    hi = torch.where(pos, top, torch.where(negv, 0.0, m))
    return Num(lo, hi, False, False, x.deps | y.deps, is_int)


@_narrowing
def absolute(box: Box, x: Num) -> Num:
    nonneg, nonpos = x.lo >= 0, x.hi <= 0
    if x.lin is not None and bool(nonneg.all()):
        return x
    if x.lin is not None and bool(nonpos.all()):
        return neg(box, x)
    lo = torch.where(nonneg, x.lo, torch.where(nonpos, -x.hi, 0.0))
    hi = torch.maximum(x.lo.abs(), x.hi.abs())
    return Num(lo, hi, _pick(nonneg | nonpos, x.att, x.dense), x.dense, x.deps, x.is_int)


@_narrowing
def minmax(box: Box, x: Num, y: Num, is_min: bool) -> Num:
    f = torch.minimum if is_min else torch.maximum
    below = x.hi <= y.lo if is_min else x.lo >= y.hi   # x alone decides the result
    above = y.hi <= x.lo if is_min else y.lo >= x.hi
    if bool(below.all()):
        return x
    if bool(above.all()):
        return y
    is_int = x.is_int and y.is_int
    return _combine(f(x.lo, y.lo), f(x.hi, y.hi), x, y, is_int, _and(x.dense, y.dense))


@_narrowing
def monotone(box: Box, fn, x: Num) -> Num:
    """A non-decreasing float function applied to the bounds."""
    lo, hi = fn(x.lo), fn(x.hi)
    return _fix_nan(box, Num(lo, hi, x.att, False, x.deps, False))


@_narrowing
def power(box: Box, x: Num, y: Num) -> Num:
    is_int = x.is_int and y.is_int
    k = y.const
    if k is not None and k >= 0 and bool((x.lo >= 0).all()):
        return _fix_nan(box, Num(x.lo ** k, x.hi ** k, x.att, False, x.deps, is_int))
    if k is not None and k >= 0 and float(k).is_integer():  # any sign: odd powers are monotone
        a, b = x.lo ** k, x.hi ** k
        if int(k) % 2:
            return _fix_nan(box, Num(a, b, x.att, False, x.deps, is_int))
        crosses = (x.lo < 0) & (x.hi > 0)
        lo = torch.where(crosses, 0.0, torch.minimum(a, b))
        return _fix_nan(box, Num(lo, torch.maximum(a, b), False, False, x.deps, is_int))
    return Num(box.tensor(-INF), box.tensor(INF), False, False, x.deps | y.deps, is_int)


def where_num(box: Box, c: Tri, x: Num, y: Num) -> Num:
    if _all(c.t):
        return x
    if _all(c.f):
        return y
    t = c.t if isinstance(c.t, torch.Tensor) else torch.tensor(c.t, device=box.device)
    f = c.f if isinstance(c.f, torch.Tensor) else torch.tensor(c.f, device=box.device)
    lo = torch.where(t, x.lo, torch.where(f, y.lo, torch.minimum(x.lo, y.lo)))
    hi = torch.where(t, x.hi, torch.where(f, y.hi, torch.maximum(x.hi, y.hi)))
    att = _pick(t, x.att, _and(f, y.att))
    dense = _pick(t, x.dense, _and(f, y.dense))
    return Num(lo, hi, att, dense, x.deps | y.deps | c.deps, x.is_int and y.is_int)


# ----------------------------------------------------------------------------------------------
# Booleans.

def compare(box: Box, name: str, x: Num, y: Num) -> Tri:
    """x <op> y, decided from the bounds of d = x - y (exact when d's bounds are attained)."""
    if name in ("lt", "gt"):   # x < y  <=>  not x >= y
        return not_(compare(box, "ge" if name == "lt" else "le", x, y))
    d = add(box, x, y, sign=-1)
    lo, hi = d.lo, d.hi
    if x.is_int and y.is_int:  # integers past 2**53 are not exact in float64: decide nothing there
        big = _big(x) | _big(y) | _big(d)
        if bool(big.any()):
            lo, hi = torch.where(big, -INF, lo), torch.where(big, INF, hi)
            d = Num(lo, hi, _and(d.att, ~big), _and(d.dense, ~big), d.deps, True)
    if name == "ge":
        t, f = lo >= 0, hi < 0
        mixed = d.att
    elif name == "le":
        t, f = hi <= 0, lo > 0
        mixed = d.att
    else:
        t, f = (lo == 0) & (hi == 0), (lo > 0) | (hi < 0)
        mixed = _or(_and(d.att, (lo == 0) | (hi == 0)), _and(d.dense, (lo <= 0) & (hi >= 0)))
        if name == "ne":
            t, f = f, t
    return Tri(t, f, _or(t, f, mixed), d.deps)


def _big(x: Num) -> torch.Tensor:
    return (x.lo.abs() >= EXACT_INT) | (x.hi.abs() >= EXACT_INT)


def not_(x: Tri) -> Tri:
    return Tri(x.f, x.t, x.exact, x.deps)


def and_(x: Tri, y: Tri) -> Tri:
    indep = not (x.deps & y.deps)
    f = _or(x.f, y.f)
    exact = _or(f, _and(x.t, y.exact), _and(y.t, x.exact), _and(indep, x.exact, y.exact))
    return Tri(_and(x.t, y.t), f, exact, x.deps | y.deps)


def or_(x: Tri, y: Tri) -> Tri:
    return not_(and_(not_(x), not_(y)))


def where_tri(c: Tri, x: Tri, y: Tri) -> Tri:
    return or_(and_(c, x), and_(not_(c), y))


def as_tri(box: Box, v) -> Tri:
    return v if isinstance(v, Tri) else compare(box, "ne", v, point(box, 0, True))


def as_num(box: Box, v) -> Num:
    if isinstance(v, Num):
        return v
    if isinstance(v.t, bool) and isinstance(v.f, bool) and (v.t or v.f):
        return point(box, int(v.t), True)
    t = torch.as_tensor(v.t, device=box.device)
    f = torch.as_tensor(v.f, device=box.device)
    return Num(t.double(), (~f).double(), v.exact, v.exact, v.deps, True)


# ----------------------------------------------------------------------------------------------
# Buffers: exact min/max over an index interval (sparse tables, see sparse_table.py).

def _clamped(i: Num, top: int) -> Num:
    lo, hi = i.lo.clamp(0, top), i.hi.clamp(0, top)
    return Num(lo, torch.maximum(lo, hi), i.att, i.dense, i.deps, i.is_int)


def _huge(box: Box, name: str) -> bool:
    """Whether an integer buffer holds values float64 cannot represent exactly (|x| > 2**53)."""
    key = (name, "huge")
    if key not in box.tables:
        buf = box.buffers[name]
        box.tables[key] = buf.dtype == torch.int64 and bool(buf.abs().max() > 2 ** 53)
    return box.tables[key]


def load(box: Box, node: ir.Load, index: list[Num]) -> Num:
    """The values `node` may read over each tile. Index ranges are clamped into the buffer: the
    domain check (domain.py) has proven every index in range before any analysis runs."""
    buf = buffer_of(node, box.buffers)
    index = [_clamped(i, buf.shape[d] - 1) for d, i in enumerate(index)]
    is_int = not buf.is_floating_point()
    deps = frozenset().union(*(i.deps for i in index))
    if is_int and _huge(box, node.buffer):   # not exact in float64: leave it to exact evaluation
        return Num(box.tensor(-INF), box.tensor(INF), False, False, deps, True)
    # an index that does not vary with q, kv may still be known only to a range (b % W for a
    # negative param W): read as varying over that range, never as its lower bound
    varying = [d for d, i in enumerate(index) if i.deps or not bool((i.lo == i.hi).all())]
    if not varying:
        return _fix_nan(box, point(box, buf[tuple(i.lo.long() for i in index)].double(), is_int))
    if len(varying) > 1:
        lo, hi = buf.min().double(), buf.max().double()
        return _fix_nan(box, Num(lo, hi, False, False, deps, is_int))
    d = varying[0]
    points = [i.lo.long() for j, i in enumerate(index) if j != d]
    start, stop = index[d].lo, index[d].hi
    lo = range_reduce(box.tables, box.buffers, node.buffer, d, "min", points, start, stop)
    hi = range_reduce(box.tables, box.buffers, node.buffer, d, "max", points, start, stop)
    dense: Flag = False
    if is_int and index[d].dense is not False:
        if buf.shape[d] == 1:
            dense = index[d].dense
        else:   # a dense index range over which the values move by at most 1 hits every value between
            steps = range_reduce(box.tables, box.buffers, node.buffer, d, "step", points, start,
                                 torch.maximum(stop - 1, start))
            dense = _and(index[d].dense, (stop == start) | (steps <= 1))
    if not index[d].deps:  # one unknown value of the range on each tile: no bound attained, not dense
        return _fix_nan(box, Num(lo, hi, False, False, deps, is_int))
    return _fix_nan(box, Num(lo, hi, index[d].dense, dense, deps, is_int))


# ----------------------------------------------------------------------------------------------
# The interpreter.

def truediv(box: Box, x: Num, y: Num) -> Num:
    return _divide(box, torch.true_divide, x, y, False)


def rounding(box: Box, fn, x: Num) -> Num:
    """floor / ceil / round of a float: non-decreasing, so applied to the bounds."""
    return _fix_nan(box, Num(fn(x.lo), fn(x.hi), x.att, False, x.deps, x.is_int))


INT64_MAX = 2.0 ** 63


def to_int(box: Box, x: Num) -> Num:
    """Truncation towards zero (`.long()`): non-decreasing, so applied to the bounds. Where the
    value reaches the result it lies within +-INT_CONVERSION_LIMIT (the domain check proves it for
    score-free values); a value of the score may be anything an int64 holds."""
    lim = INT64_MAX if "score" in x.deps else float(INT_CONVERSION_LIMIT)
    lo = torch.nan_to_num(x.lo.trunc(), nan=-lim).clamp(-lim, lim)
    hi = torch.nan_to_num(x.hi.trunc(), nan=lim).clamp(-lim, lim)
    return Num(lo, hi, False, False, x.deps, True)


def analyse(node: ir.Node, box: Box) -> Tri:
    """The tri-state of a boolean expression of b, h, q, kv on every tile of `box`."""
    memo: dict[int, Num | Tri] = {}
    for n in ir.walk(node):
        memo[id(n)] = evaluate_node(n, [memo[id(c)] for c in n.children()], box)
    return as_tri(box, memo[id(node)])


def decide(tri: Tri, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(all true, all false, undecided and not known mixed or None) as bool tensors."""
    t, f = torch.as_tensor(tri.t, device=device), torch.as_tensor(tri.f, device=device)
    todo = None if tri.exact is True else ~(torch.as_tensor(tri.exact, device=device) | t | f)
    return t, f, todo


def evaluate_node(n: ir.Node, args: list, box: Box):
    """The abstract value (Num or Tri) of node `n` from its children's abstract values `args`."""
    if isinstance(n, ir.Var):
        if n.name == "q":
            return linear(box, 1, 0, 0)
        if n.name == "kv":
            return linear(box, 0, 1, 0)
        if n.name in ("b", "h"):
            return point(box, box.b if n.name == "b" else box.h, True)
        if n.name == ir.SCORE_VAR:  # data: any float (the numeric plan analyses score mods too)
            return Num(box.tensor(-INF), box.tensor(INF), False, False, frozenset({"score"}), False)
        raise PatternError(f"variable {n.name!r} cannot appear in a mask")
    if isinstance(n, ir.Const):
        if isinstance(n.value, bool):
            return Tri(n.value, not n.value, True, frozenset())
        return point(box, n.value, isinstance(n.value, int))
    if isinstance(n, ir.Param):
        value = box.params[n.name]
        return point(box, value, isinstance(value, int))
    if isinstance(n, ir.Load):
        return load(box, n, [as_num(box, a) for a in args])
    row = ops.TABLE[n.op]
    if row.operands == "bool":
        args = [as_tri(box, a) for a in args]
    elif row.operands == "where":
        branch = as_tri if ir.kind_of(n) == "bool" else as_num
        args = [as_tri(box, args[0]), branch(box, args[1]), branch(box, args[2])]
    else:
        args = [as_num(box, a) for a in args]
    return row.interval(_SELF, box, *args)


def where(box: Box, c: Tri, x, y):
    """where(c, x, y) for numbers and for booleans."""
    return where_tri(c, x, y) if isinstance(x, Tri) else where_num(box, c, x, y)


_SELF = sys.modules[__name__]  # the interpreter the table's interval column calls into
