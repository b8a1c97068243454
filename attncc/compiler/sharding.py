"""ShardPlan: which tokens each rank owns in context-parallel attention, balanced by the block map.

The sequence is cut into chunks of `chunk` tokens (the last may be short). The pattern's tiles
of chunk x chunk are classified symbolically (blockmask.classify: O(tiles), never a dense mask),
giving each query chunk's live-tile work. The query chunks are then grouped into G contiguous
segments of equal length and the segments dealt out by LPT (heaviest first, each to the least
loaded rank), for G = W, 2W, 4W, ... chunks: the first G whose heaviest rank is within
`tolerance` of the mean wins, so ranks keep few contiguous runs (a sliding window stays in W
contiguous shards; causal gets zigzag, the LPT order of 2W segments; document masks as many
segments as their balance needs). Self-attention (Q_LEN == KV_LEN) shares one assignment for
queries and keys; for Q_LEN != KV_LEN the keys are split into W contiguous equal shards.
A pattern with a token layout (compiler/layout.py) is planned in the layout's kernel order, on
its mask there: chunks are runs of bricks (a 2-D neighbourhood's shards are compact regions, not
strips of rows); `shard` and `unshard` take and give natural order.

`work[r, s]`: the live tiles of rank r's queries against rank s's keys (summed over the stored
b, h); a zero means rank r never needs shard s. Every rank builds the same plan from the same
arguments (the construction is deterministic).
"""
from __future__ import annotations

import hashlib
import heapq

import torch

from ..dsl import ir
from ..dsl.pattern import Pattern
from . import evaluate
from .blockmask import FULL, PARTIAL, classify
from .domain import check_domain

_MIN_CHUNK, _MAX_CHUNK, _CHUNKS_PER_RANK = 16, 128, 8


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def default_chunk(Q_LEN: int, world_size: int) -> int:
    """128 tokens, halved (down to 16) until there are at least 8 chunks per rank."""
    chunk = _MAX_CHUNK
    while chunk > _MIN_CHUNK and _cdiv(Q_LEN, chunk) < _CHUNKS_PER_RANK * world_size:
        chunk //= 2
    return chunk


