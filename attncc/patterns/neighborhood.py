"""Neighbourhood attention in 1-D, 2-D and 3-D, with dilation, causal axes and strides: NATTEN
(Hassani et al., "Neighborhood Attention Transformer", CVPR 2023), dilated NA (DiNAT, Hassani & Shi
2022), causal NA (Hassani et al., "Faster Neighborhood Attention", 2024) and strided NA
(Generalized Neighborhood Attention, Hassani et al. 2025). The rule is NATTEN's own (its flex and
torch backends, natten >= 0.20), axis by axis.

Tokens are the cells of a canvas `(n,)`, `(rows, cols)` or `(frames, rows, cols)` in row-major
order: token i of a 2-D canvas is at (i // cols, i % cols), of a 3-D one at
(i // (rows * cols), (i // cols) % rows, i % cols). Q_LEN and KV_LEN must both be prod(canvas);
a Pattern carries no sequence length, so this is not checked: tokens past the canvas get
meaningless coordinates.

Along one axis of n cells, with kernel k, dilation d, stride s, a query at coordinate x and a key
at y (all compile-time constants but x, y):

- dilation: the axis splits into d interleaved sub-grids, the cells with the same residue x % d.
  A query sees only keys of its own sub-grid (y % d == x % d). In it the query is at j = x // d,
  the key at i = y // d, and the sub-grid has L = ceil((n - x % d) / d) cells (>= k, since
  k * d <= n is required, as NATTEN requires it).
- non-causal: left = k // 2 and right = k - 1 - left keys on either side (an even k has one more
  on the left, as NATTEN). The stride group of j is j // s; its leader, whose window the whole
  group shares, is g = (j // s) * s + s // 2 (the group's centre query, the right one of the two
  centres for an even s; NATTEN's further min(g, L - 1) cannot change the result). The window
  centre is c = clamp(g, left, L - 1 - right), shifted inward so every window is full size, and
  the key is live iff c - left <= i <= c + right: every query sees exactly k keys on the axis.
- causal: the leader is the group's last query, g = min((j // s) * s + s - 1, L - 1), and the
  key is live iff i <= j and g - i < k: keys g - k + 1 ... j, truncated (not shifted) at the
  start, so with s = 1 query j sees min(j + 1, k) keys.

A pair attends iff it is live on every axis. With k = 1 a query attends itself (NATTEN asks for
k >= 2; k = 1 is kept as the degenerate case). An axis whose window is the whole sub-grid
(k * d == n) contributes only its sub-grid test (and, causal, y <= x).

The mask uses integer ops only (//, %, clamp, min, abs, comparisons): no buffers, no params (the
window structure is the pattern's shape: constants let Triton strength-reduce // and %).
"""
from __future__ import annotations

import itertools
import math

import torch

from ..compiler.evaluate import evaluate, token_mask
from ..compiler.layout import Layout, axis_ints, canvas_dims, default_layout
from ..dsl.pattern import Pattern


def _bools(value, ndim: int, what: str) -> tuple[bool, ...]:
    items = (value,) * ndim if isinstance(value, bool) else value
    try:
        items = tuple(items)
    except TypeError:
        raise ValueError(f"{what} must be a bool or a tuple of {ndim} bools, got {value!r}") from None
    if len(items) != ndim or not all(isinstance(v, bool) for v in items):
        raise ValueError(f"{what} must be a bool or a tuple of {ndim} bools (one per canvas dim), got {value!r}")
    return items


def axis_coord(idx, dims: tuple[int, ...], axis: int):
    """Row-major coordinate of token `idx` (traced) along `axis` of a canvas of `dims`:
    (idx // prod(dims[axis+1:])) % dims[axis], without the // for the last axis and the % for the
    first (idx < prod(dims) there)."""
    stride = math.prod(dims[axis + 1:])
    x = idx // stride if stride > 1 else idx
    return x % dims[axis] if axis > 0 else x


