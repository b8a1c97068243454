"""Paged KV caches and packed variable-length batches, as position maps of a pattern.

Both evaluate the pattern on positions within each sequence. A sequence with L keys and Q_s
queries has its keys at positions 0..L-1 and its queries at L - Q_s .. L - 1: the queries are
its last tokens, as in decoding (prefill: Q_s = L). attncc rewrites the pattern over the dense
call its kernels run — b, q and kv become the sequence and the positions, read from small int32
buffers — so the mask, the score mod, the block masks and the kernels stay exact, and a pattern's
own buffers are indexed by positions within a sequence (size them to the longest one).

- paged (`check_paged`, `paged_pattern`): q [B, Hq, Q_LEN, D]; k_cache, v_cache [num_pages,
  page_size, Hkv, D] (page_size a power of two >= 16); page_table int32 [B, max_pages] (entries
  past a sequence's pages are never read); kv_lens int32 [B], each 0 (an empty sequence: zeros,
  lse -inf) or at least Q_LEN. For Q_LEN <= 64 without gradients the decode kernel reads the
  pages in place (runtime/decode.py); otherwise `paged_call` gathers the used pages into dense
  [B, Hkv, max(kv_lens), D] keys and values (one copy of the used cache) for the dense kernels.
- varlen (`varlen_call`): q [1, Hq, total_q, D], k, v [1, Hkv, total_k, D], the sequences
  concatenated; cu_seqlens_q, cu_seqlens_k int32 [S + 1], non-decreasing from 0 to the totals,
  each sequence with at most as many queries as keys. Where no sequence has more than 64 queries
  nor fewer keys than the most queries of any (`decode_queries`) and no gradient is needed, the
  decode kernel reads k, v in place (`token_pages`: pages whose stride is one token, so a
  sequence may start anywhere), the queries padded to that many per sequence (`query_rows`);
  otherwise the dense kernels run the packed call with the pattern rewritten (the sequences as a
  block-diagonal mask).
- split-KV (`split_kv`, kernel_options kv_splits=S): the keys cut into S chunks that run as S
  batch rows of one launch (more programs for a few queries over many keys), merged by their
  LSE (`merge_splits`); the pattern sees the original positions.
"""
from __future__ import annotations

import weakref

import torch

from ..dsl import ir
from ..dsl.pattern import Pattern
from .inputs import Shapes, check_qkv

_B, _Q, _KV = ir.Var("b"), ir.Var("q"), ir.Var("kv")