def lpt(work: torch.Tensor, ranks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(owner int64 [n], load float64 [ranks]): items dealt heaviest first (stable) to the least
    loaded rank (among equals the one holding fewest items, then the lowest-numbered)."""
    owner = torch.empty(work.numel(), dtype=torch.long)
    heap = [(0.0, 0, r) for r in range(ranks)]
    for i in torch.argsort(-work, stable=True).tolist():
        load, count, r = heap[0]
        owner[i] = r
        heapq.heapreplace(heap, (load + float(work[i]), count + 1, r))
    return owner, torch.zeros(ranks, dtype=torch.float64).index_add_(0, owner, work.double())


def imbalance(load: torch.Tensor) -> float:
    """max / mean of per-rank loads (1.0 when there is no work)."""
    mean = float(load.mean())
    return float(load.max()) / mean if mean > 0 else 1.0


def balanced_owner(chunk_work: torch.Tensor, ranks: int, tolerance: float) -> torch.Tensor:
    """int64 [n]: the owning rank of each of n chunks (module docstring: segments by LPT)."""
    n = chunk_work.numel()
    prefix = torch.cat([chunk_work.new_zeros(1), chunk_work.double().cumsum(0)])
    best = None
    G = ranks
    while True:
        G = min(G, n)
        bounds = torch.arange(G + 1) * n // G
        seg_owner, load = lpt(prefix[bounds[1:]] - prefix[bounds[:-1]], ranks)
        score = imbalance(load)
        if best is None or score < best[0]:
            best = (score, torch.repeat_interleave(seg_owner, bounds.diff()))
        if score <= tolerance or G == n:
            return _in_token_order(best[1], ranks)
        G *= 2


def _in_token_order(owner: torch.Tensor, ranks: int) -> torch.Tensor:
    """owner with the ranks renumbered so that rank r's first chunk comes before rank r + 1's
    (contiguous shards then lie in rank order)."""
    first = torch.full((ranks,), owner.numel()).scatter_reduce(0, owner, torch.arange(owner.numel()), "amin")
    return torch.argsort(torch.argsort(first))[owner]


def runs_of(owner: torch.Tensor, rank: int, chunk: int, length: int) -> tuple[tuple[int, int], ...]:
    """The token ranges [start, end) of the chunks `rank` owns, merged where adjacent."""
    mine = (owner == rank).int()
    edges = torch.diff(torch.cat([mine.new_zeros(1), mine, mine.new_zeros(1)]))
    starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
    return tuple((int(a) * chunk, min(int(b) * chunk, length)) for a, b in zip(starts, ends))


class ShardPlan:
    """Which query and key tokens each of `world_size` ranks owns (see the module docstring).

    pattern: the mask the plan balances (no block predicate; a token layout is planned in its
    kernel order); Q_LEN, KV_LEN: the full lengths; B, H: needed only when the mask reads b or h;
    chunk: tokens per shard unit (default `default_chunk`); tolerance: accepted max/mean
    live-tile load. Attributes: q_runs[r] / kv_runs[r], token ranges rank r owns (ascending, in
    the plan's order: natural, or the layout's kernel order); layout: the pattern's token layout
    or None; work float64 [W, W]; load float64 [W] (work.sum(1)); ring_steps (1 + the farthest
    ring distance r - s mod W at which rank r needs shard s).
    """

    def __init__(self, pattern: Pattern | None, Q_LEN: int, KV_LEN: int, world_size: int, *, B: int | None = None,
                 H: int | None = None, chunk: int | None = None, tolerance: float = 1.02, device=None):
        pattern = Pattern(name="full") if pattern is None else pattern
        if not isinstance(pattern, Pattern):
            raise ValueError(f"pattern must be an attncc.Pattern (None: full attention), got {type(pattern).__name__}")
        if pattern.has_block_mask:
            raise ValueError("context parallelism takes masks on q and kv: no block predicate (qb, kb: tiles of the "
                             "whole sequence, which the shards cut)")
        pattern.require_bound()
        W = evaluate.check_size("world_size", world_size)
        Q_LEN, KV_LEN = evaluate.check_size("Q_LEN", Q_LEN), evaluate.check_size("KV_LEN", KV_LEN)
        if pattern.layout is not None:
            pattern.layout.check(Q_LEN, KV_LEN)
        planned = pattern.kernel_pattern  # the mask in the order the plan deals out (a layout's kernel order)
        chunk = default_chunk(min(Q_LEN, KV_LEN), W) if chunk is None else evaluate.check_size("chunk", chunk)
        if not tolerance >= 1.0:
            raise ValueError(f"tolerance is a max/mean load ratio, at least 1.0; got {tolerance!r}")
        QB, KB = _cdiv(Q_LEN, chunk), _cdiv(KV_LEN, chunk)
        if min(QB, KB) < W:
            raise ValueError(f"Q_LEN={Q_LEN}, KV_LEN={KV_LEN} in chunks of {chunk} tokens give {min(QB, KB)} chunks, "
                             f"fewer than the {W} ranks; pass a smaller chunk (or use fewer ranks)")
        used = ir.free_vars(evaluate.token_mask(planned))
        Bs = evaluate.check_size("B", B, True) if "b" in used else 1
        Hs = evaluate.check_size("H", H, True) if "h" in used else 1
        device = device or next((t.device for t in pattern.buffers.values()), torch.device("cpu"))
        check_domain(planned, (evaluate.token_mask(planned),), Bs, Hs, Q_LEN, KV_LEN, device)
        tiles = classify(planned, Bs, Hs, Q_LEN, KV_LEN, chunk, chunk, device)
        chunk_work = sum(tiles.lists(c)[0].sum((0, 1)) for c in (FULL, PARTIAL)).double().cpu()
        q_owner = balanced_owner(chunk_work, W, tolerance)
        kv_owner = q_owner if Q_LEN == KV_LEN else torch.arange(KB) * W // KB
        self.pattern, self.Q_LEN, self.KV_LEN, self.world_size, self.chunk = pattern, Q_LEN, KV_LEN, W, chunk
        self.layout = pattern.layout
        # the versions of the buffers the mask read: an in-place write after this voids the plan's work
        self.mask_versions = {n: pattern.buffers[n]._version for n in ir.buffers_of(evaluate.token_mask(pattern))}
        self.B, self.H, self.tolerance = (B if "b" in used else None), (H if "h" in used else None), tolerance
        self.q_runs = tuple(runs_of(q_owner, r, chunk, Q_LEN) for r in range(W))
        self.kv_runs = tuple(runs_of(kv_owner, r, chunk, KV_LEN) for r in range(W))
        self.work = tiles.live_between(q_owner, kv_owner, W, W).cpu()
        self.load = self.work.sum(1)
        live = self.work > 0
        distance = (torch.arange(W)[:, None] - torch.arange(W)[None, :]) % W
        self.ring_steps = 1 + int(torch.where(live, distance, 0).max())
        # what every rank's plan must agree on (runtime/parallel._agree), as a nonzero int64
        summary = repr((Q_LEN, KV_LEN, W, chunk, self.B, self.H, repr(self.layout), self.q_runs, self.kv_runs,
                        self.work.tolist(), str(evaluate.token_mask(pattern))))
        self.fingerprint = int.from_bytes(hashlib.sha256(summary.encode()).digest()[:8], "little", signed=True) or 1
        self._positions: dict = {}
        self._rows: dict = {}

    def tokens(self, rank: int, kind: str = "q") -> int:
        """How many query (kind "q") or key ("kv") tokens `rank` owns."""
        return sum(b - a for a, b in self._runs(kind)[self._rank(rank)])

    def positions(self, rank: int, kind: str = "q", device=None) -> torch.Tensor:
        """int32 [tokens(rank, kind)]: the positions of rank's tokens, in shard order — natural
        positions, or a token layout's kernel positions (`layout.perm` maps them to natural ones).
        Made once per device and kept: the kernels' block-mask cache knows them by identity."""
        key = (self._rank(rank), kind, torch.device(device or "cpu"))
        if key not in self._positions:
            runs = self._runs(kind)[key[0]]
            self._positions[key] = torch.cat([torch.arange(a, b, dtype=torch.int32) for a, b in runs]).to(key[2])
        return self._positions[key]

    def shard(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        """x [B, H, N, D] (N = Q_LEN or KV_LEN, natural order) -> [B, H, tokens(rank), D], rank's
        tokens in shard order."""
        kind = self._kind_of(x)
        if self.layout is not None:  # rank's kernel positions, read at their natural rows
            return x.index_select(2, self._natural_rows(rank, kind, x.device))
        return torch.cat([x[:, :, a:b] for a, b in self._runs(kind)[self._rank(rank)]], 2)

    def _natural_rows(self, rank: int, kind: str, device) -> torch.Tensor:
        """int64 [tokens(rank, kind)]: the natural rows of rank's kernel positions (a token
        layout's plan), made once per device and kept (shard runs every layer, every step)."""
        key = (self._rank(rank), kind, torch.device(device))
        if key not in self._rows:
            self._rows[key] = self.layout.perm[self.positions(rank, kind).long()].to(device)
        return self._rows[key]

    def unshard(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """[B, H, N, D] in natural token order from every rank's shard (parts[r] from rank r); shards
        [B, H, n_r] (an LSE) give [B, H, N]."""
        if not isinstance(parts, (list, tuple)) or len(parts) != self.world_size:
            raise ValueError(f"unshard takes a list of the {self.world_size} ranks' shards, got "
                             f"{len(parts) if isinstance(parts, (list, tuple)) else type(parts).__name__}")
        if all(isinstance(p, torch.Tensor) and p.dim() == 3 for p in parts):
            return self.unshard([p[..., None] for p in parts])[..., 0]
        lengths = [p.shape[2] if isinstance(p, torch.Tensor) and p.dim() == 4 else None for p in parts]
        for kind in ("q", "kv"):
            if lengths == [self.tokens(r, kind) for r in range(self.world_size)]:
                order = torch.cat([self.positions(r, kind) for r in range(self.world_size)]).long()
                whole = torch.cat(list(parts), 2)[:, :, torch.argsort(order).to(parts[0].device)]
                return whole if self.layout is None else self.layout.unpermute(whole)
        raise ValueError(f"unshard: the shards have {lengths} tokens at dim 2 of [B, H, N, D]; this plan's ranks "
                         f"own {[self.tokens(r) for r in range(self.world_size)]} query tokens"
                         + ("" if self.Q_LEN == self.KV_LEN else
                            f" and {[self.tokens(r, 'kv') for r in range(self.world_size)]} key tokens"))

    def describe(self) -> str:
        """Per rank: tokens, contiguous runs, live tiles (and max/mean), the kv shards it needs."""
        W = self.world_size
        order = "" if self.layout is None else f" in {self.layout!r}'s kernel order"
        lines = [f"context parallelism: {W} ranks, Q_LEN={self.Q_LEN} KV_LEN={self.KV_LEN}, chunks of {self.chunk} "
                 f"tokens{order}; live {self.chunk}x{self.chunk} tiles per rank max/mean {imbalance(self.load):.3f}; "
                 f"ring steps {self.ring_steps} of {W}"]
        for r in range(W):
            needs = [s for s in range(W) if self.work[r, s] > 0]
            lines.append(f"  rank {r}: {self.tokens(r)} tokens in {len(self.q_runs[r])} runs, "
                         f"{int(self.load[r])} live tiles, kv shards {needs}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"ShardPlan({self.pattern.name or 'custom'}, Q_LEN={self.Q_LEN}, KV_LEN={self.KV_LEN}, "
                f"world_size={self.world_size}, chunk={self.chunk}, max/mean {imbalance(self.load):.3f})")

    def _runs(self, kind: str):
        if kind not in ("q", "kv"):
            raise ValueError(f"kind must be 'q' or 'kv', got {kind!r}")
        return self.q_runs if kind == "q" else self.kv_runs

    def _rank(self, rank: int) -> int:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be an int in 0..{self.world_size - 1}, got {rank!r}")
        return rank

    def _kind_of(self, x) -> str:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"shard takes a [B, H, N, D] tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[2] not in (self.Q_LEN, self.KV_LEN):
            raise ValueError(f"x has {x.shape[2]} tokens at dim 2; this plan is for Q_LEN={self.Q_LEN}, "
                             f"KV_LEN={self.KV_LEN}")
        return "q" if x.shape[2] == self.Q_LEN else "kv"
