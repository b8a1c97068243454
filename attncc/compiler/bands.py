"""Exact decompositions of a mask into bands and segments, the shapes FlashAttention-4 runs natively.

FA4 computes causal and sliding-window masks on its own, with no mask_mod and no block sparsity,
and on SM90 only those run its deterministic backward. Many patterns are unions of such pieces:
a prefix LM is a dense rectangle (kv < P) beside a causal one (kv >= P), sinks a dense sliver
beside a sliding window, a document mask a causal square per document. This module finds those
pieces from the IR, exactly, or says there are none (None):

- `bands(mask, params, Q, KV)`: disjoint `Band`s (a rectangle of q and kv cut to
  lo <= kv - q <= hi) whose union is the mask on [0, Q) x [0, KV).
- `segments(mask, params, buffers, Q, KV)`: `Segments` (cu_seqlens-style offsets, one band
  inside every segment) where the mask is seg(q) == seg(kv) & band, seg a buffer of run-contiguous
  ids read at q and kv, or `x // C`.
- `residues(mask, params, Q, KV)`: `Residues` where the mask is q = kv (mod s) & a formula of
  kv - q alone (a dilated window): each residue class is then that formula on its own, in
  class-local positions (runtime/fold.py runs the classes as heads of one call, views only).

Only masks of the index variables q and kv qualify: comparisons of integer-affine expressions
along q, kv or kv - q (abs of one included), combined by and / or / not, with params at their
bound values. Everything is integer arithmetic in Python: no rounding anywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..dsl import ir

MAX_BANDS = 4  # more pieces than this cost more in extra calls than the native kernels save
SLIVER_KEYS = 64  # a band of at most this many keys is a sliver (is_sliver)
_AXES = {(1, 0): "q", (0, 1): "kv", (-1, 1): "d"}  # coefficient pattern of (q, kv) -> axis


@dataclass(frozen=True)
class Band:
    """Pairs q in [q0, q1), kv in [k0, k1) with lo <= kv - q <= hi (None: unbounded that side)."""
    q0: int
    q1: int
    k0: int
    k1: int
    lo: int | None
    hi: int | None

    def window(self) -> tuple[int | None, int | None]:
        """FA4's (window_size_left, window_size_right) on the slices q[q0:q1], kv[k0:k1]: FA4
        aligns a window bottom-right, j - i - (Sk - Sq) in [-left, right] for local rows i, cols j."""
        shift = self.q0 - self.k0 - (self.k1 - self.k0) + (self.q1 - self.q0)  # kv - q = j - i + Sk - Sq - shift
        return (None if self.lo is None else -self.lo - shift, None if self.hi is None else self.hi + shift)


def is_sliver(band: Band) -> bool:
    """A band of at most SLIVER_KEYS keys (sinks' sink columns): FA4's backward runs it as one program
    per 128-key tile walking every query tile alone, 32x the work of 4 keys and serial in the
    query tiles; attncc's sliver kernel (templates/sliver_backward.py.tmpl) splits it by query rows."""
    return band.k1 - band.k0 <= SLIVER_KEYS


@dataclass(frozen=True)
class Segments:
    """Segments [offsets[i], offsets[i+1]) of the sequence, each seeing only itself, inside it
    pairs with lo <= kv - q <= hi (None: unbounded); offsets int64 [num_segments + 1] on the CPU,
    `longest` the longest segment's length."""
    offsets: torch.Tensor
    longest: int
    lo: int | None
    hi: int | None


# ---------------------------------------------------------------------------------------------
# The mask as a boolean formula over atoms, each atom an integer set along one axis.

@dataclass(frozen=True)
class _Atom:
    axis: str                                   # "q", "kv" or "d" (= kv - q)
    runs: tuple[tuple[float, float], ...]       # where it holds: closed integer ranges, +-inf ends


def _affine(node: ir.Node, params: dict) -> tuple[int, int, int] | None:
    """(a, c, r) with node == a*q + c*kv + r for every q, kv, or None."""
    if isinstance(node, ir.Var):
        return {"q": (1, 0, 0), "kv": (0, 1, 0)}.get(node.name)
    if isinstance(node, ir.Const):
        return (0, 0, node.value) if type(node.value) is int else None
    if isinstance(node, ir.Param):
        value = params.get(node.name)
        return (0, 0, value) if type(value) is int else None
    if not isinstance(node, ir.Op):
        return None
    parts = [_affine(a, params) for a in node.args]
    if any(p is None for p in parts):
        return None
    if node.op == "add":
        return tuple(x + y for x, y in zip(*parts))
    if node.op == "sub":
        return tuple(x - y for x, y in zip(*parts))
    if node.op == "neg":
        return tuple(-x for x in parts[0])
    if node.op == "mul":
        (a1, c1, r1), (a2, c2, r2) = parts
        if a1 == c1 == 0:
            return (r1 * a2, r1 * c2, r1 * r2)
        if a2 == c2 == 0:
            return (a1 * r2, c1 * r2, r1 * r2)
    return None


def _compare(name: str, e: tuple[int, int, int]):
    """The atom `a*q + c*kv + r <name> 0`, or a constant bool, or None."""
    a, c, r = e
    if a == c == 0:
        return {"lt": r < 0, "le": r <= 0, "gt": r > 0, "ge": r >= 0, "eq": r == 0, "ne": r != 0}[name]
    g = math.gcd(a, c)
    unit = (a // g, c // g)
    if unit not in _AXES and (-unit[0], -unit[1]) in _AXES:
        unit, g = (-unit[0], -unit[1]), -g
    if unit not in _AXES:
        return None
    # g * X + r <name> 0 with X the axis value, g > 0: X <name> -r / g, bounded in exact integers
    if g < 0:
        name = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}.get(name, name)
        g, r = -g, -r
    floor, ceil, exact = (-r) // g, -(r // g), r % g == 0
    inf = math.inf
    runs = {"lt": ((-inf, ceil - 1),), "le": ((-inf, floor),), "gt": ((floor + 1, inf),), "ge": ((ceil, inf),),
            "eq": ((floor, floor),) if exact else (),
            "ne": ((-inf, floor - 1), (floor + 1, inf)) if exact else ((-inf, inf),)}[name]
    return _Atom(_AXES[unit], runs)


def _formula(node: ir.Node, params: dict):
    """The mask as nested ("and"|"or"|"not", ...) tuples over _Atoms and bools, or None."""
    if isinstance(node, ir.Const) and type(node.value) is bool:
        return node.value
    if not isinstance(node, ir.Op):
        return None
    if node.op in ("and", "or"):
        parts = [_formula(a, params) for a in node.args]
        return None if any(p is None for p in parts) else (node.op, *parts)
    if node.op == "not":
        inner = _formula(node.args[0], params)
        return None if inner is None else ("not", inner)
    if node.op not in ("lt", "le", "gt", "ge", "eq", "ne"):
        return None
    left, right = node.args
    for x, y, name in ((left, right, node.op), (right, left, _MIRROR[node.op])):
        if isinstance(x, ir.Op) and x.op == "abs":  # abs(e) <name> y, y free of q and kv
            e, bound = _affine(x.args[0], params), _affine(y, params)
            if e is None or bound is None or bound[:2] != (0, 0):
                return None
            if name in ("eq", "ne") and bound[2] < 0:  # abs(e) == c < 0 never holds
                return name == "ne"
            pos = _compare(name, (e[0], e[1], e[2] - bound[2]))
            neg = _compare(name, (-e[0], -e[1], -e[2] - bound[2]))
            if pos is None or neg is None:
                return None
            return ("and" if name in ("lt", "le", "ne") else "or", pos, neg)
    le, ri = _affine(left, params), _affine(right, params)
    if le is None or ri is None:
        return None
    return _compare(node.op, tuple(x - y for x, y in zip(le, ri)))


_MIRROR = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq", "ne": "ne"}


def _atoms(f) -> list[_Atom]:
    if isinstance(f, _Atom):
        return [f]
    if isinstance(f, tuple):
        return [a for part in f[1:] for a in _atoms(part)]
    return []


def _holds(f, point: dict) -> bool:
    """f at one cell: point maps each axis to a value representative of the cell."""
    if isinstance(f, bool):
        return f
    if isinstance(f, _Atom):
        x = point[f.axis]
        return any(lo <= x <= hi for lo, hi in f.runs)
    if f[0] == "not":
        return not _holds(f[1], point)
    vals = (_holds(part, point) for part in f[1:])
    return all(vals) if f[0] == "and" else any(vals)


def _cells(atoms: list[_Atom], axis: str, lo: int, hi: int) -> list[tuple[int, int]]:
    """[lo, hi] cut into closed integer ranges on which every atom along `axis` is constant."""
    cuts = {lo, hi + 1}
    for a in atoms:
        if a.axis == axis:
            for x, y in a.runs:
                cuts.update(int(c) for c in (x, y + 1) if math.isfinite(c) and lo < c <= hi)
    cuts = sorted(cuts)
    return [(x, y - 1) for x, y in zip(cuts, cuts[1:])]


def _d_runs(f, atoms, q: tuple[int, int], kv: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """The maximal ranges of kv - q where f holds, for q and kv in the cells q, kv."""
    out: list[list[int]] = []
    for d0, d1 in _cells(atoms, "d", kv[0] - q[1], kv[1] - q[0]):
        if _holds(f, {"q": q[0], "kv": kv[0], "d": d0}):
            if out and out[-1][1] == d0 - 1:
                out[-1][1] = d1
            else:
                out.append([d0, d1])
    return tuple((a, b) for a, b in out)


def _band(q0: int, q1: int, k0: int, k1: int, lo: int, hi: int) -> Band | None:
    """The band trimmed to its live rows and columns (None if it holds no pair), lo / hi None where
    the trimmed rectangle never reaches them."""
    if lo > hi:
        return None
    q0, q1 = max(q0, k0 - hi), min(q1, k1 - lo)           # rows with some kv in [k0, k1)
    if q0 >= q1:
        return None
    k0, k1 = max(k0, q0 + lo), min(k1, q1 + hi)           # columns some such row reaches
    if k0 >= k1:
        return None
    return Band(q0, q1, k0, k1, None if lo <= k0 - (q1 - 1) else lo, None if hi >= (k1 - 1) - q0 else hi)


def bands(mask: ir.Node, params: dict, Q: int, KV: int) -> tuple[Band, ...] | None:
    """Disjoint bands whose union is exactly `mask` on [0, Q) x [0, KV), at most MAX_BANDS of them
    (an empty tuple: the mask holds nowhere), or None where the mask is not such a union."""
    f = _formula(mask, params)
    if f is None or Q < 1 or KV < 1:
        return None
    atoms = _atoms(f)
    rows = []  # (q cell, ((kv cell, d runs), ...)) with runs merged across kv cells where equal
    for qc in _cells(atoms, "q", 0, Q - 1):
        line: list = []
        for kc in _cells(atoms, "kv", 0, KV - 1):
            runs = _d_runs(f, atoms, qc, kc)
            if line and line[-1][1] == runs:
                line[-1] = ((line[-1][0][0], kc[1]), runs)
            else:
                line.append((kc, runs))
        line = tuple(line)
        if rows and rows[-1][1] == line:
            rows[-1] = ((rows[-1][0][0], qc[1]), line)
        else:
            rows.append((qc, line))
    out = []
    for (qa, qb), line in rows:
        for (ka, kb), runs in line:
            for lo, hi in runs:
                band = _band(qa, qb + 1, ka, kb + 1, lo, hi)
                if band is not None:
                    out.append(band)
    return tuple(out) if len(out) <= MAX_BANDS else None


def _conjuncts(node: ir.Node) -> list[ir.Node]:
    if isinstance(node, ir.Op) and node.op == "and":
        return [c for a in node.args for c in _conjuncts(a)]
    return [node]


def _segment_key(node: ir.Node, var: str, params: dict):
    """("load", buffer) for buffer[var], ("div", C) for var // C (C > 0), else None."""
    if isinstance(node, ir.Load) and node.index == (ir.Var(var),):
        return ("load", node.buffer)
    if isinstance(node, ir.Op) and node.op == "floordiv" and node.args[0] is ir.Var(var):
        c = _affine(node.args[1], params)
        if c is not None and c[:2] == (0, 0) and c[2] > 0:
            return ("div", c[2])
    return None


def segments(mask: ir.Node, params: dict, buffers: dict, Q: int, KV: int) -> Segments | None:
    """The mask as seg(q) == seg(kv) & band with one band of kv - q alone (None if it is not),
    Q == KV. A buffer's ids must be run-contiguous on [0, Q) (each id one run: checked here, which
    reads the buffer once)."""
    if Q != KV or Q < 1:
        return None
    parts = _conjuncts(mask)
    for i, part in enumerate(parts):
        if not (isinstance(part, ir.Op) and part.op == "eq"):
            continue
        a, b = part.args
        keys = {_segment_key(a, "q", params), _segment_key(b, "kv", params)}
        if None in keys or len(keys) != 1:
            keys = {_segment_key(a, "kv", params), _segment_key(b, "q", params)}
        if None in keys or len(keys) != 1:
            continue
        rest = parts[:i] + parts[i + 1:]
        f = _formula(_and(rest), params) if rest else True
        if f is None or any(atom.axis != "d" for atom in _atoms(f)):
            return None
        runs = _d_runs(f, _atoms(f), (0, Q - 1), (0, Q - 1))
        if len(runs) != 1:
            return None
        lo, hi = runs[0]
        offsets = _offsets(keys.pop(), buffers, Q)
        if offsets is None:
            return None
        longest = int(offsets.diff().max())
        return Segments(offsets, longest, None if lo <= -(longest - 1) else lo, None if hi >= longest - 1 else hi)
    return None


def _and(nodes: list[ir.Node]) -> ir.Node:
    out = nodes[0]
    for n in nodes[1:]:
        out = ir.op("and", out, n)
    return out


@dataclass(frozen=True)
class Residues:
    """The mask is q = kv (mod `stride`) & `mask`, with `mask` (IR) the rest in class-local positions:
    token stride*i + r is position i of class r, and a pair of one class is live where `mask` holds
    at its class-local q, kv (exact: the rest reads kv - q alone, and kv - q = stride * (kv' - q'))."""
    stride: int
    mask: ir.Node


def _residue_stride(node: ir.Node, params: dict) -> int | None:
    """s where `node` is q = kv (mod s), s >= 2 a constant: `(q - kv) % s == 0` (either sign, any
    offset that is a multiple of s) or `q % s == kv % s`; else None."""
    if not (isinstance(node, ir.Op) and node.op == "eq"):
        return None
    a, b = node.args
    for x, y in ((a, b), (b, a)):
        if isinstance(x, ir.Op) and x.op == "mod" and y == ir.const(0):
            e, s = _affine(x.args[0], params), x.args[1]
            if (isinstance(s, ir.Const) and type(s.value) is int and s.value >= 2 and e is not None
                    and e[0] == -e[1] and abs(e[0]) == 1 and e[2] % s.value == 0):
                return s.value
    if all(isinstance(x, ir.Op) and x.op == "mod" for x in (a, b)) and a.args[1] == b.args[1]:
        s = a.args[1]
        if (isinstance(s, ir.Const) and type(s.value) is int and s.value >= 2
                and {a.args[0], b.args[0]} == {ir.Var("q"), ir.Var("kv")}):
            return s.value
    return None


def residues(mask: ir.Node, params: dict, Q: int, KV: int) -> Residues | None:
    """The mask as residue classes mod s, each a formula of kv - q alone (a dilated window:
    abs(q - kv) <= W and (q - kv) % s == 0), with Q and KV multiples of s; else None."""
    parts = _conjuncts(mask)
    for i, part in enumerate(parts):
        stride = _residue_stride(part, params)
        if stride is None or Q % stride or KV % stride:
            continue
        rest = parts[:i] + parts[i + 1:]
        if not rest:
            return Residues(stride, ir.TRUE)
        rest = _and(rest)
        f = _formula(rest, params)
        if f is None or any(atom.axis != "d" for atom in _atoms(f)):
            return None
        scaled = {v: ir.op("mul", ir.const(stride), ir.Var(v)) for v in ("q", "kv")}
        return Residues(stride, ir.substitute(rest, lambda n: scaled.get(n.name) if isinstance(n, ir.Var) else None))
    return None


def _offsets(key, buffers: dict, Q: int) -> torch.Tensor | None:
    kind, value = key
    if kind == "div":
        return torch.tensor(list(range(0, Q, value)) + [Q], dtype=torch.int64)
    ids = buffers.get(value)
    if ids is None or ids.dim() != 1 or ids.shape[0] < Q or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        return None
    ids = ids[:Q].to("cpu", torch.int64)
    starts = torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1
    if starts.numel() + 1 != torch.unique(ids).numel():  # an id in two runs: not segments
        return None
    return torch.cat([torch.zeros(1, dtype=torch.int64), starts, torch.tensor([Q])])

