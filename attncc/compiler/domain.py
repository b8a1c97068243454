"""Domain conditions: where a pattern's expressions are defined, checked before anything runs.

Over the domain b < B, h < H, q < Q_LEN, kv < KV_LEN a pattern is well defined only if
- every buffer index is inside its buffer, everywhere: kernels read a buffer even in a `where`
  branch they discard, so an index that leaves the buffer there is an out-of-bounds read;
- no integer `//` or `%` divides by zero, and no float `/` divides by a zero that does not depend
  on the score;
- sqrt, log and log2 of score-free values are of values >= 0, `**` is defined (no zero to a
  negative power, no negative base to a non-integer power);
- a float converted to an integer (`int`, `.long()`) is finite and within +-2**62;
- every integer expression stays within int64 (numerics.check_int64: `q ** 40` is refused, never
  wrapped).
Except for buffer indices, a condition needs to hold only where the value reaches the result:
`where(c, x, y)` discards x where c is false, so x's conditions are checked under c (its *path
condition*; T5's log buckets compute log(0) in the branch they discard). Conditions on score-free
values are decided exactly: interval analysis first, then the block classifier with element-wise
evaluation of what it leaves undecided. A condition on a value that depends on the score can only
be proven by interval analysis (buffer indices, integer divisors); float functions of the score
are IEEE arithmetic, as in SDPA, and produce NaN or inf where the data says so.

`check_domain` raises PatternError naming the condition, the expression and a position where it
fails. The kernels, the reference and the block-mask builder all run it first, so they refuse the
same patterns, on every device.
"""
from __future__ import annotations

import torch

from ..dsl import ir
from ..dsl.pattern import Pattern
from ..dsl.trace import PatternError
from . import evaluate, intervals

INT_CONVERSION_LIMIT = intervals.INT_CONVERSION_LIMIT  # a float converted by int() stays within +- this
_PATH_SIZE_LIMIT = 64            # nodes in a path condition before it is dropped (TRUE: stricter)


def path_conditions(root: ir.Node) -> dict[ir.Node, ir.Node]:
    """For every node of `root`, a boolean IR that is true wherever the node's value can reach
    the root (through `where` branches; score-dependent or large conditions become TRUE)."""
    order = list(ir.walk(root))[::-1]  # parents before children
    paths: dict[ir.Node, ir.Node] = {root: ir.TRUE}
    for n in order:
        p = paths[n]
        edges = [ir.TRUE] * len(n.children())
        if isinstance(n, ir.Op) and n.op == "where" and ir.score_free(n.args[0]):
            edges = [ir.TRUE, n.args[0], ir.op("not", n.args[0])]
        for child, edge in zip(n.children(), edges):
            reach = p if edge is ir.TRUE else ir.op("and", p, edge)
            old = paths.get(child)
            new = reach if old is None else ir.op("or", old, reach)
            if new is not ir.TRUE and sum(1 for _ in ir.walk(new)) > _PATH_SIZE_LIMIT:
                new = ir.TRUE
            paths[child] = new
    return paths


def node_conditions(n: ir.Node, shapes: dict[str, tuple]) -> list[tuple[ir.Node, str]]:
    """(condition, what it guards) pairs that must hold where `n`'s value is used."""
    c = ir.const
    if isinstance(n, ir.Load):
        out = []
        for d, i in enumerate(n.index):
            size = shapes[n.buffer][d]
            out.append((ir.op("and", ir.op("ge", i, c(0)), ir.op("lt", i, c(size))),
                        f"index {i} of buffer {n.buffer!r} must stay inside dim {d} of size {size}"))
        return out
    if not isinstance(n, ir.Op):
        return []
    a = n.args
    zero = c(0.0) if ir.kind_of(n) == "float" else c(0)
    if n.op in ("floordiv", "mod") and (ir.kind_of(n) == "int" or ir.score_free(a[1])):
        return [(ir.op("ne", a[1], zero), f"the divisor {a[1]} of {n} must not be zero")]
    if n.op == "truediv" and ir.score_free(a[1]):
        return [(ir.op("ne", a[1], c(0)), f"the divisor {a[1]} of {n} must not be zero")]
    if n.op in ("sqrt", "log", "log2") and ir.score_free(a[0]):
        return [(ir.op("ge", a[0], c(0)), f"the argument {a[0]} of {n.op} must not be negative")]
    if n.op == "pow" and ir.kind_of(n) == "float" and ir.score_free(n):
        base, expo = a
        integral = ir.op("eq", ir.op("floor", expo), expo) if ir.kind_of(expo) == "float" else ir.TRUE
        ok = ir.op("or", ir.op("gt", base, c(0)), ir.op("and", ir.op("eq", base, c(0)), ir.op("ge", expo, c(0))))
        ok = ir.op("or", ok, ir.op("and", ir.op("lt", base, c(0)), integral))
        return [(ok, f"{n} must be defined (no 0 ** negative, no negative ** fraction)")]
    if n.op == "int" and ir.kind_of(a[0]) == "float" and ir.score_free(a[0]):
        lim = float(INT_CONVERSION_LIMIT)
        return [(ir.op("and", ir.op("ge", a[0], c(-lim)), ir.op("le", a[0], c(lim))),
                 f"{a[0]}, converted by int(), must be finite and within +-2**62")]
    return []


