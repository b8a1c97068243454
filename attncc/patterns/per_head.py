"""Per-head patterns (MoA, Fu et al. 2024: heterogeneous elastic rules per head; DuoAttention,
Xiao et al. 2024: full-attention retrieval heads, sink + recent streaming heads).

One pattern whose mask, score and block predicate at head h are those of the pattern given for
head h. Heads sharing a pattern form a group; `head_group` int32 [H] (a buffer) maps each head to
its group, and with groups 0..G-1 the IR is a chain of `where`s:

    mask(b, h, q, kv)  = where(head_group[h] == 0, mask_0, where(head_group[h] == 1, mask_1, ... mask_{G-1}))
    score(s, b, h, q, kv) = the same chain over the score mods (identity where a group has none)

The sub-patterns see the global head index h (alibi slopes stay indexed by h), and each must be
defined at every head 0..H-1, its own or not (kernels read buffers in the branches they discard
too: `alibi(4)`'s slopes serve at most 4 heads). Running with more than H heads is refused
(head_group[h] leaves its buffer). Reassigning heads to groups is a `bind(head_group=...)` away
and never recompiles. When every head has the same pattern, the result is that pattern (its IR,
params, buffers and token layout) under the per_head name; with several, their shared token layout
where they all have the same one, else none (natural order).

The block mask stays exact per head: the mask reads h, so block masks are built per (b, h), and
in each head's tiles the interval analysis reads head_group[h] as a single known value, so the
where chain resolves to that head's own branch; the tiles it leaves undecided are evaluated
element by element, as for any pattern. A streaming head's tiles are exactly those of its own
sliding window, a retrieval head's those of full attention. (Inside a PARTIAL tile the kernel
evaluates every group's mask and picks one, so many groups cost more per partial tile.)

Params and buffers of the sub-patterns are merged: the same name with the same value (a param)
or the same tensor (a buffer) is shared; the same name with different values is a PatternError,
unless `rename=True`, which then gives that name a suffix `_h<first head of the group>` in every
group that has it (`per_head([sliding_window(64), sliding_window(1024)], rename=True)` has
params W_h0 and W_h1).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..dsl import ir
from ..dsl.pattern import Pattern, _same_tensor, block_at_tokens
from ..dsl.trace import PatternError


def _heads_of(patterns_by_head) -> list[Pattern]:
    """The pattern of each head 0..H-1 from a list, a mapping, or (pattern, heads) pairs."""
    if isinstance(patterns_by_head, Pattern):
        raise ValueError("per_head() takes a pattern per head (a list, a mapping head -> pattern, "
                         "or (pattern, heads) pairs), not a single pattern")
    if isinstance(patterns_by_head, Mapping):
        pairs = [(p, [h]) for h, p in patterns_by_head.items()]
    else:
        items = list(patterns_by_head)
        if all(isinstance(p, Pattern) for p in items):
            return _complete({h: p for h, p in enumerate(items)})
        if not all(isinstance(x, (tuple, list)) and len(x) == 2 and isinstance(x[0], Pattern) for x in items):
            raise ValueError("per_head() takes a list of patterns (one per head), a mapping head -> "
                             "pattern, or a list of (pattern, heads) pairs")
        pairs = [(p, [heads] if isinstance(heads, int) else list(heads)) for p, heads in items]
    by_head: dict[int, Pattern] = {}
    for p, heads in pairs:
        if not isinstance(p, Pattern):
            raise ValueError(f"per_head(): {p!r} is not a Pattern")
        for h in heads:
            if isinstance(h, bool) or not isinstance(h, int) or h < 0:
                raise ValueError(f"per_head(): head {h!r} is not a non-negative int")
            if h in by_head:
                raise ValueError(f"per_head(): head {h} is given two patterns")
            by_head[h] = p
    return _complete(by_head)


def _complete(by_head: dict[int, Pattern]) -> list[Pattern]:
    if not by_head:
        raise ValueError("per_head() needs at least one head")
    H = max(by_head) + 1
    missing = [h for h in range(H) if h not in by_head]
    if missing:
        raise ValueError(f"per_head(): heads {missing} have no pattern (heads 0..{H - 1} must all have one)")
    return [by_head[h] for h in range(H)]


def per_head(patterns_by_head: Sequence[Pattern] | Mapping[int, Pattern] | Sequence[tuple[Pattern, object]],
             *, rename: bool = False) -> Pattern:
    """At head h, the mask and score of the pattern given for h (see the module docstring).

    patterns_by_head: [p_0, ..., p_{H-1}], {h: p_h}, or [(pattern, heads), ...] (heads an int or
    an iterable of ints); every head 0..H-1 needs exactly one pattern. rename: suffix clashing
    param / buffer names `_h<head>` instead of raising."""
    heads = _heads_of(patterns_by_head)
    groups: list[Pattern] = []
    first_head: list[int] = []
    group_of: list[int] = []
    for h, p in enumerate(heads):
        g = next((i for i, other in enumerate(groups) if other is p or other == p), None)
        if g is None:
            g = len(groups)
            groups.append(p)
            first_head.append(h)
        group_of.append(g)
    name = "per_head(" + ", ".join(f"{p.name or 'pattern'}: heads {_ranges(group_of, g)}"
                                   for g, p in enumerate(groups)) + ")"
    if len(groups) == 1:
        p = groups[0]
        return Pattern.from_ir(p.mask, p.score, p.block, p.params, p.buffers, name, p.block_size, p.layout)

    renamed = [_rename(p, _clashes(groups, first_head, g, rename), first_head[g]) for g, p in enumerate(groups)]
    params: dict = {}
    buffers: dict = {}
    for p in renamed:
        for k, v in p.params.items():
            if k in buffers or params.setdefault(k, v) != v:
                raise PatternError(f"per_head(): the renamed param {k!r} clashes with another name")
        for k, t in p.buffers.items():
            if k in params or not _same_tensor(buffers.setdefault(k, t), t):
                raise PatternError(f"per_head(): the renamed buffer {k!r} clashes with another name")
    head_group_name = _unused("head_group", set(params) | set(buffers))
    buffers[head_group_name] = torch.tensor(group_of, dtype=torch.int32, device=_device(groups))
    in_group = [ir.op("eq", ir.load(head_group_name, (ir.Var("h"),)), ir.const(g)) for g in range(len(groups))]

    def chain(values: list[ir.Node]) -> ir.Node:
        out = values[-1]
        for g in range(len(values) - 2, -1, -1):
            out = ir.op("where", in_group[g], values[g], out)
        return out

    sizes = {p.block_size for p in renamed if p.has_block_mask}
    if len(sizes) <= 1:  # one block size: the block predicates keep their granularity
        masks, blocks = [p.mask for p in renamed], [p.block for p in renamed]
        block_size = sizes.pop() if sizes else renamed[0].block_size
    else:  # several: each group's predicate folded into its mask at its own block size
        masks = [ir.op("and", p.mask, block_at_tokens(p.block, p.block_size)) for p in renamed]
        blocks, block_size = [ir.TRUE] * len(renamed), renamed[0].block_size
    layouts = {p.layout for p in groups}
    return Pattern.from_ir(chain(masks), chain([p.score for p in renamed]), chain(blocks),
                           params, buffers, name, block_size, layouts.pop() if len(layouts) == 1 else None)


def _clashes(groups: list[Pattern], first_head: list[int], g: int, rename: bool) -> set[str]:
    """Names of group g's params / buffers that another group holds with another value (to
    rename), PatternError for the first one unless `rename`."""
    mine = groups[g]
    out = set()
    for o, other in enumerate(groups):
        if o == g:
            continue
        for k, v in mine.params.items():
            if k in other.params and (other.params[k] != v or type(other.params[k]) is not type(v)):
                out.add(k)
            elif k in other.buffers:
                out.add(k)
        for k, t in mine.buffers.items():
            if k in other.buffers and not _same_tensor(other.buffers[k], t):
                out.add(k)
            elif k in other.params:
                out.add(k)
    if out and not rename:
        k = sorted(out)[0]
        o = next(i for i, p in enumerate(groups) if i != g and (k in p.params or k in p.buffers))

        def what(i):
            p = groups[i]
            value = (f"param {k} = {p.params[k]!r}" if k in p.params else
                     f"buffer {k} {tuple(p.buffers[k].shape) if p.buffers[k] is not None else '(unbound)'}")
            return f"the pattern of head {first_head[i]} ({p.name or 'unnamed'}) has {value}"
        raise PatternError(f"per_head(): {what(g)} but {what(o)}; give them one value, "
                           f"or pass rename=True to suffix such names with _h<head>")
    return out


def _rename(p: Pattern, names: set[str], head: int) -> Pattern:
    if not names:
        return p
    new = {k: f"{k}_h{head}" for k in names}

    def swap(n: ir.Node):
        if isinstance(n, ir.Param) and n.name in new:
            return ir.Param(new[n.name], n.kind)
        if isinstance(n, ir.Load) and n.buffer in new:
            return ir.load(new[n.buffer], n.index)
        return None

    mask, score, block = (ir.substitute(e, swap) for e in (p.mask, p.score, p.block))
    params = {new.get(k, k): v for k, v in p.params.items()}
    buffers = {new.get(k, k): t for k, t in p.buffers.items()}
    return Pattern.from_ir(mask, score, block, params, buffers, p.name, p.block_size)


def _unused(name: str, taken: set[str]) -> str:
    i, out = 0, name
    while out in taken:
        i += 1
        out = f"{name}{i}"
    return out


def _device(groups: list[Pattern]):
    return next((t.device for p in groups for t in p.buffers.values() if t is not None), None)


def _ranges(group_of: list[int], g: int) -> str:
    """The heads of group g as ranges: '0-3,6'."""
    hs = [h for h, x in enumerate(group_of) if x == g]
    out, start = [], hs[0]
    for a, b in zip(hs, hs[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)
