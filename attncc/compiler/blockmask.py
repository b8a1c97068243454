"""BlockMask: every tile of the attention matrix classified EMPTY, PARTIAL or FULL, as lists.

`classify` works in two levels. Super-tiles of S x S tiles (S about the square root of the
grid's side) are analysed first with the interval analysis of intervals.py, in chunks of rows;
only the super-tiles it cannot decide as a whole are analysed tile by tile, and the few tiles
still undecided are evaluated exactly, element by element, a bounded number of pairs at a time.
Work and memory are O(tiles) at worst and far less when the mask's boundary is thin (causal at
1M tokens, 128-tiles: 16K super-tiles and 0.5M tiles analysed, not 67M); no dense Q x KV tensor
is ever built. `BlockMask` then holds the kernels' lists: per (b, h, q-tile) the FULL and
PARTIAL kv-tiles (forward), per (b, h, kv-tile) the q-tiles (backward).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..dsl import ir
from ..dsl.pattern import Pattern
from . import evaluate, intervals
from .domain import check_domain

EMPTY, PARTIAL, FULL, MIXED = 0, 1, 2, 3
_TILE_BUDGET = 1 << 22   # tiles analysed at once
_PAIR_BUDGET = 1 << 22   # (q, kv) pairs evaluated at once for undecided tiles
_ROW_BUDGET = 1 << 24    # list entries built at once


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockMask:
    """Per-tile classes of a mask as index lists, the form the kernels iterate.

    Tiles are BLOCK_M query rows x BLOCK_N key columns; QB = ceil(Q_LEN / BLOCK_M),
    KB = ceil(KV_LEN / BLOCK_N). B, H are the stored leading sizes (1 = broadcast).
    full_kv_num / partial_kv_num: int32 [B, H, QB]; full_kv_idx / partial_kv_idx: int32
    [B, H, QB, max(1, max count)], kv-tiles ascending, 0 past the count. full_q_* / partial_q_*:
    the same per kv-tile ([B, H, KB], [B, H, KB, *]) listing q-tiles, for the backward.
    *_contiguous: every row's list is first, first+1, ..., first+count-1.
    """

    def __init__(self, *, Q_LEN: int, KV_LEN: int, BLOCK_M: int, BLOCK_N: int,
                 full_kv_num, full_kv_idx, partial_kv_num, partial_kv_idx,
                 full_q_num, full_q_idx, partial_q_num, partial_q_idx,
                 full_kv_contiguous: bool, partial_kv_contiguous: bool,
                 mask_mod: Callable | None = None):
        """The *_idx may be tensors or functions making them: built on first use, then kept
        (a forward-only user never pays for the backward's lists)."""
        self.Q_LEN, self.KV_LEN, self.BLOCK_M, self.BLOCK_N = Q_LEN, KV_LEN, BLOCK_M, BLOCK_N
        self.B, self.H = full_kv_num.shape[0], full_kv_num.shape[1]
        self.full_kv_num, self.partial_kv_num = full_kv_num, partial_kv_num
        self.full_q_num, self.partial_q_num = full_q_num, partial_q_num
        self._idx = {"full_kv_idx": full_kv_idx, "partial_kv_idx": partial_kv_idx,
                     "full_q_idx": full_q_idx, "partial_q_idx": partial_q_idx}
        self.full_kv_contiguous, self.partial_kv_contiguous = full_kv_contiguous, partial_kv_contiguous
        self.mask_mod = mask_mod

    def _index(name: str):
        def get(self) -> torch.Tensor:
            value = self._idx[name]
            if callable(value):
                value = self._idx[name] = value()
            return value
        return property(get, doc=f"{name}: int32 index lists (see the class docstring)")

    full_kv_idx, partial_kv_idx = _index("full_kv_idx"), _index("partial_kv_idx")
    full_q_idx, partial_q_idx = _index("full_q_idx"), _index("partial_q_idx")
    del _index

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, QB, KB): the tile grid."""
        return (self.B, self.H, _cdiv(self.Q_LEN, self.BLOCK_M), _cdiv(self.KV_LEN, self.BLOCK_N))

    @property
    def device(self) -> torch.device:
        return self.full_kv_num.device

    @classmethod
    def from_classes(cls, classes, Q_LEN: int, KV_LEN: int, BLOCK_M: int, BLOCK_N: int,
                     mask_mod: Callable | None = None) -> "BlockMask":
        """From tile classes: int8 [B, H, QB, KB] (0 EMPTY, 1 PARTIAL, 2 FULL) or a TileClasses."""
        tc = classes if isinstance(classes, TileClasses) else TileClasses.from_dense(classes)
        if (tc.QB, tc.KB) != (_cdiv(Q_LEN, BLOCK_M), _cdiv(KV_LEN, BLOCK_N)):
            raise ValueError(f"classes has a {tc.QB}x{tc.KB} tile grid; Q_LEN={Q_LEN}, KV_LEN={KV_LEN} with "
                             f"tiles {BLOCK_M}x{BLOCK_N} need {_cdiv(Q_LEN, BLOCK_M)}x{_cdiv(KV_LEN, BLOCK_N)}")
        lists = {}
        for name, grid in (("kv", tc), ("q", tc.transpose())):
            for kind, value in (("full", FULL), ("partial", PARTIAL)):
                num, contiguous, idx = grid.lists(value)
                lists[f"{kind}_{name}_num"], lists[f"{kind}_{name}_idx"] = num, idx
                if name == "kv":
                    lists[f"{kind}_kv_contiguous"] = contiguous
        return cls(Q_LEN=Q_LEN, KV_LEN=KV_LEN, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, mask_mod=mask_mod, **lists)

    def to_dense(self) -> torch.Tensor:
        """int8 [B, H, QB, KB]: 0 EMPTY, 1 PARTIAL, 2 FULL."""
        B, H, QB, KB = self.shape
        dense = torch.zeros(B, H, QB, KB + 1, dtype=torch.int8, device=self.device)
        _paint(dense, self.partial_kv_num, self.partial_kv_idx, PARTIAL)
        _paint(dense, self.full_kv_num, self.full_kv_idx, FULL)
        return dense[..., :KB].contiguous()

    def sparsity(self) -> float:
        """Fraction of EMPTY tiles."""
        B, H, QB, KB = self.shape
        live = int(self.full_kv_num.sum()) + int(self.partial_kv_num.sum())
        return 1.0 - live / (B * H * QB * KB)

    def to_flex(self, mask_mod: Callable | None = None):
        """torch.nn.attention.flex_attention.BlockMask with the same tiles.

        `mask_mod` (flex signature) is applied in PARTIAL tiles; it defaults to the mask this
        block mask was built from.
        """
        from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask
        mask_mod = mask_mod or self.mask_mod
        if mask_mod is None and int(self.partial_kv_num.sum()) > 0:
            raise ValueError("to_flex(): this block mask has PARTIAL tiles but no mask_mod; pass mask_mod=")
        KB = self.shape[3]
        pad = lambda idx: F.pad(idx, (0, KB - idx.shape[-1])) if idx.shape[-1] < KB else idx
        return FlexBlockMask.from_kv_blocks(
            self.partial_kv_num, pad(self.partial_kv_idx), self.full_kv_num, pad(self.full_kv_idx),
            BLOCK_SIZE=(self.BLOCK_M, self.BLOCK_N), mask_mod=mask_mod, seq_lengths=(self.Q_LEN, self.KV_LEN))

    @classmethod
    def from_flex(cls, flex_block_mask) -> "BlockMask":
        """From a torch.nn.attention.flex_attention.BlockMask (its mask_mod is kept for to_flex)."""
        fb = flex_block_mask
        Q_LEN, KV_LEN = (int(x) for x in fb.seq_lengths)
        BM, BN = (int(x) for x in fb.BLOCK_SIZE)
        QB, KB = _cdiv(Q_LEN, BM), _cdiv(KV_LEN, BN)
        num = fb.kv_num_blocks
        dense = torch.zeros(*num.shape[:2], QB, KB + 1, dtype=torch.int8, device=num.device)
        for n, idx, value in ((fb.kv_num_blocks, fb.kv_indices, PARTIAL),
                              (fb.full_kv_num_blocks, fb.full_kv_indices, FULL)):
            if n is None:
                continue
            _paint(dense, n[..., :QB], idx[..., :QB, :].long().clamp(max=KB), value)
        return cls.from_classes(dense[..., :KB].contiguous(), Q_LEN, KV_LEN, BM, BN, fb.mask_mod)

    def ascii(self, b: int = 0, h: int = 0) -> str:
        """The tile map of one (b, h): '#' FULL, '+' PARTIAL, '.' EMPTY, one row per q-tile."""
        chars = ".+#"
        return "\n".join("".join(chars[c] for c in row) for row in self.to_dense()[b, h].tolist())

    def __repr__(self) -> str:
        B, H, QB, KB = self.shape
        full, partial = int(self.full_kv_num.sum()), int(self.partial_kv_num.sum())
        text = (f"BlockMask(B={B}, H={H}, Q_LEN={self.Q_LEN}, KV_LEN={self.KV_LEN}, "
                f"tiles {self.BLOCK_M}x{self.BLOCK_N}, grid {QB}x{KB}: {full} FULL, {partial} PARTIAL, "
                f"{B * H * QB * KB - full - partial} EMPTY ({self.sparsity():.1%} sparse); contiguous "
                f"lists: full={self.full_kv_contiguous}, partial={self.partial_kv_contiguous})")
        if QB <= 32 and KB <= 64:
            text += "\n" + self.ascii()
        return text


def _paint(dense: torch.Tensor, num: torch.Tensor, idx: torch.Tensor, value: int) -> None:
    """Write `value` into int8 dense [..., KB + 1] at the first num[...] columns listed in each row
    of idx [..., width]; the entries past the count land in the spare last column."""
    KB = dense.shape[-1] - 1
    ar = torch.arange(idx.shape[-1], device=idx.device)
    dense.scatter_(-1, torch.where(ar < num[..., None], idx, KB).long(), value)


class TileClasses:
    """Tile classes in two levels: super-tiles of S x S tiles, and the tiles of the mixed ones.

    coarse: int8 [B, H, QI, KJ] (QI = ceil(QB / S)): EMPTY, PARTIAL or FULL for the whole
    super-tile, or MIXED; coords: int64 [P, 4] (b, h, I, J) of the MIXED ones; fine: int8
    [P, S, S] their tiles' classes (EMPTY past the grid's edge).
    """

    def __init__(self, coarse, coords, fine, S: int, QB: int, KB: int):
        self.coarse, self.coords, self.fine, self.S, self.QB, self.KB = coarse, coords, fine, S, QB, KB

    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> "TileClasses":
        empty = torch.empty(0, 4, dtype=torch.long, device=dense.device)
        return cls(dense, empty, dense.new_empty(0, 1, 1), 1, dense.shape[2], dense.shape[3])

    def first_not(self, value: int) -> tuple[int, int, int, int] | None:
        """(b, h, q-tile, kv-tile) of the first tile inside the grid whose class is not `value`."""
        S = self.S
        coarse = self.coarse.clone()
        coarse[tuple(self.coords.T)] = value  # mixed super-tiles: looked at tile by tile below
        other = (coarse != value).nonzero()
        if other.shape[0]:
            b, h, i, j = other[0].tolist()
            return b, h, i * S, j * S
        s = torch.arange(S, device=self.fine.device)
        inside = ((self.coords[:, 2:3] * S + s < self.QB)[:, :, None]
                  & (self.coords[:, 3:4] * S + s < self.KB)[:, None, :])
        other = ((self.fine != value) & inside).nonzero()
        if not other.shape[0]:
            return None
        p, i, j = other[0].tolist()
        b, h, I, J = self.coords[p].tolist()
        return b, h, I * S + i, J * S + j

    def transpose(self) -> "TileClasses":
        return TileClasses(self.coarse.transpose(-1, -2), self.coords[:, [0, 1, 3, 2]],
                           self.fine.transpose(-1, -2), self.S, self.KB, self.QB)

    def dense(self) -> torch.Tensor:
        """int8 [B, H, QB, KB]."""
        B, H, QI, KJ = self.coarse.shape
        S = self.S
        grid = self.coarse[:, :, :, None, :, None].expand(B, H, QI, S, KJ, S).clamp(max=FULL).contiguous()
        b, h, i, j = self.coords.T
        grid[b, h, i, :, j, :] = self.fine
        return grid.view(B, H, QI * S, KJ * S)[:, :, :self.QB, :self.KB]

    def lists(self, value: int) -> tuple[torch.Tensor, bool, Callable[[], torch.Tensor]]:
        """Per row (b, h, q-tile) the positions of `value`: num int32 [B, H, QB], whether every
        row is contiguous, and a function building idx int32 [B, H, QB, max(1, max num)]
        (ascending, 0 past num). Counts are O(super-tiles + mixed tiles); idx is O(its size)."""
        B, H, QI, KJ = self.coarse.shape
        S, QB, KB, dev = self.S, self.QB, self.KB, self.coarse.device
        col0 = torch.arange(KJ, device=dev) * S
        width = torch.clamp(KB - col0, max=S)
        hit = self.coarse == value
        num = (hit * width).sum(-1)
        first = torch.where(hit, col0, KB).amin(-1)
        last = torch.where(hit, col0 + width - 1, -1).amax(-1)
        num, first, last = (x.repeat_interleave(S, dim=2).reshape(-1) for x in (num, first, last))
        if self.coords.shape[0]:
            b, h, i, j = self.coords.T
            rows = ((((b * H + h) * QI + i) * S)[:, None] + torch.arange(S, device=dev)).flatten()
            fhit = self.fine == value
            k = torch.arange(S, device=dev)
            num.scatter_add_(0, rows, fhit.sum(-1).flatten())
            first.scatter_reduce_(0, rows, (torch.where(fhit, k, KB).amin(-1) + (j * S)[:, None]).flatten(), "amin")
            last.scatter_reduce_(0, rows, (torch.where(fhit, k, -KB - S).amax(-1) + (j * S)[:, None]).flatten(), "amax")
        num, first, last = (x.view(B, H, QI * S)[:, :, :QB] for x in (num, first, last))
        contiguous = (num == 0) | (last - first + 1 == num)
        num = num.int()
        return num, bool(contiguous.all()), lambda: self._indices(value, num, first.int(), contiguous)

    def live_between(self, row_group: torch.Tensor, col_group: torch.Tensor, R: int, C: int) -> torch.Tensor:
        """float64 [R, C]: live (PARTIAL or FULL) tiles, summed over the stored (b, h), whose
        q-tile is in row group r and kv-tile in column group c; row_group int64 [QB] (values < R),
        col_group int64 [KB] (< C). O(super-tiles + mixed tiles): the grid is never expanded."""
        S, dev = self.S, self.coarse.device
        QI, KJ = self.coarse.shape[2:]

        def members(groups: torch.Tensor, n: int, blocks: int, width: int) -> torch.Tensor:
            """float64 [blocks, S, width + 1]: one-hot group of each tile of each super-block
            (tiles past the grid in the spare last group)."""
            padded = torch.full((blocks * S,), width, dtype=torch.long, device=dev)
            padded[:n] = groups.to(dev)
            return F.one_hot(padded, width + 1).double().view(blocks, S, width + 1)

        rows, cols = members(row_group, self.QB, QI, R), members(col_group, self.KB, KJ, C)
        live = ((self.coarse == PARTIAL) | (self.coarse == FULL)).double().sum((0, 1))  # [QI, KJ]
        total = rows.sum(1).T @ live @ cols.sum(1)
        if self.coords.shape[0]:
            _, _, I, J = self.coords.T
            fine = ((self.fine == PARTIAL) | (self.fine == FULL)).double()
            total += torch.einsum("psr,pst,ptc->rc", rows[I], fine, cols[J])
        return total[:R, :C]

    def _indices(self, value: int, num: torch.Tensor, first: torch.Tensor, contiguous: torch.Tensor) -> torch.Tensor:
        """idx int32 [B, H, QB, max(1, max num)]: first + j on contiguous rows, explicit elsewhere."""
        B, H, QB = num.shape
        width = max(1, int(num.max()))
        ar = torch.arange(width, device=num.device, dtype=torch.int32)
        idx = torch.empty(B, H, QB, width, dtype=torch.int32, device=num.device)
        step = max(1, _ROW_BUDGET // (B * H * width))
        for r0 in range(0, QB, step):
            sl = (slice(None), slice(None), slice(r0, r0 + step))
            n, f = num[sl].unsqueeze(-1), first[sl].unsqueeze(-1)
            torch.add(f, ar, out=idx[sl]).masked_fill_(ar >= n, 0)
        scattered = (~contiguous).nonzero()
        if scattered.numel():
            rows, cols = self._positions(scattered, value)
            counts = num[tuple(scattered.T)].long()
            rank = torch.arange(rows.numel(), device=num.device) - (torch.cumsum(counts, 0) - counts)[rows]
            idx[(*scattered[rows].T, rank)] = cols.int()
        return idx

    def _positions(self, rows: torch.Tensor, value: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every (row, column) holding `value` in the rows [n, 3] (b, h, q-tile), sorted.

        Returns (position in `rows`, column) int64 [m] each; O(n * KJ + m) work.
        """
        S, KB, dev = self.S, self.KB, self.coarse.device
        b, h, r = rows.T
        i, within = r // S, r % S
        KJ = self.coarse.shape[3]
        k = torch.arange(S, device=dev)
        ri, J = (self.coarse[b, h, i] == value).nonzero(as_tuple=True)
        cols = J[:, None] * S + k
        keep = cols < KB
        entries = [(ri[:, None].expand_as(cols)[keep], cols[keep])]
        if self.coords.shape[0]:
            mixed = torch.full(self.coarse.shape, -1, dtype=torch.long, device=dev)
            mixed[tuple(self.coords.T)] = torch.arange(self.coords.shape[0], device=dev)
            ri, J = (mixed[b, h, i] >= 0).nonzero(as_tuple=True)
            line = self.fine[mixed[b[ri], h[ri], i[ri], J], within[ri]] == value
            m, kk = line.nonzero(as_tuple=True)
            entries.append((ri[m], J[m] * S + kk))
        ri = torch.cat([e[0] for e in entries])
        cols = torch.cat([e[1] for e in entries])
        order = torch.argsort(ri * (KJ * S) + cols)
        return ri[order], cols[order]


