"""Sliding Tile Attention (STA; Zhang et al., "Fast Video Generation with Sliding Tile Attention",
2025) for video DiTs, on a 2-D (rows, cols) or 3-D (frames, rows, cols) canvas.

The canvas is cut into tiles of `tile` cells (per axis; each canvas dim must be a multiple of its
tile dim), giving a grid of T = canvas // tile tiles per axis. A query tile attends to the
`kernel` tiles (per axis) around it, the window centre clamped inward so it is always full size:
along each axis, with query tile a and key tile c, live iff |clamp(a, k//2, T-1-k//2) - c| <= k//2
(STA's rule, neighbourhood attention over tiles). Kernels are odd, or the whole axis (k == T: all
tiles; STA's configurations use that, e.g. (5, 6, 10) on a 5x6x10-tile grid).

Token order: row-major over the canvas in natural coordinates, token i of a 3-D canvas at
(i // (rows * cols), (i // cols) % rows, i % cols). STA's kernels instead store tokens tile by
tile (all the cells of tile 0, then tile 1, ...; tests/test_patterns.py::
test_sliding_tile_attention_2d writes that order); that is a permutation of this pattern's
tokens, left to a layout step. Here a token's tile along an axis is its coordinate // tile.

Text: with text_len > 0 the sequence is the prod(canvas) video tokens, then the text. As in STA
(HunyuanVideo-style MM-DiT), every query attends the first text_len text keys, and text queries
attend every video key and those text keys: mask = (kv < V and window) or ((q >= V or kv >= V)
and kv < V + text_len), V = prod(canvas). text_len is a param (STA pads the text to a fixed length
and passes the valid length: rebind it with `bind(text_len=...)` without recompiling); keys past
V + text_len (padding) are attended by nothing, padding queries attend like text ones. With
text_len = 0 the pattern is the video mask alone (no param) and Q_LEN = KV_LEN = prod(canvas).
"""
from __future__ import annotations

import math

from ..compiler.layout import Layout, axis_ints, canvas_dims
from ..dsl.pattern import Pattern
from ..dsl.trace import param
from .neighborhood import all_of, axis_window


def tile_coord(idx, dims: tuple[int, ...], tiles: tuple[int, ...], axis: int):
    """The tile of row-major token `idx` (traced) along `axis`: coordinate // tile, computed as
    (idx // (prod(dims[axis+1:]) * tile)) % (dims[axis] // tile) (the tile divides the dim)."""
    step = math.prod(dims[axis + 1:]) * tiles[axis]
    x = idx // step if step > 1 else idx
    return x % (dims[axis] // tiles[axis]) if axis > 0 else x


def sliding_tile(canvas, kernel, tile, text_len: int = 0) -> Pattern:
    """STA on a row-major 2-D or 3-D canvas; kernel in tiles per axis (int or tuple), tile in
    cells per axis (int or tuple); text_len text tokens after the video (a param when > 0).
    Without text the kernels store the tokens tile by tile (a Layout whose bricks are the tiles)."""
    dims = canvas_dims(canvas)
    nd = len(dims)
    if nd not in (2, 3):
        raise ValueError(f"sliding_tile needs a 2-D (rows, cols) or 3-D (frames, rows, cols) canvas, got {canvas!r}")
    tiles = axis_ints(tile, nd, "tile")
    if any(n % t for n, t in zip(dims, tiles)):
        raise ValueError(f"every canvas dim must be a multiple of its tile dim, got canvas {dims} and tile {tiles}")
    grid = tuple(n // t for n, t in zip(dims, tiles))
    ks = axis_ints(kernel, nd, "kernel")
    for a, (k, g) in enumerate(zip(ks, grid)):
        if k > g:
            raise ValueError(f"kernel {ks} (in tiles) must fit the {grid} tile grid: on axis {a} {k} > {g}")
        if k % 2 == 0 and k != g:
            raise ValueError(f"kernel {ks}: an even kernel must be the whole axis (axis {a}: {k} of {g} tiles)")
    if isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < 0:
        raise ValueError(f"text_len must be an int >= 0, got {text_len!r}")
    video = math.prod(dims)

    def window(q, kv):
        return all_of(axis_window(tile_coord(q, dims, tiles, a), tile_coord(kv, dims, tiles, a), grid[a], ks[a])
                      for a in range(nd))

    if text_len == 0:
        # the kernels run tile by tile (one STA tile is one brick of compiler/layout.py)
        return Pattern(lambda b, h, q, kv: window(q, kv), name="sliding_tile").with_layout(Layout(dims, tiles))
    T = param("text_len", text_len)

    def mask(b, h, q, kv):
        return ((kv < video) & window(q, kv)) | (((q >= video) | (kv >= video)) & (kv < video + T))

    return Pattern(mask, name="sliding_tile")