def conditions(root: ir.Node, shapes: dict[str, tuple]) -> list[tuple[ir.Node, str]]:
    """Every implication `path(n) -> condition(n)` of `root` as (boolean IR, description)."""
    paths = path_conditions(root)
    out = []
    for n in ir.walk(root):
        for cond, what in node_conditions(n, shapes):
            path = ir.TRUE if isinstance(n, ir.Load) else paths[n]
            implied = cond if path is ir.TRUE else ir.op("or", ir.op("not", path), cond)
            if implied is not ir.TRUE:
                out.append((implied, what))
    return out


def check_domain(pattern: Pattern, roots: tuple[ir.Node, ...], B: int, H: int, Q_LEN: int, KV_LEN: int,
                 device=None) -> None:
    """PatternError unless every domain condition of `roots` holds for b < B, h < H, q < Q_LEN,
    kv < KV_LEN with the pattern's current params and buffers (see the module docstring)."""
    pattern.require_bound()
    for root in roots:  # unbound buffers and wrong ranks first: the conditions need the shapes
        for n in ir.walk(root):
            if isinstance(n, ir.Load):
                evaluate.buffer_of(n, pattern.buffers)
    shapes = {name: tuple(t.shape) for name, t in pattern.buffers.items()}
    todo = [c for root in roots for c in conditions(root, shapes)]
    buffers = {k: t.to(device) for k, t in pattern.buffers.items()}
    from .numerics import check_int64  # numerics builds on this module (whole_domain)

    check_int64(roots, pattern.params, buffers, B, H, Q_LEN, KV_LEN, device)
    if not todo:
        return
    box = whole_domain(B, H, Q_LEN, KV_LEN, pattern.params, buffers, device)
    undecided = []
    for cond, what in todo:
        tri = intervals.analyse(cond, box)
        t, _, _ = intervals.decide(tri, device)
        if bool(t.all()):
            continue
        if not ir.score_free(cond):
            raise PatternError(f"cannot prove that {what}: it depends on the score (clamp it into range)")
        undecided.append((cond, what))
    for cond, what in undecided:
        _check_exactly(pattern, cond, what, B, H, Q_LEN, KV_LEN, buffers, device)


def whole_domain(B: int, H: int, Q_LEN: int, KV_LEN: int, params, buffers, device) -> intervals.Box:
    """One interval box per (b, h) spanning every q < Q_LEN and kv < KV_LEN ([B, H, 1, 1] tensors)."""
    f64 = dict(dtype=torch.float64, device=device)
    zero = torch.zeros(1, 1, 1, 1, **f64)
    return intervals.Box(zero, zero + (Q_LEN - 1), zero, zero + (KV_LEN - 1),
                         torch.arange(B, **f64).view(B, 1, 1, 1), torch.arange(H, **f64).view(1, H, 1, 1),
                         params, buffers, {})


def _check_exactly(pattern: Pattern, cond: ir.Node, what: str, B, H, Q_LEN, KV_LEN, buffers, device) -> None:
    from .blockmask import FULL, classify

    used = ir.free_vars(cond)
    Bs, Hs = (B if "b" in used else 1), (H if "h" in used else 1)
    probe = Pattern.from_ir(mask=cond, params=pattern.params, buffers=buffers)
    tile = 128 if max(Q_LEN, KV_LEN) > 4096 else 32
    classes = classify(probe, Bs, Hs, Q_LEN, KV_LEN, tile, tile, device, clamp_loads=True)
    bad = classes.first_not(FULL)
    if bad is None:
        return
    b, h, qt, kt = bad
    q = torch.arange(qt * tile, min((qt + 1) * tile, Q_LEN), device=device).view(-1, 1)
    kv = torch.arange(kt * tile, min((kt + 1) * tile, KV_LEN), device=device).view(1, -1)
    env = {"b": torch.tensor(b, device=device), "h": torch.tensor(h, device=device), "q": q, "kv": kv}
    ok = evaluate.evaluate(cond, env, pattern.params, buffers, clamp_loads=True).bool().expand(q.shape[0], kv.shape[1])
    i, j = (~ok).nonzero()[0].tolist()
    where = f"b={b}, h={h}, q={int(q[i, 0])}, kv={int(kv[0, j])}"
    raise PatternError(f"the pattern is not defined everywhere: {what}, but it fails at {where}")