def axis_window(x, y, n: int, k: int, d: int = 1, s: int = 1, causal: bool = False):
    """Whether key coordinate y is in the window of query coordinate x along an axis of n cells
    (the rule of the module docstring); None when it always is."""
    conds = []
    if d > 1:
        conds.append(x % d == y % d)
        j, i = x // d, y // d
        last = n // d - 1 if n % d == 0 else (n - 1 - x % d) // d  # L - 1 of x's sub-grid
    else:
        j, i, last = x, y, n - 1
    full = k * d == n  # the window is the whole sub-grid
    if causal:
        conds.append(y <= x)  # i <= j (same sub-grid)
        if not full:
            g = j if s == 1 else ((j // s) * s + s - 1).minimum(last)
            conds.append(g - i <= k - 1)
    elif not full:
        left = k // 2
        right = k - 1 - left
        g = j if s == 1 else (j // s) * s + s // 2
        c = g.clamp(left, last - right)
        conds.append(abs(c - i) <= left if left == right else (c - i <= left) & (i - c <= right))
    return all_of(conds) if conds else None


def all_of(conds):
    """The conjunction of the non-None conditions (True when there are none)."""
    conds = [c for c in conds if c is not None]
    if not conds:
        return True
    out = conds[0]
    for c in conds[1:]:
        out = out & c
    return out


def neighborhood(canvas, kernel, dilation=1, stride=1, causal=False) -> Pattern:
    """NATTEN / GNA neighbourhood attention on a row-major 1-D, 2-D or 3-D canvas.

    canvas: n, (rows, cols) or (frames, rows, cols); kernel, dilation, stride: an int for every
    axis or a tuple (one per axis); causal: a bool or a tuple of bools. Raises ValueError unless
    1 <= kernel, kernel * dilation <= canvas (NATTEN's rule, which also makes kernel <= canvas)
    and 1 <= stride <= kernel on every axis. Even kernels are allowed (k // 2 keys before the
    centre, k // 2 - 1 after, as NATTEN >= 0.20). When a brick divides every (dilation class of an)
    axis, the kernels run in the layout `_brick_layout` picks (the brick leaving the fewest tiles
    for this kernel), and Q_LEN and KV_LEN must then be prod(canvas).
    """
    dims = canvas_dims(canvas)
    nd = len(dims)
    ks = axis_ints(kernel, nd, "kernel")
    ds = axis_ints(dilation, nd, "dilation")
    ss = axis_ints(stride, nd, "stride")
    cs = _bools(causal, nd, "causal")
    for a, (n, k, d, s) in enumerate(zip(dims, ks, ds, ss)):
        if k * d > n:
            raise ValueError(f"kernel {ks} x dilation {ds} must fit the canvas {dims}: on axis {a} "
                             f"{k} * {d} > {n} (NATTEN's rule: every dilated sub-grid holds a full window)")
        if s > k:
            raise ValueError(f"stride {ss} must not exceed the kernel {ks}: on axis {a} {s} > {k}")

    def mask(b, h, q, kv):
        return all_of(axis_window(axis_coord(q, dims, a), axis_coord(kv, dims, a), dims[a], ks[a], ds[a],
                                  ss[a], cs[a]) for a in range(nd))

    # the kernels run in a brick layout when one divides the canvas (compiler/layout.py): tiles
    # then cover compact neighbourhoods instead of strips of rows; results are unchanged
    return Pattern(mask, name="neighborhood").with_layout(_brick_layout(dims, ks, ds, ss, cs))


BRICK_TOKENS = 128  # a brick is one 128-row query tile; smaller tiles are its leading boxes

# the tiles (BLOCK_M, BLOCK_N) bricks are compared at: 64 x 32, what the forward and the dK/dV
# kernel (transposed) run for neighbourhoods on the H100 and H200 profiles, 64 x 64 (dQ), and
# 128 x 64 (the generic profile's forward)
BRICK_TILES = ((64, 32), (64, 64), (128, 64))

# A PARTIAL tile against a FULL one when bricks are compared: a constant (the H200 profile's
# Triton factor at 128 x 64 when the bricks were chosen, 2026-12-01), so a pattern's layout never
# depends on the machine that builds it nor moves when a profile is refitted
PARTIAL_WEIGHT = 3.0


def _brick_layout(dims, ks, ds, ss, cs) -> Layout | None:
    """The layout whose brick of BRICK_TOKENS tokens leaves this neighbourhood the fewest score
    pairs to compute, summed over BRICK_TILES (PARTIAL tiles weighted PARTIAL_WEIGHT; `tile_counts`).
    E.g. NATTEN's 5x9x9 on a 16x32x32 video: 8x4x4 bricks, tile efficiency 40% at 64 x 32 (23% at
    128 x 64), against 29% (24%) with the 4x4x8 bricks that 128 x 64 alone prefers. Falls back to
    compiler/layout.default_layout where no brick of that size divides the axes. An axis whose
    dilation does not divide it keeps its tokens in natural order within bricks (its residue
    classes are of unequal lengths, which a Layout cannot store one after another)."""
    ls = tuple(d if n % d == 0 else 1 for n, d in zip(dims, ds))  # the layout's dilation per axis
    windows = [_axis_pairs(*axis) for axis in zip(dims, ks, ds, ss, cs, ls)]
    sides = [[b for b in range(1, n // d + 1) if (n // d) % b == 0] for n, d in zip(dims, ls)]
    best, best_cost = None, None
    for brick in itertools.product(*sides):
        if math.prod(brick) != BRICK_TOKENS:
            continue
        counts = [tile_counts(windows, brick, bm, bn) for bm, bn in BRICK_TILES]
        if None in counts:
            continue
        cost = sum(bm * bn * (full + PARTIAL_WEIGHT * (live - full))
                   for (bm, bn), (live, full) in zip(BRICK_TILES, counts))
        if best_cost is None or cost < best_cost:
            best, best_cost = brick, cost
    if best is None or (len(dims) == 1 and ls == (1,)):
        return default_layout(dims, ls)
    return Layout(dims, best, ls)


def tile_box(brick: tuple[int, ...], tokens: int) -> tuple[int, ...] | None:
    """The box a tile of the first `tokens` positions of a brick covers (bricks are row-major), or
    None where those positions are no box (e.g. 64 tokens of a 3x8x8 brick)."""
    inner = 1
    for a in range(len(brick) - 1, -1, -1):
        if inner * brick[a] >= tokens:
            if tokens % inner or brick[a] % (tokens // inner):
                return None
            return (1,) * a + (tokens // inner,) + tuple(brick[a + 1:])
        inner *= brick[a]
    return None


def tile_counts(windows: list[torch.Tensor], brick: tuple[int, ...], block_m: int = BRICK_TOKENS,
                block_n: int = BRICK_TOKENS // 2) -> tuple[int, int] | None:
    """(live, FULL) tiles per (b, h) of a neighbourhood in the layout of `brick`, at tiles of
    block_m queries and block_n keys (None unless both are boxes: `tile_box`). windows[a]: bool
    [n, n], `_axis_pairs` of axis a. Tiles are boxes, so a tile pair is live (FULL) iff it is on
    every axis: the counts are products of per-axis counts of block pairs."""
    qbox, kvbox = tile_box(brick, block_m), tile_box(brick, block_n)
    if qbox is None or kvbox is None:
        return None
    live = full = 1
    for window, b, c in zip(windows, qbox, kvbox):
        n = window.shape[0]
        blocks = window.view(n // b, b, n // c, c)
        live *= int(blocks.any(3).any(1).sum())
        full *= int(blocks.all(3).all(1).sum())
    return live, full


def _axis_pairs(n: int, k: int, d: int, s: int, causal: bool, layout_d: int) -> torch.Tensor:
    """bool [n, n]: whether the key at layout coordinate j is in the window of the query at i along
    one axis (layout order: the layout_d residue classes one after another; layout_d divides n)."""
    pos = torch.arange(n)
    natural = (pos % (n // layout_d)) * layout_d + pos // (n // layout_d) if layout_d > 1 else pos
    rule = Pattern(lambda b, h, q, kv: all_of([axis_window(q, kv, n, k, d, s, causal)]))
    live = evaluate(token_mask(rule), {"q": natural[:, None], "kv": natural[None, :]}, {}, {})
    return live.bool().expand(n, n)