# ----------------------------------------------------------------------------------------------
# Classification.

def classify(pattern: Pattern, B: int, H: int, Q_LEN: int, KV_LEN: int, BLOCK_M: int, BLOCK_N: int,
             device=None, refine: bool = True, super_tile: int | None = None,
             clamp_loads: bool = False) -> TileClasses:
    """The tile classes of the pattern's token mask (score mods ignored), leading sizes B', H'.

    B' = B if the mask reads b else 1 (likewise H'). Super-tiles of S x S tiles are analysed
    first (S from the grid's size unless `super_tile` is given); only the undecided ones are
    analysed tile by tile. With refine=False, tiles the analysis leaves undecided stay PARTIAL
    (sound, maybe imprecise) instead of being evaluated element by element. The caller has run
    the domain check (domain.py) on the mask, or asks for `clamp_loads` (the domain check's own
    probes): buffer indices are then clamped into the buffers, in analysis and evaluation alike.
    """
    pattern.require_bound()
    node = evaluate.token_mask(pattern)
    used = ir.free_vars(node)
    Bs, Hs = (B if "b" in used else 1), (H if "h" in used else 1)
    QB, KB = _cdiv(Q_LEN, BLOCK_M), _cdiv(KV_LEN, BLOCK_N)
    S = super_tile or _super_tile(QB, KB)
    ctx = _Context(node, pattern.params, {k: t.to(device) for k, t in pattern.buffers.items()},
                   Q_LEN, KV_LEN, BLOCK_M, BLOCK_N, device, refine, clamp_loads)
    f64 = dict(dtype=torch.float64, device=device)
    QI, KJ = _cdiv(QB, S), _cdiv(KB, S)
    i = torch.arange(QI, **f64) * (S * BLOCK_M)
    j = torch.arange(KJ, **f64).view(1, 1, 1, KJ) * (S * BLOCK_N)
    b = torch.arange(Bs, **f64).view(Bs, 1, 1, 1)
    h = torch.arange(Hs, **f64).view(1, Hs, 1, 1)
    coarse = torch.empty(Bs, Hs, QI, KJ, dtype=torch.int8, device=device)
    step = max(1, _TILE_BUDGET // (Bs * Hs * KJ))
    for r0 in range(0, QI, step):
        q0 = i[r0:r0 + step].view(1, 1, -1, 1)
        box = ctx.box(q0, q0 + S * BLOCK_M, j, j + S * BLOCK_N, b, h)
        if S == 1:
            shape = (Bs, Hs, q0.shape[2], KJ)
            coarse[:, :, r0:r0 + step] = ctx.fine_classes(box, shape, _grid_coords(shape, r0))
        else:
            t, f, _ = intervals.decide(intervals.analyse(node, box), device)
            coarse[:, :, r0:r0 + step] = torch.where(t, FULL, torch.where(f, EMPTY, MIXED))
    coords = (coarse == MIXED).nonzero()
    fine = torch.empty(coords.shape[0], S, S, dtype=torch.int8, device=device)
    s = torch.arange(S, device=device, dtype=torch.float64)
    step = max(1, _TILE_BUDGET // (S * S))
    for p0 in range(0, coords.shape[0], step):
        c = coords[p0:p0 + step]
        qt = (c[:, 2:3] * S + s).clamp(max=QB - 1)
        kt = (c[:, 3:4] * S + s).clamp(max=KB - 1)
        box = ctx.box((qt * BLOCK_M)[:, :, None], ((qt + 1) * BLOCK_M)[:, :, None],
                      (kt * BLOCK_N)[:, None, :], ((kt + 1) * BLOCK_N)[:, None, :],
                      c[:, 0, None, None].double(), c[:, 1, None, None].double())
        cls = ctx.fine_classes(box, (c.shape[0], S, S), _super_coords(c, S))
        outside = (c[:, 2:3] * S + s >= QB)[:, :, None] | (c[:, 3:4] * S + s >= KB)[:, None, :]
        fine[p0:p0 + step] = cls.masked_fill(outside, EMPTY)
    return TileClasses(coarse, coords, fine, S, QB, KB)


def _super_tile(QB: int, KB: int) -> int:
    """Tiles per super-tile side: about the square root of the grid's side, 1 for small grids."""
    side = max(QB, KB)
    if QB * KB <= 1 << 12:
        return 1
    return min(64, 1 << (side.bit_length() // 2))


def _grid_coords(shape: tuple, r0: int):
    """flat position in a [B, H, R, K] chunk of rows starting at q-tile r0 -> (b, h, q-tile, kv-tile)."""
    _, H, R, K = shape

    def at(flat: torch.Tensor) -> torch.Tensor:
        k, rest = flat % K, flat // K
        r, rest = rest % R, rest // R
        return torch.stack([rest // H, rest % H, r + r0, k], 1)
    return at


def _super_coords(c: torch.Tensor, S: int):
    """flat position in [P, S, S] tiles of super-tiles c [P, 4] -> (b, h, q-tile, kv-tile)."""
    def at(flat: torch.Tensor) -> torch.Tensor:
        k, rest = flat % S, flat // S
        i, p = rest % S, rest // S
        return torch.stack([c[p, 0], c[p, 1], c[p, 2] * S + i, c[p, 3] * S + k], 1)
    return at


class _Context:
    """What classifying one pattern needs: the token mask, params, buffers, sizes, range tables."""

    def __init__(self, node, params, buffers, Q_LEN, KV_LEN, BM, BN, device, refine, clamp_loads):
        self.node, self.params, self.buffers = node, params, buffers
        self.Q_LEN, self.KV_LEN, self.BM, self.BN, self.device, self.refine = Q_LEN, KV_LEN, BM, BN, device, refine
        self.clamp_loads = clamp_loads
        self.tables: dict = {}

    def box(self, q0, q1, k0, k1, b, h) -> intervals.Box:
        """Tiles [q0, q1) x [k0, k1) (float64, broadcastable), clipped to the lengths."""
        return intervals.Box(q0, q1.clamp(max=self.Q_LEN) - 1, k0, k1.clamp(max=self.KV_LEN) - 1,
                             b, h, self.params, self.buffers, self.tables)

    def fine_classes(self, box: intervals.Box, shape: tuple, coords_of) -> torch.Tensor:
        """int8 `shape` classes of the box's tiles; undecided ones evaluated exactly.

        coords_of maps flat positions in `shape` to (b, h, q-tile, kv-tile) [T, 4].
        """
        t, f, todo = intervals.decide(intervals.analyse(self.node, box), self.device)
        cls = ((~f).to(torch.int8) + t.to(torch.int8)).expand(shape)
        if self.refine and todo is not None and bool(todo.any()):
            cls = cls.contiguous()
            flat = todo.expand(shape).flatten().nonzero().flatten()
            cls.view(-1)[flat] = _evaluate_tiles(self, coords_of(flat))
        return cls


def _evaluate_tiles(ctx: _Context, coords: torch.Tensor) -> torch.Tensor:
    """int8 [T] exact classes of the tiles coords [T, 4] = (b, h, q-tile, kv-tile), by evaluation."""
    BM, BN, device = ctx.BM, ctx.BN, ctx.device
    out = torch.empty(coords.shape[0], dtype=torch.int8, device=device)
    i = torch.arange(BM, device=device)
    j = torch.arange(BN, device=device)
    step = max(1, _PAIR_BUDGET // (BM * BN))
    for t0 in range(0, coords.shape[0], step):
        c = coords[t0:t0 + step].long()
        T = c.shape[0]
        q = c[:, 2:3] * BM + i
        kv = c[:, 3:4] * BN + j
        valid = (q < ctx.Q_LEN)[:, :, None] & (kv < ctx.KV_LEN)[:, None, :]
        env = {"b": c[:, 0].view(T, 1, 1), "h": c[:, 1].view(T, 1, 1),
               "q": q.clamp(max=ctx.Q_LEN - 1).view(T, BM, 1),
               "kv": kv.clamp(max=ctx.KV_LEN - 1).view(T, 1, BN)}
        live = evaluate.evaluate(ctx.node, env, ctx.params, ctx.buffers, clamp_loads=ctx.clamp_loads)
        live = live.bool().expand(T, BM, BN)
        full = (live | ~valid).flatten(1).all(1)
        some = (live & valid).flatten(1).any(1)
        out[t0:t0 + T] = some.to(torch.int8) + full.to(torch.int8)
    return out


def build_block_mask(pattern: Pattern, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int,
                     BLOCK_M: int = 128, BLOCK_N: int = 128, device=None) -> BlockMask:
    """Classify every BLOCK_M x BLOCK_N tile of `pattern` (current params and buffers) into a BlockMask.

    B / H may be None (broadcast) when the mask and block predicate ignore b / h. The stored
    leading sizes are 1 wherever the mask ignores b or h. Raises PatternError when the mask is not
    defined everywhere (domain.py: a buffer index leaving its buffer, a division by zero, ...).
    """
    if not isinstance(pattern, Pattern):
        raise ValueError(f"pattern must be an attncc.Pattern, got {type(pattern).__name__}")
    used = ir.free_vars(evaluate.token_mask(pattern))
    B, H = evaluate.check_size("B", B, "b" in used), evaluate.check_size("H", H, "h" in used)
    Q_LEN, KV_LEN = evaluate.check_size("Q_LEN", Q_LEN), evaluate.check_size("KV_LEN", KV_LEN)
    BLOCK_M, BLOCK_N = evaluate.check_size("BLOCK_M", BLOCK_M), evaluate.check_size("BLOCK_N", BLOCK_N)
    if device is None:
        device = next((t.device for t in pattern.buffers.values() if t is not None), torch.device("cpu"))
    mask = evaluate.token_mask(pattern)
    check_domain(pattern, (mask,), B if "b" in used else 1, H if "h" in used else 1, Q_LEN, KV_LEN, device)
    classes = classify(pattern, B, H, Q_LEN, KV_LEN, BLOCK_M, BLOCK_N, device)
    mask_mod = evaluate.as_flex_mods(pattern)[0]
    return BlockMask.from_classes(classes, Q_LEN, KV_LEN, BLOCK_M, BLOCK_N, mask_mod)