def _int_tensor(name: str, t, shape: tuple | None, device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32:
        raise ValueError(f"{name} must be an int32 tensor, got "
                         + (f"{t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__))
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the inputs on {device}")
    return t


def remap_positions(pattern: Pattern, b: ir.Node, q: ir.Node, kv: ir.Node, live: ir.Node, buffers: dict,
                    what: str = "paged and variable-length calls") -> Pattern:
    """`pattern` with b, q, kv replaced by expressions, its mask and-ed with `live`, in natural
    token order (a token layout serves single sequences of its length only); `what` names the
    calls in errors."""
    if pattern.has_block_mask:
        raise ValueError(f"{what} do not take block predicates (qb, kb: tile granularity of the whole sequence); "
                         "write the mask on q and kv")
    clash = sorted(set(buffers) & set(pattern.buffers))
    if clash:
        raise ValueError(f"the pattern's buffer names {clash} are reserved for {what}")
    swap = {_B: b, _Q: q, _KV: kv}
    sub = lambda e: ir.substitute(e, lambda n: swap.get(n))  # noqa: E731
    return Pattern.from_ir(ir.op("and", live, sub(pattern.mask)), sub(pattern.score), ir.TRUE, pattern.params,
                           {**pattern.buffers, **buffers}, pattern.name)


_VOUCHED: dict[int, tuple] = {}  # id(kv_lens) -> (weakref, version, page_table weakref, version, pages,
#                                   page size, lengths)


def vouch(kv_lens: torch.Tensor, page_table: torch.Tensor, num_pages: int, page_size: int,
          lengths: list[int]) -> None:
    """Record that kv_lens holds `lengths` and that the pages page_table gives those lengths (pages
    of page_size tokens) are below num_pages, as both tensors are now (ac.KVCache, which writes
    both, after each change): check_paged and the decode kernel's cache then take the lengths
    from here, with no synchronisation, until either tensor changes (their versions) or is
    another tensor. Tensors made under torch.inference_mode have no versions: never vouched for."""
    for key in [k for k, entry in _VOUCHED.items() if entry[0]() is None]:
        del _VOUCHED[key]
    if kv_lens.is_inference() or page_table.is_inference():
        _VOUCHED.pop(id(kv_lens), None)
        return
    _VOUCHED[id(kv_lens)] = (weakref.ref(kv_lens), kv_lens._version, weakref.ref(page_table), page_table._version,
                             num_pages, page_size, tuple(lengths))


def vouched_lengths(kv_lens, page_table, num_pages: int, page_size: int) -> tuple[int, ...] | None:
    """The lengths `vouch` recorded for exactly these tensors at their current versions, for a
    cache of at least the pages vouched for and of the same page size; else None."""
    entry = _VOUCHED.get(id(kv_lens))
    if entry is None or entry[0]() is not kv_lens or entry[2]() is not page_table:
        return None
    fresh = (entry[1], entry[3]) == (kv_lens._version, page_table._version) and num_pages >= entry[4] \
        and page_size == entry[5]
    return entry[6] if fresh else None


def check_paged(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table, kv_lens) -> Shapes:
    """The Shapes of the dense call equal to a paged one (KV = L = max(1, max(kv_lens))); a
    ValueError for any bad input, including a page_table entry a sequence uses that is not a page
    of the cache (one host synchronisation; none for tensors an ac.KVCache vouched for)."""
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError("a paged call takes q [B, Hq, Q_LEN, D] and caches [num_pages, page_size, Hkv, D]")
    B, Hq, Q_LEN, D = q.shape
    num_pages, page_size, Hkv, _ = k_cache.shape
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"k_cache and v_cache must share [num_pages, page_size, Hkv], got "
                         f"{list(k_cache.shape[:3])} and {list(v_cache.shape[:3])}")
    if page_size < 16 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two >= 16, got {page_size}")
    # the caches as [1, Hkv, num_pages * page_size, D] views: check_qkv's dtype, device, head checks
    check_qkv(q[:1], k_cache[:1].transpose(1, 2), v_cache[:1].transpose(1, 2))
    page_table = _int_tensor("page_table", page_table, None, q.device)
    if page_table.dim() != 2 or page_table.shape[0] != B:
        raise ValueError(f"page_table must have shape [B={B}, max_pages], got {list(page_table.shape)}")
    kv_lens = _int_tensor("kv_lens", kv_lens, (B,), q.device)
    capacity = page_table.shape[1] * page_size
    known = vouched_lengths(kv_lens, page_table, num_pages, page_size)
    if known is not None and all(n == 0 or Q_LEN <= n <= capacity for n in known):
        return Shapes(B, Hq, Hkv, Q_LEN, max(1, *known), D, v_cache.shape[3])
    lens = kv_lens.long()
    # the pages each sequence uses (of a length in range) must be pages of the cache; the verdicts
    # and the longest length come back in one synchronisation
    wrong_len = ((lens != 0) & (lens < Q_LEN)) | (lens < 0) | (lens > capacity)
    used = torch.arange(page_table.shape[1], device=lens.device)[None, :] * page_size < lens[:, None]
    bad = used & ((page_table < 0) | (page_table >= num_pages))
    L, any_wrong_len, any_bad = (int(x) for x in torch.stack((lens.max(), wrong_len.any(), bad.any())).tolist())
    if any_wrong_len:
        raise ValueError(f"each kv_len must be 0 or between Q_LEN={Q_LEN} (the queries are the sequence's last "
                         f"tokens) and max_pages * page_size = {capacity}; got {kv_lens.tolist()}")
    if any_bad:
        b, p = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"page_table[{b}, {p}] = {int(page_table[b, p])} is not a page of the "
                         f"{num_pages}-page cache (sequence {b} uses it for tokens from {p * page_size})")
    return Shapes(B, Hq, Hkv, Q_LEN, max(1, L), D, v_cache.shape[3])


def _token_pages(page_table: torch.Tensor, lens: torch.Tensor, page_size: int, L: int):
    """(used bool [B, L]: token t < kv_len, pages int64 [B, L]: the page holding token t)."""
    slots = torch.arange(L, device=lens.device)
    table = page_table.long() if page_table.shape[1] else lens.new_zeros(lens.shape[0], 1)  # no pages: none used
    index = (slots // page_size)[None, :].expand(lens.shape[0], L).clamp(max=table.shape[1] - 1)
    return slots[None, :] < lens[:, None], table.gather(1, index)


def query_offsets(kv_lens: torch.Tensor, Q_LEN: int) -> torch.Tensor:
    """int32 [B]: the position of each sequence's first query, kv_lens[b] - Q_LEN (0 if empty)."""
    return torch.where(kv_lens > 0, kv_lens - Q_LEN, 0).to(torch.int32)


def paged_pattern(pattern: Pattern, kv_lens: torch.Tensor, Q_LEN: int,
                  offsets: torch.Tensor | None = None) -> Pattern:
    """`pattern` over the dense call's indices (b, query q < Q_LEN, key kv < L): query q at
    position offsets[b] + q (default kv_lens[b] - Q_LEN: the sequence's last tokens), keys live
    below kv_lens[b]."""
    offsets = query_offsets(kv_lens, Q_LEN) if offsets is None else offsets.to(torch.int32)
    names = {"paged_query_offset": offsets, "paged_kv_len": kv_lens}
    position = ir.op("add", _Q, ir.load("paged_query_offset", (_B,)))
    live = ir.op("lt", _KV, ir.load("paged_kv_len", (_B,)))
    return remap_positions(pattern, _B, position, _KV, live, names)


def paged_call(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pattern: Pattern,
               page_table, kv_lens):
    """(k, v, pattern) of the dense call equal to the paged one, the used pages gathered into
    k, v [B, Hkv, L, D] (see the module docstring)."""
    s = check_paged(q, k_cache, v_cache, page_table, kv_lens)
    page_size = k_cache.shape[1]
    used, pages = _token_pages(page_table, kv_lens.long(), page_size, s.KV)
    slots = torch.arange(s.KV, device=q.device)
    rows = torch.where(used, pages * page_size + slots % page_size, 0)  # unused slots read row 0: masked out
    gather = lambda cache: cache.flatten(0, 1)[rows].permute(0, 2, 1, 3)  # noqa: E731 — [B, Hkv, L, D]
    return gather(k_cache), gather(v_cache), paged_pattern(pattern, kv_lens, s.Q)


def check_varlen(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q, cu_seqlens_k,
                 v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cu_q, cu_k) int64 [S + 1] of a valid packed call (module docstring; with v, also q, k, v's
    dtypes, devices, heads and head dims: inputs.check_qkv), else a ValueError."""
    if v is not None:
        check_qkv(q, k, v)
    if q.shape[0] != 1 or k.shape[0] != 1:
        raise ValueError("a variable-length call takes the sequences packed in one batch row: q [1, Hq, total_q, D], "
                         "k and v [1, Hkv, total_k, D]")
    cu_q = _int_tensor("cu_seqlens_q", cu_seqlens_q, None, q.device).long()
    cu_k = _int_tensor("cu_seqlens_k", cu_seqlens_k, None, q.device).long()
    if cu_q.dim() != 1 or cu_q.shape != cu_k.shape or cu_q.numel() < 2:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must be [S + 1] each, S >= 1; got {list(cu_q.shape)} "
                         f"and {list(cu_k.shape)}")
    totals = torch.tensor([q.shape[2], k.shape[2]], device=cu_q.device)
    cu = torch.stack((cu_q, cu_k))  # [2, S + 1]
    lens = cu.diff()
    # every verdict in one synchronisation: bad starts or ends, falls, more queries than keys
    wrong = torch.cat(((cu[:, 0] != 0) | (cu[:, -1] != totals) | (lens < 0).any(1), (lens[0] > lens[1]).any()[None]))
    if bool(wrong.any()):
        for name, one, total, bad in zip(("cu_seqlens_q", "cu_seqlens_k"), cu, totals.tolist(), wrong.tolist()):
            if bad:
                raise ValueError(f"{name} must rise from 0 to {total} (the packed length), got {one.tolist()}")
        s = int((lens[0] > lens[1]).nonzero()[0])
        raise ValueError(f"sequence {s} has {int(lens[0, s])} queries but {int(lens[1, s])} keys; the queries are a "
                         "sequence's last tokens, so at most as many")
    return cu_q, cu_k


def varlen_call(q: torch.Tensor, k: torch.Tensor, pattern: Pattern, cu_seqlens_q, cu_seqlens_k) -> Pattern:
    """The pattern of the dense packed call equal to the variable-length one (module docstring)."""
    cu_q, cu_k = check_varlen(q, k, cu_seqlens_q, cu_seqlens_k)
    len_q, len_k = cu_q.diff(), cu_k.diff()
    S = len_q.numel()
    seq_q = torch.repeat_interleave(torch.arange(S, device=q.device), len_q)
    seq_k = torch.repeat_interleave(torch.arange(S, device=q.device), len_k)
    pos_q = torch.arange(q.shape[2], device=q.device) - cu_q[seq_q] + (len_k - len_q)[seq_q]
    pos_k = torch.arange(k.shape[2], device=q.device) - cu_k[seq_k]
    names = {"varlen_seq_q": seq_q.int(), "varlen_seq_k": seq_k.int(), "varlen_pos_q": pos_q.int(),
             "varlen_pos_k": pos_k.int()}
    seq = ir.load("varlen_seq_q", (_Q,))
    live = ir.op("eq", seq, ir.load("varlen_seq_k", (_KV,)))
    return remap_positions(pattern, seq, ir.load("varlen_pos_q", (_Q,)), ir.load("varlen_pos_k", (_KV,)), live, names)


def decode_queries(cu_q: torch.Tensor, cu_k: torch.Tensor) -> int | None:
    """Q_LEN, the most queries of any sequence of a packed call (checked cu_seqlens, int [S + 1]),
    where the decode kernel can read it — every sequence with 0 or at least Q_LEN keys, so that
    the padded query rows of a shorter one sit at positions of its own — else None (also when no
    sequence has queries). One host synchronisation."""
    len_q, len_k = cu_q.diff(), cu_k.diff()
    most = len_q.max()
    most, short = (int(x) for x in torch.stack((most, ((len_k > 0) & (len_k < most)).any())).tolist())
    return None if most == 0 or short else most


def query_rows(cu_q: torch.Tensor, Q_LEN: int) -> torch.Tensor | None:
    """int64 [S, Q_LEN]: the packed row of each sequence's query slot, its Q_s queries in its last
    Q_s slots (so slot i sits at position kv_len - Q_LEN + i, as in a paged call) and -1 in the
    others (padding); None where every sequence has Q_LEN queries (the packed q is then a view)."""
    len_q = cu_q.diff()
    if bool((len_q == Q_LEN).all()):
        return None
    slot = torch.arange(Q_LEN, device=cu_q.device)[None, :]
    first = Q_LEN - len_q[:, None]  # the slot of the sequence's first query
    return torch.where(slot >= first, cu_q[:-1, None] + slot - first, -1)


def token_pages(cu_k: torch.Tensor, page_size: int, headroom: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(page_table int32 [S, pages], kv_lens int32 [S]) that read a packed call's keys in place as
    pages whose stride is one token: sequence s's page j starts at token cu_k[s] + j * page_size
    of the packed k [1, Hkv, total_k, D] (entries past its length are never read). page_size: a
    power of two >= 16 (the decode kernel takes its BLOCK_N: one entry per tile). pages: enough
    for the longest length plus `headroom` keys (the lengths the decode kernel's tile lists, built
    for this call, may serve as the sequences grow)."""
    lens = cu_k.diff()
    pages = -(-(int(lens.max()) + headroom) // page_size)
    offsets = cu_k[:-1, None] + torch.arange(pages, device=cu_k.device)[None, :] * page_size
    # entries past a sequence's length are never dereferenced: clamped, never wrapped, into int32
    return offsets.clamp(max=2 ** 31 - 1).int().contiguous(), lens.int().contiguous()


def split_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, splits: int):
    """(q, k, v, pattern) of the call that runs `splits` kv chunks as batch rows: row b * S + s
    holds batch b's keys s * C .. s * C + C - 1 (C = ceil(KV / splits), S = ceil(KV / C), the
    last chunk zero-padded and masked off, the pattern evaluated there at key KV - 1)."""
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"kernel_options['kv_splits'] must be a positive int, got {splits!r}")
    KV = k.shape[2]
    C = -(-KV // splits)
    S = -(-KV // C)
    pad = S * C - KV

    def chunks(t):  # [B, Hkv, KV, D] -> [B * S, Hkv, C, D]
        t = torch.nn.functional.pad(t, (0, 0, 0, pad)) if pad else t
        return t.unflatten(2, (S, C)).transpose(1, 2).flatten(0, 1)

    position = ir.op("add", _KV, ir.op("mul", ir.op("mod", _B, ir.const(S)), ir.const(C)))
    live = ir.op("lt", position, ir.const(KV))
    # the padding's keys are masked off by `live`; the pattern sees them at KV - 1, so its buffer
    # reads stay in bounds there (a score mod is evaluated on masked positions too)
    inside = ir.op("min", position, ir.const(KV - 1))
    split = remap_positions(pattern, ir.op("floordiv", _B, ir.const(S)), _Q, inside, live, {})
    return q.repeat_interleave(S, dim=0), chunks(k), chunks(v), split, S


def merge_splits(out: torch.Tensor, lse: torch.Tensor, S: int):
    """(out [B, Hq, Q, Dv] in out's dtype, lse [B, Hq, Q]) from S splits' out [B * S, ...] and lse,
    each weighted by exp(lse_s - lse); rows no split sees stay zeros with lse -inf."""
    out, lse = out.unflatten(0, (-1, S)), lse.unflatten(0, (-1, S))
    total = torch.logsumexp(lse, dim=1)
    weight = torch.exp(lse - total[:, None]).nan_to_num(0.0)  # -inf - -inf: a row no split sees
    return (weight[..., None] * out.float()).sum(1).to(out.dtype), total
