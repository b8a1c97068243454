"""Paged KV caches and packed variable-length batches (runtime/sequences.py), in Triton's
interpreter, against an oracle built independently per sequence: `ac.reference` on that
sequence's keys and a query tensor of its full length whose last rows are the call's queries
(so query i of a sequence with L keys and Q_s queries sits at position L - Q_s + i)."""
from __future__ import annotations

import pytest
import torch

import attncc as ac
from attncc.dsl import ir
from attncc.runtime import sequences
from attncc.testing import compare


def oracle(q_s: torch.Tensor, k_s: torch.Tensor, v_s: torch.Tensor, pattern, seed: int = 0):
    """(out, lse) float64 of one sequence: q_s [Hq, Qs, D], k_s / v_s [Hkv, L, D]."""
    Hq, Qs, D = q_s.shape
    L = k_s.shape[1]
    if L == 0:
        return (torch.zeros(Hq, Qs, v_s.shape[-1], dtype=torch.float64, device=q_s.device),
                torch.full((Hq, Qs), -torch.inf, dtype=torch.float64, device=q_s.device))
    full = torch.randn(Hq, L, D, generator=torch.Generator().manual_seed(seed)).to(q_s.device, q_s.dtype)
    full[:, L - Qs:] = q_s
    out, lse = ac.reference(full[None], k_s[None], v_s[None], pattern, return_lse=True)
    return out[0, :, L - Qs:], lse[0, :, L - Qs:]


def rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def paged_inputs(lens, Q_LEN=4, Hq=4, Hkv=2, D=16, page_size=16, num_pages=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_pages, page_size, Hkv, D, generator=g)
    v_cache = torch.randn(num_pages, page_size, Hkv, D, generator=g)
    max_pages = max(1, -(-max(lens) // page_size))
    order = torch.randperm(num_pages, generator=g)
    table = torch.full((len(lens), max_pages), -1, dtype=torch.int32)  # unused entries: never read
    taken = 0
    for b, n in enumerate(lens):
        used = -(-n // page_size)
        table[b, :used] = order[taken:taken + used].int()
        taken += used
    q = torch.randn(len(lens), Hq, Q_LEN, D, generator=g)
    return q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32)


def dense_sequence(cache, table, b, n):
    """[Hkv, n, D] of sequence b, page by page (the oracle's own gather)."""
    P = cache.shape[1]
    rows = [cache[int(table[b, t // P]), t % P] for t in range(n)]
    return torch.stack(rows, 1) if rows else cache.new_zeros(cache.shape[2], 0, cache.shape[3])


PATTERNS = {
    "causal": lambda: ac.patterns.causal(),
    "sinks_window": lambda: ac.patterns.sinks(3, 10),
    "alibi": lambda: ac.patterns.alibi(4),
    "tree": lambda: ac.patterns.tree(torch.tensor([-1] + [i // 2 for i in range(63)])),
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_paged_decode_matches_each_sequence(name):
    pattern = PATTERNS[name]()
    lens = [37, 0, 50, 4]
    q, kc, vc, table, kv_lens = paged_inputs(lens)
    out, lse = ac.attention(q, kc, vc, pattern, page_table=table, kv_lens=kv_lens, return_lse=True)
    assert out.shape == q.shape and lse.shape == q.shape[:3]
    for b, n in enumerate(lens):
        want, want_lse = oracle(q[b], dense_sequence(kc, table, b, n), dense_sequence(vc, table, b, n), pattern)
        if n == 0:
            assert (out[b] == 0).all() and torch.isinf(lse[b]).all()
            continue
        assert rel(out[b], want) < 1e-5 and rel(lse[b], want_lse) < 1e-5, (name, b)


def test_paged_gradients_reach_the_caches():
    pattern = ac.patterns.sliding_window(12)
    lens = [37, 20]
    q, kc, vc, table, kv_lens = paged_inputs(lens, Hq=2, Hkv=1)
    leaves = [t.clone().requires_grad_() for t in (q, kc, vc)]
    w = torch.randn_like(q)
    grads = torch.autograd.grad((ac.attention(*leaves, pattern, page_table=table, kv_lens=kv_lens) * w).sum(), leaves)
    leaves64 = [t.double().requires_grad_() for t in (q, kc, vc)]
    total = 0
    for b, n in enumerate(lens):
        out, _ = oracle(leaves64[0][b], dense_sequence(leaves64[1], table, b, n),
                        dense_sequence(leaves64[2], table, b, n), pattern)
        total = total + (out * w[b].double()).sum()
    want = torch.autograd.grad(total, leaves64)
    for a, e in zip(grads, want):
        assert rel(a, e) < 1e-4


def test_bad_paged_inputs_are_refused_clearly():
    q, kc, vc, table, kv_lens = paged_inputs([37, 20])
    run = lambda **kw: ac.attention(q, kc, vc, ac.patterns.causal(), **{"page_table": table, "kv_lens": kv_lens, **kw})  # noqa: E731
    bad = table.clone()
    bad[1, 0] = 99
    with pytest.raises(ValueError, match=r"page_table\[1, 0\] = 99 is not a page of the 12-page cache"):
        run(page_table=bad)
    with pytest.raises(ValueError, match="page_table must be an int32 tensor, got torch.int64"):
        run(page_table=table.long())
    with pytest.raises(ValueError, match="each kv_len must be 0 or between Q_LEN=4"):
        run(kv_lens=torch.tensor([37, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="each kv_len must be 0 or between"):
        run(kv_lens=torch.tensor([37, 1000], dtype=torch.int32))
    with pytest.raises(ValueError, match="kv_lens must have shape"):
        run(kv_lens=torch.tensor([37], dtype=torch.int32))
    with pytest.raises(ValueError, match="needs both page_table and kv_lens"):
        ac.attention(q, kc, vc, ac.patterns.causal(), page_table=table)
    with pytest.raises(ValueError, match="page_size must be a power of two"):
        odd = torch.randn(12, 24, 2, 16)
        ac.attention(q, odd, odd, ac.patterns.causal(), page_table=table, kv_lens=kv_lens)
    with pytest.raises(ValueError, match="not both"):
        run(cu_seqlens_q=torch.tensor([0, 4], dtype=torch.int32), cu_seqlens_k=torch.tensor([0, 4], dtype=torch.int32))


@pytest.mark.parametrize("name", ["causal", "sinks_window", "alibi"])
def test_varlen_matches_each_sequence(name):
    pattern = PATTERNS[name]()
    len_q, len_k = [5, 0, 20, 1], [9, 3, 20, 30]  # decode-like, no queries, prefill, one new token
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, sum(len_q), 16, generator=g)
    k, v = (torch.randn(1, 2, sum(len_k), 16, generator=g) for _ in range(2))
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)  # noqa: E731
    out, lse = ac.attention(q, k, v, pattern, cu_seqlens_q=cu(len_q), cu_seqlens_k=cu(len_k), return_lse=True)
    sq, sk = 0, 0
    for nq, nk in zip(len_q, len_k):
        if nq:
            want, want_lse = oracle(q[0, :, sq:sq + nq], k[0, :, sk:sk + nk], v[0, :, sk:sk + nk], pattern)
            assert rel(out[0, :, sq:sq + nq], want) < 1e-5 and rel(lse[0, :, sq:sq + nq], want_lse) < 1e-5
        sq, sk = sq + nq, sk + nk


def test_bad_varlen_inputs_are_refused_clearly():
    q = torch.randn(1, 2, 10, 16)
    k = torch.randn(1, 2, 12, 16)
    cu = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    with pytest.raises(ValueError, match="sequence 0 has 6 queries but 5 keys"):
        ac.attention(q, k, k, ac.patterns.causal(), cu_seqlens_q=cu(0, 6, 10), cu_seqlens_k=cu(0, 5, 12))
    with pytest.raises(ValueError, match="cu_seqlens_k must rise from 0 to 12"):
        ac.attention(q, k, k, ac.patterns.causal(), cu_seqlens_q=cu(0, 6, 10), cu_seqlens_k=cu(0, 8, 11))
    with pytest.raises(ValueError, match="not a multiple of the 4 heads"):  # checked before the decode kernel
        ac.attention(torch.randn(1, 6, 2, 16), torch.randn(1, 4, 12, 16), torch.randn(1, 4, 12, 16),
                     ac.patterns.causal(), cu_seqlens_q=cu(0, 1, 2), cu_seqlens_k=cu(0, 5, 12))
    with pytest.raises(ValueError, match="k and v must have the same length"):
        ac.attention(q[:, :, :2], k, k[:, :, :11], ac.patterns.causal(), cu_seqlens_q=cu(0, 1, 2),
                     cu_seqlens_k=cu(0, 5, 12))
    with pytest.raises(ValueError, match="packed in one batch row"):
        ac.attention(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), ac.patterns.causal(),
                     cu_seqlens_q=cu(0, 10), cu_seqlens_k=cu(0, 12))
    blocky = ac.Pattern.from_ir(block=ir.op("ge", ir.Var("qb"), ir.Var("kb")), block_size=16)
    with pytest.raises(ValueError, match="block predicates"):
        ac.attention(q, k, k, blocky, cu_seqlens_q=cu(0, 10), cu_seqlens_k=cu(0, 12))


def packed(lens_q, lens_k, Hq=4, Hkv=2, D=16, seed=2):
    """q [1, Hq, sum(lens_q), D], k, v [1, Hkv, sum(lens_k), D], cu_seqlens_q, cu_seqlens_k."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, Hq, sum(lens_q), D, generator=g)
    k, v = (torch.randn(1, Hkv, sum(lens_k), D, generator=g) for _ in range(2))
    cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)  # noqa: E731
    return q, k, v, cu(lens_q), cu(lens_k)


def check_each_sequence(out, lse, q, k, v, lens_q, lens_k, pattern, tol=1e-5):
    sq, sk = 0, 0
    for nq, nk in zip(lens_q, lens_k):
        want, want_lse = oracle(q[0, :, sq:sq + nq], k[0, :, sk:sk + nk], v[0, :, sk:sk + nk], pattern)
        assert rel(out[0, :, sq:sq + nq], want) < tol and rel(lse[0, :, sq:sq + nq], want_lse) < tol
        sq, sk = sq + nq, sk + nk


@pytest.fixture
def decode_runs(monkeypatch):
    """The packed calls the decode kernel ran (DecodeKernel.forward spied on)."""
    from attncc.runtime.decode import DecodeKernel

    runs, forward = [], DecodeKernel.forward

    def spy(self, *args, **kwargs):
        runs.append(self.config)
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(DecodeKernel, "forward", spy)
    return runs


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("Q_LEN, splits", [(1, None), (3, 1), (3, 4)])
def test_packed_decode_reads_the_sequences_in_place(name, Q_LEN, splits, decode_runs):
    pattern = PATTERNS[name]()
    lens_k = [40, Q_LEN, 64, 33, 32]  # several tiles, as short as its queries, whole tiles, ragged
    q, k, v, cu_q, cu_k = packed([Q_LEN] * len(lens_k), lens_k)
    options = {} if splits is None else {"kv_splits": splits}
    out, lse = ac.attention(q, k, v, pattern, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True,
                            kernel_options=options)
    assert [c["packed"] for c in decode_runs] == [True] and out.shape == (1, 4, Q_LEN * len(lens_k), 16)
    check_each_sequence(out, lse, q, k, v, [Q_LEN] * len(lens_k), lens_k, pattern)


def test_packed_decode_loop_reuses_its_kernel_and_lists(decode_runs, monkeypatch):
    from attncc.runtime import decode

    builds, real = [], decode.build_meta
    monkeypatch.setattr(decode, "build_meta", lambda *args, **kwargs: builds.append(1) or real(*args, **kwargs))
    pattern = ac.patterns.sinks(2, 12)
    lens_k = [30, 5, 62]
    kernels = set()
    for step in range(4):  # one new token per sequence per step: the 30-key one crosses a tile
        q, k, v, cu_q, cu_k = packed([1] * 3, lens_k, seed=step)
        out, lse = ac.attention(q, k, v, pattern, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
        check_each_sequence(out, lse, q, k, v, [1] * 3, lens_k, pattern)
        kernels.add(id(ac.runtime.api._packed_decode_kernel(pattern, q, k, v, None, None, cu_q, cu_k)))
        lens_k = [n + 1 for n in lens_k]
    assert len(decode_runs) == 4 and len(kernels) == 1
    assert len(builds) == 1  # the lists of the first step served the next three (DECODE_SPAN)
    checks, real_check = [], sequences.check_varlen
    monkeypatch.setattr(sequences, "check_varlen", lambda *args: checks.append(1) or real_check(*args))
    for layer in range(3):  # a step's layers: the same cu_seqlens, checked once
        ac.attention(q, k, v, pattern, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert checks == [] and len(decode_runs) == 7  # this step's were checked above
    q, k, v, cu_q, cu_k = packed([1] * 3, lens_k, seed=9)
    for layer in range(3):  # a new step: its cu_seqlens checked once for all its layers and kernels
        out, lse = ac.attention(q, k, v, pattern, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    check_each_sequence(out, lse, q, k, v, [1] * 3, lens_k, pattern)
    assert checks == [1] and len(decode_runs) == 10


@pytest.mark.parametrize("splits", [1, 3])
def test_packed_decode_pads_sequences_with_fewer_queries(splits, decode_runs):
    pattern = ac.patterns.sinks(2, 6)
    lens_q, lens_k = [2, 0, 1, 3, 0], [9, 7, 5, 40, 0]  # fewer queries, none, one, the most; an empty one
    q, k, v, cu_q, cu_k = packed(lens_q, lens_k)
    out, lse = ac.attention(q, k, v, pattern, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True,
                            kernel_options={"kv_splits": splits})
    assert [c["packed"] for c in decode_runs] == [True] and out.shape == (1, 4, 6, 16)
    check_each_sequence(out, lse, q, k, v, lens_q, lens_k, pattern)


def test_packed_lists_are_not_reused_across_query_counts_or_sequence_counts(decode_runs):
    """Found by fuzzing: packed calls with the same totals (q and k shapes) but another Q_LEN (the
    most queries of a sequence) reused the previous call's tile lists, built for queries starting
    one position later: a tile only the earlier query sees was skipped (relative error 0.5).
    Another number of sequences with the same totals raised a shape error."""
    pattern = ac.Pattern(lambda b, h, q, kv: (q >= kv) & (q - kv <= 1))  # query 192 of 195 keys: key 191
    for lens_q, lens_k in (([2, 2], [195, 195]), ([1, 3], [195, 195]), ([1, 1, 2], [195, 5, 190])):
        q, k, v, cu_q, cu_k = packed(lens_q, lens_k)
        out, lse = ac.attention(q, k, v, pattern, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
        check_each_sequence(out, lse, q, k, v, lens_q, lens_k, pattern)
    assert [c["packed"] for c in decode_runs] == [True] * 3


def test_compile_returns_the_packed_decode_kernel():
    pattern = ac.patterns.sinks(2, 6)
    q, k, v, cu_q, cu_k = packed([1, 2], [30, 9])
    kern = ac.compile(pattern, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert kern.config["kernel"] == "decode" and kern.config["packed"] and "attention_decode" in kern.source
    out, lse = kern(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    check_each_sequence(out, lse, q, k, v, [1, 2], [30, 9], pattern)
    with pytest.raises(ValueError, match="packed sequences: pass cu_seqlens_q and cu_seqlens_k"):
        kern(q, k, v)
    with pytest.raises(ValueError, match="takes packed sequences for the decode kernel only"):
        ac.compile(pattern, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, kernel_options={"decode": False})
    with pytest.raises(ValueError, match="needs both cu_seqlens_q and cu_seqlens_k"):
        ac.compile(pattern, q, k, v, cu_seqlens_q=cu_q)


def test_packed_calls_the_decode_kernel_cannot_take(decode_runs):
    pattern = ac.patterns.causal()
    q, k, v, cu_q, cu_k = packed([3, 1], [9, 2])  # 2 keys, fewer than the 3 query slots: the dense kernels
    out, lse = ac.attention(q, k, v, pattern, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    check_each_sequence(out, lse, q, k, v, [3, 1], [9, 2], pattern)
    with pytest.raises(ValueError, match="fewer keys than the most queries"):
        ac.attention(q, k, v, pattern, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, kernel_options={"decode": True})
    q, k, v, cu_q, cu_k = packed([2, 2], [9, 20])
    q.requires_grad_()  # gradients: the dense kernels, which have a backward
    out = ac.attention(q, k, v, pattern, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    (grad,) = torch.autograd.grad(out.sum(), q)
    assert decode_runs == [] and torch.isfinite(grad).all()
    qd = q.detach().double().requires_grad_()
    want = torch.cat([oracle(qd[0, :, 2 * i:2 * i + 2], k[0, :, a:b].double(), v[0, :, a:b].double(), pattern)[0]
                      for i, (a, b) in enumerate([(0, 9), (9, 29)])], 1)
    (want_grad,) = torch.autograd.grad(want.sum(), qd)
    assert rel(grad, want_grad) < 1e-4


def test_kvcache_serves_a_decode_loop():
    g = torch.Generator().manual_seed(3)
    cache = ac.KVCache(num_pages=12, page_size=16, heads=2, head_dim=16, batch=3, dtype=torch.float32)
    keys = [[], [], []]
    for b, n in enumerate([30, 5, 40]):  # prompts of different lengths
        k, v = torch.randn(2, 1, 2, n, 16, generator=g)
        cache.append(k, v, seqs=[b])
        keys[b].append((k[0], v[0]))
    pattern = ac.patterns.sinks(2, 8)
    for _ in range(3):  # decode: a token for every sequence, then attention for it
        k, v = torch.randn(2, 3, 2, 1, 16, generator=g)
        cache.append(k, v)
        for b in range(3):
            keys[b].append((k[b], v[b]))
        q = torch.randn(3, 4, 1, 16, generator=g)
        out = cache.attention(q, pattern)
        for b in range(3):
            kb = torch.cat([x for x, _ in keys[b]], 1)
            vb = torch.cat([y for _, y in keys[b]], 1)
            assert rel(out[b], oracle(q[b], kb, vb, pattern)[0]) < 1e-5
    assert cache.kv_lens.tolist() == [33, 8, 43]
    with pytest.raises(ValueError, match="out of pages: appending 100 token"):  # 6 more pages, 5 free
        cache.append(*torch.randn(2, 1, 2, 100, 16), seqs=[1])
    assert cache.kv_lens.tolist() == [33, 8, 43]  # nothing written
    for bad in (-1, 3, 1.0):  # never another sequence's pages (-1 is not the last one)
        with pytest.raises(ValueError, match="b must be a sequence index"):
            cache.release(bad)
    cache.release(2)  # its 3 pages come back
    cache.append(*torch.randn(2, 1, 2, 100, 16), seqs=[1])
    assert cache.kv_lens.tolist() == [33, 108, 0] and (cache.page_table[2] == -1).all()
    with pytest.raises(ValueError, match="k must be"):
        cache.append(torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8))
    with pytest.raises(ValueError, match="page_size must be a power of two"):
        ac.KVCache(4, 20, 2, 16, 1)


def test_a_kvcache_vouches_for_its_lengths_until_they_change_elsewhere(monkeypatch):
    cache = ac.KVCache(num_pages=12, page_size=16, heads=2, head_dim=16, batch=2, dtype=torch.float32)
    cache.append(*torch.randn(2, 2, 2, 20, 16))
    lens, table = cache.kv_lens, cache.page_table
    assert sequences.vouched_lengths(lens, table, 12, 16) == (20, 20)
    assert sequences.vouched_lengths(lens, table, 11, 16) is None  # a smaller cache: its pages are checked
    assert sequences.vouched_lengths(lens, table, 12, 8) is None  # smaller pages: the lengths may not fit
    assert sequences.vouched_lengths(lens.clone(), table, 12, 16) is None  # another tensor
    q = torch.randn(2, 4, 1, 16)
    monkeypatch.setattr(torch, "stack", None)  # the device check's one synchronisation: not taken
    assert sequences.check_paged(q, cache.k, cache.v, table, lens).KV == 20
    monkeypatch.undo()
    lens[1] = 3  # written behind the cache's back: no longer vouched, checked on the device
    assert sequences.vouched_lengths(lens, table, 12, 16) is None
    assert sequences.check_paged(q, cache.k, cache.v, table, lens).KV == 20
    table[0, 0] = 99
    lens[1] = 20
    with pytest.raises(ValueError, match=r"page_table\[0, 0\] = 99 is not a page of the 12-page cache"):
        sequences.check_paged(q, cache.k, cache.v, table, lens)
    cache.release(0)
    assert sequences.vouched_lengths(cache.kv_lens, cache.page_table, 12, 16) == (0, 20)


def test_another_caches_tables_are_checked_against_this_cache():
    """A KVCache's page_table and kv_lens passed with another cache of the same pages but smaller
    pages: the lengths overflow its table, refused before any read."""
    cache = ac.KVCache(num_pages=12, page_size=64, heads=2, head_dim=16, batch=1, dtype=torch.float32)
    cache.append(*torch.randn(2, 1, 2, 100, 16))
    other = ac.KVCache(num_pages=12, page_size=16, heads=2, head_dim=16, batch=1, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"page_table\[0, 2\] = -1 is not a page of the 12-page cache"):
        ac.attention(torch.randn(1, 4, 1, 16), other.k, other.v, ac.patterns.causal(), page_table=cache.page_table,
                     kv_lens=cache.kv_lens)


def test_a_kvcache_serves_under_inference_mode(monkeypatch):
    """Built and used in torch.inference_mode (a serving loop's): its lengths are still vouched for
    (no synchronisation a step), and the calls are exact."""
    g = torch.Generator().manual_seed(5)
    pattern = ac.patterns.sinks(2, 8)
    with torch.inference_mode():
        cache = ac.KVCache(num_pages=8, page_size=16, heads=2, head_dim=16, batch=2, dtype=torch.float32)
        k, v = torch.randn(2, 2, 2, 25, 16, generator=g)
        cache.append(k, v)
        assert sequences.vouched_lengths(cache.kv_lens, cache.page_table, 8, 16) == (25, 25)
        q = torch.randn(2, 4, 1, 16, generator=g)
        out = cache.attention(q, pattern)
    for b in range(2):
        assert rel(out[b], oracle(q[b], k[b], v[b], pattern)[0]) < 1e-5
    lens = torch.tensor([25, 25], dtype=torch.int32)
    with torch.inference_mode():  # an inference tensor has no version: never vouched for, always checked
        lens = lens.clone()
        sequences.vouch(lens, cache.page_table, 8, 16, [25, 25])
        assert sequences.vouched_lengths(lens, cache.page_table, 8, 16) is None


@pytest.mark.parametrize("name, splits", [("sinks_window", 5), ("alibi", 64), ("causal", 2)])
def test_split_kv_matches_the_reference(name, splits):
    g = torch.Generator().manual_seed(splits)
    q = torch.randn(2, 4, 3, 16, generator=g)
    k, v = (torch.randn(2, 2, 61, 16, generator=g) for _ in range(2))
    pattern = PATTERNS[name]() if name != "causal" else ac.patterns.causal(offset=58)  # the last 3 positions
    out, lse = ac.attention(q, k, v, pattern, return_lse=True, kernel_options={"kv_splits": splits})
    ref, ref_lse = ac.reference(q, k, v, pattern, return_lse=True)
    live = torch.isfinite(ref_lse)
    assert rel(out, ref) < 1e-5 and rel(lse[live], ref_lse[live]) < 1e-5
    assert torch.equal(torch.isfinite(lse), live)


def test_split_kv_score_reads_stay_in_bounds_in_the_padding():
    """Found by fuzzing: with KV not a multiple of the splits, a score mod reading a buffer at kv
    (here a per-key bias; a packed call's sequence ids likewise) was refused as reading past the
    buffer in the last chunk's padding, which the mask drops: the pattern now sees it at KV - 1."""
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(10, generator=g)
    pattern = ac.Pattern(lambda b, h, q, kv: q >= kv, score_mod=lambda s, b, h, q, kv: s + bias[kv])
    q, k, v = (torch.randn(1, 2, 10, 16, generator=g) for _ in range(3))
    compare(pattern, q, k, v, kernel_options={"kv_splits": 3})
    q, k, v, cu_q, cu_k = packed([0, 2], [1, 4])
    out, lse = ac.attention(q, k, v, PATTERNS["alibi"](), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True,
                            kernel_options={"kv_splits": 3, "decode": False})
    check_each_sequence(out, lse, q, k, v, [0, 2], [1, 4], PATTERNS["alibi"]())


def test_split_kv_gradients_empty_rows_and_paged_calls():
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2, 4, 16, generator=g)
    k, v = (torch.randn(1, 2, 50, 16, generator=g) for _ in range(2))
    pattern = ac.Pattern(lambda b, h, q, kv: kv < 10 * q)  # query 0 sees nothing
    out, lse = ac.attention(q, k, v, pattern, return_lse=True, kernel_options={"kv_splits": 4})
    assert (out[:, :, 0] == 0).all() and torch.isinf(lse[:, :, 0]).all() and not out.isnan().any()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    w = torch.randn_like(q)
    ours = torch.autograd.grad((ac.attention(*leaves, pattern, kernel_options={"kv_splits": 3}) * w).sum(), leaves)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad((ac.reference(*leaves64, pattern) * w.double()).sum(), leaves64)
    assert all(rel(a, b) < 1e-4 for a, b in zip(ours, want))
    lens = [37, 0, 50, 4]
    q, kc, vc, table, kv_lens = paged_inputs(lens)
    plain = ac.attention(q, kc, vc, ac.patterns.sinks(3, 10), page_table=table, kv_lens=kv_lens)
    split = ac.attention(q, kc, vc, ac.patterns.sinks(3, 10), page_table=table, kv_lens=kv_lens,
                         kernel_options={"kv_splits": 4})
    assert rel(split, plain.double()) < 1e-5
    x = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="kv_splits'] must be a positive int"):
        ac.attention(x, x, x, kernel_options={"kv_splits": 0})
    with pytest.raises(ValueError, match="options of ac.attention calls"):
        ac.compile(ac.patterns.causal(), x, x, x, kernel_options={"kv_splits": 2})


def test_a_kvcache_append_is_all_or_nothing(monkeypatch):
    """Indices given as tensors are ints (a repeated one refused, as in a list); an append that
    fails part-way leaves lengths, pages and table as they were (its host lengths ran ahead of the
    tokens written, and later calls read unwritten slots)."""
    g = torch.Generator().manual_seed(0)
    cache = ac.KVCache(num_pages=4, page_size=16, heads=2, head_dim=16, batch=2, dtype=torch.float32)
    cache.append(*torch.randn(2, 2, 2, 15, 16, generator=g))
    with pytest.raises(ValueError, match="distinct sequence indices"):
        cache.append(*torch.randn(2, 2, 2, 1, 16, generator=g), seqs=torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="list of sequence indices"):
        cache.append(*torch.randn(2, 2, 2, 1, 16, generator=g), seqs=[0.0, 1.0])
    cache.append(*torch.randn(2, 1, 2, 1, 16, generator=g), seqs=torch.tensor([1]))
    before = (list(cache._lens), [list(p) for p in cache._pages], list(cache._free), cache.page_table.clone())
    real, calls = cache._to_device, []

    def failing(values, dtype):  # the k, v write fails after the table took a page
        calls.append(dtype)
        if len(calls) == 1:
            raise RuntimeError("device error")
        return real(values, dtype)
    monkeypatch.setattr(cache, "_to_device", failing)
    with pytest.raises(RuntimeError, match="device error"):
        cache.append(*torch.randn(2, 2, 2, 2, 16, generator=g))
    monkeypatch.undo()
    after = (cache._lens, cache._pages, cache._free, cache.page_table)
    assert after[:3] == before[:3] and torch.equal(after[3], before[3])
    assert cache.kv_lens.tolist() == [15, 16]
    assert sequences.vouched_lengths(cache.kv_lens, cache.page_table, 4, 16) == (15, 16)


def test_a_kvcache_made_in_inference_mode_takes_appends_outside_it():
    with torch.inference_mode():
        cache = ac.KVCache(num_pages=4, page_size=16, heads=2, head_dim=16, batch=1, dtype=torch.float32)
        cache.append(*torch.randn(2, 1, 2, 10, 16))
    cache.append(*torch.randn(2, 1, 2, 1, 16))
    assert cache.kv_lens.tolist() == [11] and cache._lens == [11]
    for bad, message in (({"head_dim": 8}, "head_dim must be an int in 16..256"),
                         ({"head_dim_v": 0}, "head_dim_v must be an int in 16..256"),
                         ({"dtype": torch.float64}, "dtype must be one of")):
        with pytest.raises(ValueError, match=message):
            ac.KVCache(**{"num_pages": 4, "page_size": 16, "heads": 2, "head_dim": 16, "batch": 1, **bad})
    cache.release(torch.tensor(0))  # an index as a 0-d tensor
    assert cache._lens == [0]


@pytest.mark.parametrize("splits", [None, 3])
def test_packed_decode_sees_cu_seqlens_written_unseen(splits, decode_runs):
    """cu_seqlens rewritten where attncc's Python cannot see it (.data here; a CUDA graph's replay
    on the GPU): the sequences whose entries changed get NaN rows (the kernel compares them with
    those its pages and rows came from), the others stay exact; it returned the last step's
    numbers."""
    opts = {} if splits is None else {"kv_splits": splits}
    pattern = ac.patterns.sinks(2, 9)
    q, k, v, cu_q, cu_k = packed([1, 2, 2], [40, 30, 50])
    ac.attention(q, k, v, pattern, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, kernel_options=opts)
    cu_k.data.copy_(torch.tensor([0, 45, 70, 120], dtype=torch.int32))  # sequences 0 and 1 changed
    out = ac.attention(q, k, v, pattern, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, kernel_options=opts)
    want = ac.attention(q, k, v, pattern, cu_seqlens_q=cu_q.clone(), cu_seqlens_k=cu_k.clone(), kernel_options=opts)
    assert out[..., :3, :].isnan().all() and torch.equal(out[..., 3:, :], want[..., 3:, :])
    cu_q.data.copy_(torch.tensor([0, 2, 3, 5], dtype=torch.int32))  # query rows moved: all but the last
    cu_k.data.copy_(torch.tensor([0, 40, 70, 120], dtype=torch.int32))
    out = ac.attention(q, k, v, pattern, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, kernel_options=opts)
    assert out.isnan().any()
    assert decode_runs


def test_a_token_layout_serves_its_own_length_and_other_calls_run_in_natural_order(decode_runs):
    """A layout permutes one sequence of its n tokens: decode steps, chunked prefill (fewer queries
    than keys), paged and packed calls of a pattern that has one run it in natural order, with
    the reference's results (a causal 2-D neighbourhood, as an autoregressive image model uses)."""
    from attncc.compiler.layout import Layout

    pattern = ac.patterns.neighborhood((8, 16), (3, 5), causal=(True, True)).with_layout(Layout((8, 16), (4, 4)))
    natural = pattern.with_layout(None)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, n, 16, generator=g) for h, n in ((4, 5), (2, 128), (2, 128)))
    for options in ({}, {"decode": True}):  # the dense kernels, then the decode kernel, over 128 keys
        out = ac.attention(q, k, v, pattern, kernel_options=options)
        assert rel(out, ac.reference(q.double(), k.double(), v.double(), natural)) < 1e-5
    assert len(decode_runs) == 1
    lens = [128, 77, 5]
    qp, kc, vc, table, kv_lens = paged_inputs(lens, Q_LEN=5, num_pages=16)
    out = ac.attention(qp, kc, vc, pattern, page_table=table, kv_lens=kv_lens)
    for b, n in enumerate(lens):
        want = oracle(qp[b], dense_sequence(kc, table, b, n), dense_sequence(vc, table, b, n), natural)[0]
        assert rel(out[b], want) < 1e-5, b
    lens_q, lens_k = [3, 128, 1], [40, 128, 9]  # a decode step, a whole image, one token
    qs, ks, vs, cu_q, cu_k = packed(lens_q, lens_k)
    out, lse = ac.attention(qs, ks, vs, pattern, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    check_each_sequence(out, lse, qs, ks, vs, lens_q, lens_k, natural)
    full = ac.compile(pattern, *(t[:, :, :1].expand(-1, -1, 128, -1) for t in (q, k, v)))
    assert full.layout == pattern.layout  # its own length runs in the layout
    with pytest.raises(ValueError, match="compile the call at these lengths"):  # a kernel is bound to its form
        full(q, k, v)
    with pytest.raises(ValueError, match="the canvas and the call disagree"):
        ac.attention(k[:, :, :100].repeat(1, 2, 1, 1), k[:, :, :100], v[:, :, :100], pattern)


def test_paged_and_packed_calls_compile_with_fullgraph():
    """Under torch.compile a paged or packed call is one custom op (inference only), with the eager
    call's results; a call that needs gradients says to run it without grad or eagerly."""
    pattern = ac.patterns.sinks(2, 9)
    q, kc, vc, table, kv_lens = paged_inputs([37, 0, 50, 4])
    paged = torch.compile(lambda q, kc, vc, t, n: ac.attention(q, kc, vc, pattern, page_table=t, kv_lens=n,
                                                               return_lse=True), backend="aot_eager", fullgraph=True)
    for got, want in zip(paged(q, kc, vc, table, kv_lens),
                         ac.attention(q, kc, vc, pattern, page_table=table, kv_lens=kv_lens, return_lse=True)):
        assert torch.equal(got, want)
    lens_q, lens_k = [3, 1, 0], [40, 9, 0]
    qs, ks, vs, cu_q, cu_k = packed(lens_q, lens_k)
    packed_call = torch.compile(lambda *t: ac.attention(*t[:3], pattern, cu_seqlens_q=t[3], cu_seqlens_k=t[4],
                                                        return_lse=True), backend="aot_eager", fullgraph=True)
    out, lse = packed_call(qs, ks, vs, cu_q, cu_k)
    check_each_sequence(out, lse, qs, ks, vs, lens_q, lens_k, pattern)
    with pytest.raises(Exception, match="inference only"):
        paged(q.clone().requires_grad_(), kc, vc, table, kv_lens)
    with torch.no_grad():
        assert torch.equal(paged(q.clone().requires_grad_(), kc, vc, table, kv_lens)[0],
                           ac.attention(q, kc, vc, pattern, page_table=table, kv_lens=kv_lens))


def test_a_compiled_dense_decode_step_runs_the_decode_kernel(decode_runs):
    pattern = ac.patterns.sinks(2, 9)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, h, n, 16, generator=g) for h, n in ((4, 3), (2, 70), (2, 70)))
    step = torch.compile(lambda q, k, v: ac.attention(q, k, v, pattern, kernel_options={"decode": True}),
                         backend="aot_eager", fullgraph=True)
    assert torch.equal(step(q, k, v), ac.attention(q, k, v, pattern, kernel_options={"decode": True}))
    assert len(decode_runs) == 2  # compiled and eager
    out = step(q.clone().requires_grad_(), k, v)  # gradients needed: the dense kernels' op (recompiled)
    assert out.requires_grad and len(decode_runs) == 2
    assert rel(out.detach(), ac.reference(q.double(), k.double(), v.double(), pattern)) < 1e-5
    split = torch.compile(lambda q, k, v: ac.attention(q, k, v, pattern, kernel_options={"kv_splits": 3}),
                          backend="aot_eager", fullgraph=True)  # keys split, inference: the serving op too
    assert torch.equal(split(q, k, v), ac.attention(q, k, v, pattern, kernel_options={"kv_splits": 3}))
    with pytest.raises(Exception, match="kv_splits with gradients"):
        split(q.clone().requires_grad_(), k, v)
