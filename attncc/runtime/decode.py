"""The split-KV decode path: a few queries per sequence (Q_LEN <= 64) against a long KV cache read
in place, paged, packed or dense (templates/decode.py.tmpl; runtime/choices.choose_decode says when).
A packed call (cu_seqlens_q / cu_seqlens_k) reads its k, v as a paged cache whose pages start at
any token (runtime/sequences.token_pages), its queries padded to the most of any sequence.

Positions: in a paged call query i of sequence b sits at kv_lens[b] - Q_LEN + i and its keys at
0..kv_lens[b]-1 (runtime/sequences.py); in a dense call the indices are 0..Q_LEN-1 and
0..KV_LEN-1, as everywhere. The kernel evaluates the pattern itself at those positions; its tile
lists come from the block map of the same call written over the dense indices
(sequences.paged_pattern: the lengths and offsets as buffers), one query tile of Q_LEN rows per
(b, h), merged over the query heads of each kv head: a tile is FULL only if FULL for all of
them, EMPTY only if EMPTY for all. Tiles at or past a sequence's length are EMPTY (never read);
the one holding the length is PARTIAL. The metadata is cached per pattern value, shapes, tiles,
splits and the versions of page_table and kv_lens, so a repeated call (the next layer of the
same step) neither rebuilds it nor synchronises. A new kv_lens or page_table (the next step) is
checked again (one synchronisation) and reuses the lists while every length stays within the
DECODE_SPAN steps they were built for (DecodeMeta.serves: one more); a decode loop rebuilds them
(build_meta) once per DECODE_SPAN steps. Over an ac.KVCache, whose host lengths vouch for its
kv_lens and page_table (sequences.vouch), a step does not synchronise at all.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..compiler import cost
from ..compiler.blockmask import EMPTY, FULL, PARTIAL, BlockMask, build_block_mask
from ..compiler.codegen import TileConfig, kernel_roots
from ..compiler.domain import check_domain
from ..compiler.numerics import NumericPlan, numeric_plan
from ..dsl.pattern import Pattern
from ..dsl.trace import PatternError
from . import autograd, cache, choices, kernel
from .inputs import Shapes, check_kernel_head_dims, check_qkv, check_scale
from .sequences import check_paged, paged_pattern, query_offsets, query_rows, token_pages, vouched_lengths
from .tiles import TileLists

MAX_SPLITS = 65535  # the grid's second axis


@dataclass(frozen=True)
class DecodeMeta(TileLists):
    """What the decode kernel reads besides q, k, v.

    TileLists of each (sequence, kv head): counts int32 [B|1, Hkv|1], kv tiles [.., width].
    kv_len: int32 [B], each sequence's keys; span: int32 [B, 2] on the device, the lengths [from,
    to) the lists serve (paged and packed calls, whose queries are each sequence's last Q_LEN
    tokens: the kernel takes their positions from kv_len and gives NaN rows to a length outside
    its span, as a CUDA graph replayed past the lists' steps would bring; None: dense); max_len: the
    longest (the dense call's KV_LEN); splits: the kernel's S; live_tiles: the most FULL + PARTIAL
    tiles of any (sequence, kv head); block_mask: the per-(b, h) map the lists merge (one query
    tile of Q_LEN rows); buffers, params, plan: as in KernelMeta (runtime/kernel.py).
    lengths_from / lengths_to: int64 [B] on the CPU, the paged calls whose lengths lie between
    serve these lists (build_meta's span; None for a dense call). partial_tail (paged and packed
    calls): int32 [B|1, Hkv|1, width], the last PARTIAL tiles of each list (tail_tiles), among
    them every tile at or past a sequence's length that the list holds for the longer lengths it
    serves; the kernel drops those at or past its length, which hold none of its keys.
    """
    kv_len: torch.Tensor
    span: torch.Tensor | None
    max_len: int
    splits: int
    live_tiles: int
    block_mask: BlockMask
    buffers: dict
    params: torch.Tensor
    plan: NumericPlan
    lengths_from: torch.Tensor | None = None
    lengths_to: torch.Tensor | None = None
    partial_tail: torch.Tensor | None = None

    def serves(self, kv_lens: torch.Tensor, known: tuple[int, ...] | None = None) -> bool:
        """Whether these lists serve a paged call with lengths kv_lens (int [B]): each in
        [lengths_from, lengths_to); `known`: the same lengths on the host (else one
        synchronisation reads them)."""
        lens = torch.tensor(known) if known is not None else kv_lens.cpu().long()
        return bool(((lens >= self.lengths_from) & (lens < self.lengths_to)).all())

    def at(self, kv_lens: torch.Tensor) -> "DecodeMeta":
        """This metadata with the lengths of the call with kv_lens."""
        return replace(self, kv_len=kv_lens.contiguous())


def group_classes(bm: BlockMask, Hkv: int, KV_LEN: int) -> torch.Tensor:
    """int8 [B|1, Hkv|1, KB]: the per-(b, h) classes of bm (one query tile) merged over each kv
    head's query heads, the tile that holds KV_LEN (if ragged) at most PARTIAL."""
    classes = bm.to_dense()[:, :, 0]  # [B|1, H|1, KB]
    if classes.shape[1] > 1:
        heads = classes.unflatten(1, (Hkv, classes.shape[1] // Hkv))
        full, live = (heads == FULL).all(2), (heads != EMPTY).any(2)
        classes = torch.where(full, FULL, torch.where(live, PARTIAL, EMPTY)).to(torch.int8)
    if KV_LEN % bm.BLOCK_N:
        last = classes[..., -1]
        last.masked_fill_(last == FULL, PARTIAL)
    return classes


def tile_lists(classes: torch.Tensor, value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(num int32 [..], idx int32 [.., max(1, max num)]): the tiles of class `value`, ascending."""
    hit = classes == value
    num = hit.sum(-1, dtype=torch.int32)
    width = max(1, int(num.max()))
    first = torch.sort((~hit).to(torch.uint8), dim=-1, stable=True).indices[..., :width]  # hits, ascending
    slots = torch.arange(first.shape[-1], device=classes.device)
    return num.contiguous(), torch.where(slots < num[..., None], first, 0).int().contiguous()


def tail_tiles(partial_num: torch.Tensor, partial_idx: torch.Tensor, lo: torch.Tensor, BLOCK_N: int,
               span: int) -> torch.Tensor:
    """DecodeMeta.partial_tail of lists (partial_num int32 [B|1, Hkv|1], partial_idx [.., width])
    serving lengths from lo (int64 [B]) up to lo + span - 1: the last entries of each list, -1 where
    it has fewer. As wide as the most tiles at or past lo that a span can add (they end the
    ascending lists: keys lo .. lo + span - 2), a power of two: one width, so one compiled
    kernel, for every span of these tiles."""
    width = 1 << (max(1, -(-(span - 1) // BLOCK_N)) - 1).bit_length()
    slots = torch.arange(partial_idx.shape[-1], device=partial_idx.device)
    first_past = lo.to(partial_idx.device).view(-1, 1, 1) if partial_idx.shape[0] > 1 else lo.min().view(1, 1, 1)
    past = (slots < partial_num[..., None]) & (partial_idx.long() * BLOCK_N >= first_past)
    if past.numel() and int(past.sum(-1).max()) > width:
        raise RuntimeError(f"attncc internal error: span lists hold more than {width} tiles past their shortest "
                           "length")
    at = partial_num.long()[..., None] - width + torch.arange(width, device=partial_idx.device)
    return torch.where(at >= 0, partial_idx.gather(-1, at.clamp_min(0)), -1).int().contiguous()


DECODE_SPAN = 64  # decode steps one paged block map serves: each length may grow by up to 63


def build_meta(pattern: Pattern, s: Shapes, tiles: TileConfig, device: torch.device, splits: int | None,
               kv_lens: torch.Tensor | None, span: int = 1, capacity: int | None = None) -> DecodeMeta:
    """DecodeMeta for a dense call (kv_lens None) or a checked paged one with these lengths (s.KV
    the longest); splits None: cost.decode_splits decides.

    Paged, `span` > 1: the lists also serve every later call whose lengths grew by less than
    `span` (each at most `capacity`, the page table's tokens; an empty sequence's while it stays
    empty), so a decode loop rebuilds them once per `span` steps: a tile is FULL only where it is
    FULL for the queries of every such length at the keys below the current one, EMPTY only where
    it is EMPTY for all of them up to the longest; the kernel evaluates the mask and the real
    lengths in the PARTIAL tiles between. The positions of the whole span pass the domain check
    (else span 1: the exact lists of this call). kv_len is this call's."""
    from .calibrate import profile_for

    if kv_lens is None:
        kv_len = torch.full((s.B,), s.KV, dtype=torch.int32, device=device)
        bm = build_block_mask(pattern, s.B, s.Hq, s.Q, s.KV, s.Q, tiles.BLOCK_N, device)
        check_domain(pattern, (pattern.score,), s.B, s.Hq, s.Q, s.KV, device)
        classes = group_classes(bm, s.Hkv, s.KV)
        keys, lo, hi = s.KV, None, None
    else:
        kv_len = kv_lens.contiguous()
        lo = kv_len.long()
        bm, classes, keys, hi = _span_classes(pattern, s, tiles, lo, span, capacity, device)
    full_num, full_idx = tile_lists(classes, FULL)
    partial_num, partial_idx = tile_lists(classes, PARTIAL)
    live = int((full_num + partial_num).max())
    if splits is None:
        row_blocks = -(-s.group * s.Q // tiles.BLOCK_M)
        splits = cost.decode_splits(s.B * s.Hkv * row_blocks, live, tiles.BLOCK_N, profile_for(device))
    buffers = {n: t.to(device) for n, t in pattern.buffers.items()}
    # the kernel evaluates `pattern` at positions below `keys` (paged) or s.Q (dense)
    positions_q = keys if kv_lens is not None else s.Q
    plan = numeric_plan(kernel_roots(pattern), pattern.params, buffers, s.B, s.Hq, positions_q, keys, device)
    tail = None if lo is None else tail_tiles(partial_num, partial_idx, lo, tiles.BLOCK_N, span)
    span = None if lo is None else torch.stack((lo, hi), 1).to(torch.int32).contiguous()
    served = None if span is None else span.cpu().long()
    return DecodeMeta(**TileLists.fields(full_num, full_idx, partial_num, partial_idx), kv_len=kv_len, span=span,
                      max_len=s.KV, splits=splits, live_tiles=live, block_mask=bm, buffers=buffers,
                      params=kernel.param_values(pattern.params, device), plan=plan,
                      lengths_from=None if served is None else served[:, 0],
                      lengths_to=None if served is None else served[:, 1], partial_tail=tail)


def _span_classes(pattern: Pattern, s: Shapes, tiles: TileConfig, lo: torch.Tensor, span: int,
                  capacity: int | None, device: torch.device):
    """(block map, merged classes int8 [B|1, Hkv|1, KB], keys the map spans, hi int64 [B]) of a
    paged call whose lengths lie in [lo, hi) (build_meta); span 1 where the span's positions are
    outside the pattern's domain (a buffer too short for them: the domain check says so)."""
    if span > 1:
        grown = torch.minimum(lo + span - 1, torch.full_like(lo, capacity if capacity is not None else 1 << 62))
        top = torch.where(lo > 0, torch.maximum(grown, lo), lo)  # the longest length of the span
        rows = s.Q + int((top - lo).max())  # the queries of every length in the span, from lo's first
        keys = max(1, int(top.max()))
        lowest = paged_pattern(pattern, lo, s.Q)  # queries from lo - Q_LEN over `rows`, keys below lo
        highest = paged_pattern(pattern, top, rows, query_offsets(lo, s.Q))  # the same queries, keys below top
        try:
            check_domain(highest, (highest.score,), s.B, s.Hq, rows, keys, device)
            full = build_block_mask(lowest, s.B, s.Hq, rows, keys, rows, tiles.BLOCK_N, device)
            bm = build_block_mask(highest, s.B, s.Hq, rows, keys, rows, tiles.BLOCK_N, device)
        except PatternError:
            span = 1
    if span == 1:
        positions = paged_pattern(pattern, lo, s.Q)
        bm = build_block_mask(positions, s.B, s.Hq, s.Q, s.KV, s.Q, tiles.BLOCK_N, device)
        check_domain(positions, (positions.score,), s.B, s.Hq, s.Q, s.KV, device)
        return bm, group_classes(bm, s.Hkv, s.KV), s.KV, lo + 1
    full, empty = group_classes(full, s.Hkv, keys), group_classes(bm, s.Hkv, keys)
    classes = torch.where(full == FULL, FULL, torch.where(empty == EMPTY, EMPTY, PARTIAL)).to(torch.int8)
    return bm, classes, keys, top + 1


DECODE_CACHE = cache.LRU(64)  # call key -> (Shapes, DecodeMeta, table, lengths, padding, the tensors the key names)


PACKED_VERDICTS = cache.LRU(16)  # cu_seqlens by version, q/k/v shapes -> (cu_q, cu_k, Q_LEN or None, the tensors)


def packed_verdict(q, k, v, cu_seqlens_q, cu_seqlens_k) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """(cu_q, cu_k int64 [S + 1], Q_LEN) of a valid packed call (sequences.check_varlen, else its
    ValueError): Q_LEN is sequences.decode_queries' verdict, None where the decode kernel cannot
    read the call. Checked once per version of the cu_seqlens (a decode step's other layers: a
    lookup, no host synchronisation)."""
    from .sequences import check_varlen, decode_queries

    tensors = isinstance(cu_seqlens_q, torch.Tensor) and isinstance(cu_seqlens_k, torch.Tensor)
    key = (kernel.buffer_key(cu_seqlens_q), kernel.buffer_key(cu_seqlens_k)) + tuple(
        (tuple(t.shape), t.dtype, t.device) for t in (q, k, v)) if tensors else None
    hit = PACKED_VERDICTS.get(key) if tensors else None
    if hit is None:
        cu_q, cu_k = check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, v)
        hit = (cu_q, cu_k, decode_queries(cu_q, cu_k), cu_seqlens_q, cu_seqlens_k)  # the key names their ids
        if tensors:
            PACKED_VERDICTS.put(key, hit)
    return hit[:3]


def packed_queries(q, k, v, cu_seqlens_q, cu_seqlens_k) -> tuple[torch.Tensor, torch.Tensor, int]:
    """packed_verdict's (cu_q, cu_k, Q_LEN) where the decode kernel can read the call, else a
    ValueError saying why not."""
    cu_q, cu_k, Q_LEN = packed_verdict(q, k, v, cu_seqlens_q, cu_seqlens_k)
    if Q_LEN is None:
        raise ValueError("the decode kernel reads packed sequences with queries, each with 0 keys or at least "
                         "as many as the most queries of any; ac.attention runs the others on the dense kernels")
    return cu_q, cu_k, Q_LEN


def _check_splits(splits) -> int | None:
    if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int)
                               or not 1 <= splits <= MAX_SPLITS):
        raise ValueError(f"kernel_options['kv_splits'] must be an int from 1 to {MAX_SPLITS}, got {splits!r}")
    return splits


class DecodeKernel:
    """The split-KV decode kernel for one pattern: `.source`, `.config`, `.block_mask`, `__call__`.

    Built for q [B, Hq, Q_LEN, D] (Q_LEN <= 64) and either paged caches k, v [num_pages,
    page_size, Hkv, D|Dv] with page_table int32 [B, max_pages] and kv_lens int32 [B], or dense
    k, v [B, Hkv, KV_LEN, D|Dv], or S sequences packed (cu_seqlens_q, cu_seqlens_k int32 [S + 1]):
    q [1, Hq, total_q, D], k, v [1, Hkv, total_k, D|Dv], the queries padded to Q_LEN, the most of
    any sequence, each sequence having 0 keys or at least Q_LEN (packed_queries). kernel_options:
    kv_splits (default: cost.decode_splits), BLOCK_M, BLOCK_N, num_warps, num_stages
    (runtime/choices.choose_decode_tiles); the others apply to the fallback. Inference only: a
    call whose q, k, v or buffers require grad runs ac.attention's other path (the dense kernels,
    paged caches gathered), which has a backward. A pattern's token layout is not used: the
    kernel reads the keys in natural order.
    """

    def __init__(self, pattern: Pattern, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                 scale: float | None = None, kernel_options: dict | None = None,
                 page_table: torch.Tensor | None = None, kv_lens: torch.Tensor | None = None,
                 cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None):
        pattern.require_bound()
        if pattern.layout is not None:  # decode reads the keys in natural order (same results)
            pattern = pattern.with_layout(None)
        self.pattern, self.kernel_options = pattern, dict(kernel_options or {})
        options = dict(self.kernel_options)
        self.forced_splits = _check_splits(options.pop("kv_splits", None))
        options.pop("decode", None)
        options = choices.check_options(options)
        self.paged, self.packed = page_table is not None, cu_seqlens_q is not None or cu_seqlens_k is not None
        if any(t.dim() != 4 for t in (q, k, v)):
            raise ValueError(f"q, k, v must have 4 dims, got shapes {[tuple(t.shape) for t in (q, k, v)]}")
        check_kernel_head_dims(q.shape[-1], v.shape[-1])
        Q_LEN = packed_queries(q, k, v, cu_seqlens_q, cu_seqlens_k)[2] if self.packed else q.shape[2]
        group = max(1, q.shape[1] // max(1, k.shape[2] if self.paged else k.shape[1]))
        self.tiles = self._base_tiles = choices.choose_decode_tiles(group * Q_LEN, max(q.shape[-1], v.shape[-1]),
                                                                    q.device, options)
        self._tile_options = options
        self.scale = check_scale(scale, q.shape[-1])
        self.device, self.interpret = q.device, q.device.type != "cuda"
        call = (q, k, v, page_table, kv_lens, cu_seqlens_q, cu_seqlens_k)
        self._shapes, self._meta = self._entry(*call)[:2]
        if self._refit_tiles(self._meta):
            self._shapes, self._meta = self._entry(*call)[:2]
        self.module = self._module(self._meta)

    def _adopt(self, *call) -> None:
        """Make `call`'s lists at the current tiles, and their module, the kernel's own (after the
        tiles changed)."""
        self._shapes, self._meta = self._entry(*call)[:2]
        self.module = self._module(self._meta)

    def _refit_tiles(self, meta: DecodeMeta) -> bool:
        """Whether the tiles changed to fit the splits of lists `meta` (built with self.tiles):
        choices.decode_tiles_for_splits, asked again whenever new lists are built (a decode loop's
        lengths grow past the short splits), never after a resource refusal changed the tiles."""
        if self._base_tiles is None:
            return False
        split_keys = meta.live_tiles * self.tiles.BLOCK_N / meta.splits
        tiles = choices.decode_tiles_for_splits(self._base_tiles, split_keys, self._tile_options,
                                                shrunk=self.tiles != self._base_tiles)
        changed, self.tiles = tiles != self.tiles, tiles
        return changed

    def _lists(self, common: tuple, shapes: Shapes, q, k, v, page_table, kv_lens, known) -> DecodeMeta:
        """The span lists of a paged (or packed) call, reused from the cache while they serve its
        lengths (`known`: the lengths on the host, where vouched), else built."""
        # a packed call's total keys grow every step, and its table's width with them (token_pages);
        # its sequences and their queries (Q_LEN) are not in q's shape, which holds only their sum
        dims = (shapes.B, shapes.Q, k.shape[1], k.shape[3], v.shape[3]) if self.packed else (
            tuple(k.shape), tuple(v.shape), page_table.shape[1])
        span_key = common + ("span", dims)
        lists = DECODE_CACHE.get(span_key)
        if lists is None or not lists.serves(kv_lens, known):
            page_size = self.tiles.BLOCK_N if self.packed else k.shape[1]
            lists = build_meta(self.pattern, shapes, self.tiles, q.device, self.forced_splits, kv_lens,
                               DECODE_SPAN, page_table.shape[1] * page_size)
            DECODE_CACHE.put(span_key, lists)
        return lists.at(kv_lens)

    def _entry(self, q, k, v, page_table, kv_lens, cu_seqlens_q=None, cu_seqlens_k=None) -> tuple:
        """(Shapes, DecodeMeta, page table, kv_lens, padding, derived_from) for these inputs, from the
        cache: a miss checks them and builds (a packed call's table and lengths from its cu_seqlens by
        sequences.token_pages; its padding, where some sequence has fewer than Q_LEN queries: the
        packed row int64 [S, Q_LEN] each query slot reads and the slots int64 [total_q] that hold
        the queries, from sequences.query_rows; else None; derived_from: the cu_seqlens those came
        from, int32 [S + 1, 2], which the kernel compares with the call's; else None)."""
        mode = "packed" if self.packed else "paged" if self.paged else "dense"
        given = ("packed" if cu_seqlens_q is not None or cu_seqlens_k is not None else
                 "paged" if page_table is not None or kv_lens is not None else "dense")
        if given != mode or (mode == "paged" and (page_table is None or kv_lens is None)) \
                or (mode == "packed" and (cu_seqlens_q is None or cu_seqlens_k is None)):
            raise ValueError("this decode kernel was built for " + {
                "paged": "paged caches: pass page_table and kv_lens",
                "packed": "packed sequences: pass cu_seqlens_q and cu_seqlens_k",
                "dense": "dense k, v: no page_table or cu_seqlens"}[mode])
        if self.packed:
            inputs = (kernel.buffer_key(cu_seqlens_q), kernel.buffer_key(cu_seqlens_k), tuple(q.shape),
                      tuple(k.shape), tuple(v.shape))

            def build():  # new cu_seqlens (the next step): checked, lists reused while they serve
                cu_q, cu_k, Q_LEN = packed_queries(q, k, v, cu_seqlens_q, cu_seqlens_k)
                table, lens = token_pages(cu_k, self.tiles.BLOCK_N, DECODE_SPAN)
                shapes = Shapes(lens.numel(), q.shape[1], k.shape[1], Q_LEN, max(1, int(lens.max())), q.shape[3],
                                v.shape[3])
                meta = self._lists(common, shapes, q, k, v, table, lens, None)
                rows = query_rows(cu_q, Q_LEN)
                # padded: the packed row each slot reads (padding: any), and the slots holding queries
                pad = None if rows is None else (rows.clamp(min=0), (rows >= 0).flatten().nonzero().squeeze(1))
                # what the kernel compares with each call's cu_seqlens
                derived_from = torch.stack([cu_seqlens_q, cu_seqlens_k], 1).int().contiguous()
                # the key holds the cu_seqlens' ids: the entry keeps them alive
                return shapes, meta, table, lens, pad, derived_from, cu_seqlens_q, cu_seqlens_k
        elif self.paged:
            if not all(isinstance(t, torch.Tensor) for t in (q, k, v, page_table, kv_lens)):
                check_paged(q, k, v, page_table, kv_lens)  # raises, naming the argument
            inputs = (kernel.buffer_key(page_table), kernel.buffer_key(kv_lens), tuple(k.shape), tuple(v.shape))

            def build():  # new versions of the table or lengths (the next step): checked, lists reused
                shapes = check_paged(q, k, v, page_table, kv_lens)
                meta = self._lists(common, shapes, q, k, v, page_table, kv_lens,
                                   vouched_lengths(kv_lens, page_table, k.shape[0], k.shape[1]))
                return shapes, meta, page_table, kv_lens, None, None  # the key holds their ids
        else:
            shapes = check_qkv(q, k, v)
            inputs = (shapes,)

            def build():
                return shapes, build_meta(self.pattern, shapes, self.tiles, q.device, self.forced_splits, None), \
                    None, None, None, None
        common = kernel.pattern_key(self.pattern) + (tuple(q.shape), q.dtype, k.dtype, v.dtype, str(q.device),
                                                     self.tiles, self.forced_splits)
        key = common + inputs
        if q.device != self.device:
            raise ValueError(f"q is on {q.device}, but this kernel was compiled for {self.device}")
        hit = DECODE_CACHE.get(key)
        if hit is None:
            hit = build()
            DECODE_CACHE.put(key, hit)
        return hit[:6]

    def _module(self, meta: DecodeMeta):
        return kernel.kernel_module(self.pattern, self.tiles, meta.plan, interpret=self.interpret, kind="decode")

    @property
    def config(self) -> dict:
        """The backend and kernel ("decode"), its splits, tiles, and whether it reads pages (of a
        cache, or of packed sequences)."""
        t = self.tiles
        return {"backend": "triton", "kernel": "decode", "kv_splits": self._meta.splits, "paged": self.paged,
                "packed": self.packed, "BLOCK_M": t.BLOCK_M, "BLOCK_N": t.BLOCK_N, "num_warps": t.num_warps,
                "num_stages": t.num_stages}

    @property
    def source(self) -> str:
        """The generated source this kernel runs (templates/decode.py.tmpl filled in)."""
        return cache.source_of(self.module)

    @property
    def block_mask(self) -> BlockMask:
        """The per-(b, h) block map the kernel's lists came from: one query tile of Q_LEN rows (a
        paged call's: of the queries of every length the lists serve, keys below the longest)."""
        return self._meta.block_mask

    def __call__(self, q, k, v, *, page_table=None, kv_lens=None, cu_seqlens_q=None, cu_seqlens_k=None,
                 return_lse: bool = False):
        """out [B, Hq, Q_LEN, Dv] in q's dtype (and lse float32 [B, Hq, Q_LEN] when return_lse); a
        packed call's [1, Hq, total_q, Dv] and [1, Hq, total_q]."""
        return self.run(q, k, v, page_table, kv_lens, return_lse, cu_seqlens_q, cu_seqlens_k)

    def run(self, q, k, v, page_table, kv_lens, return_lse: bool, cu_seqlens_q=None, cu_seqlens_k=None):
        if autograd.needs_grad(self.pattern, q, k, v):  # decode is inference: the path with a backward
            from .api import attention  # (api imports this module)

            return attention(q, k, v, self.pattern, scale=self.scale, return_lse=return_lse,
                             kernel_options={**self.kernel_options, "decode": False},
                             page_table=page_table, kv_lens=kv_lens, cu_seqlens_q=cu_seqlens_q,
                             cu_seqlens_k=cu_seqlens_k)
        out, lse = self.forward(q, k, v, page_table, kv_lens, cu_seqlens_q, cu_seqlens_k)
        return (out, lse) if return_lse else out

    def forward(self, q, k, v, page_table=None, kv_lens=None, cu_seqlens_q=None, cu_seqlens_k=None):
        """(out [B, Hq, Q_LEN, Dv] in q's dtype, lse float32 [B, Hq, Q_LEN]), no autograd (packed:
        [1, Hq, total_q, Dv] and [1, Hq, total_q])."""
        qi, ki, vi = kernel.interpretable(self.interpret, q, k, v)
        call = (q, k, v, page_table, kv_lens, cu_seqlens_q, cu_seqlens_k)
        refit = True
        while True:
            shapes, meta, table, _, pad, derived_from = self._entry(*call)
            if meta is not self._meta and refit:  # other lists: the tiles may fit their splits better
                refit = False
                if self._refit_tiles(meta):
                    self._adopt(*call)
                    continue
            module = self.module if meta.plan.signature == self._meta.plan.signature else self._module(meta)
            if self.packed:  # [1, Hq, total_q, D] -> [S, Hq, Q_LEN, D]: a view, or padded (no synchronisation)
                qs = qi[0].unflatten(1, (shapes.B, shapes.Q)) if pad is None else qi[0][:, pad[0]]
                qs = qs.transpose(0, 1)
                extra = {"token_pages": self.tiles.BLOCK_N,
                         "cu_seqlens": (cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), derived_from)}
            else:
                qs, extra = qi, {}
            table = table.contiguous() if table is not None else None
            try:
                kernel.refuse_if_recorded(module)
                out, lse = kernel.launch(self.interpret, module.forward, qs, ki, vi, meta, self.scale, meta.buffers,
                                         table, **extra)
                break
            except Exception as e:  # noqa: BLE001 — only Triton's resource refusals are handled
                self.tiles = kernel.after_resource_refusal(e, self.tiles, choices.forced_tiles(self.kernel_options)[0],
                                                           module=module)[0]
                self._base_tiles = None  # the tiles that ran out of resources stay out: no refitting
                self._adopt(*call)
        if self.packed:  # back to the packed rows, in order (padding dropped)
            out, lse = out.transpose(0, 1).flatten(1, 2), lse.transpose(0, 1).flatten(1, 2)
            if pad is not None:
                out, lse = out.index_select(1, pad[1]), lse.index_select(1, pad[1])
            out, lse = out[None], lse[None]
        return out.to(q.dtype), lse

    def __repr__(self) -> str:
        return f"DecodeKernel({self.pattern!r}, {self.config})"
