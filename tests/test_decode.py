"""The split-KV decode kernel (runtime/decode.py, templates/decode.py.tmpl) in Triton's interpreter:
paged and dense caches read in place, against `ac.reference` (float64) on each sequence's keys
with the queries at its last positions (test_sequences.oracle)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attncc as ac
from attncc.compiler.codegen import TileConfig
from attncc.runtime import choices, sequences
from test_sequences import dense_sequence, oracle, paged_inputs, rel

TREE = torch.tensor([-1, 0, 0, 1, 2])  # 5 speculative tokens verified against a 40-token prefix


def head_windows(Hq: int) -> ac.Pattern:
    """A buffer read per head: query head h sees the last 3 + 5 * h keys (GQA: the heads of one kv
    head differ, so its tiles are the union of theirs)."""
    width = torch.tensor([3 + 5 * h for h in range(Hq)])
    return ac.Pattern(lambda b, h, q, kv: (q >= kv) & (q - kv < width[h]), name="head_windows")


PATTERNS = {
    "causal": lambda Hq: ac.patterns.causal(),
    "sinks_window": lambda Hq: ac.patterns.sinks(3, 20),
    "alibi": lambda Hq: ac.patterns.alibi(Hq),
    "softcap": lambda Hq: ac.patterns.softcap(5.0),
    "head_windows": head_windows,
    "per_head": lambda Hq: ac.patterns.per_head([ac.patterns.sinks(2, 8), ac.patterns.causal()] * (Hq // 2)),
}


def check_paged(pattern, lens, Q_LEN, Hq, Hkv, page_size, splits=None, tol=1e-5):
    num_pages = sum(-(-n // page_size) for n in lens) + 3
    q, kc, vc, table, kv_lens = paged_inputs(lens, Q_LEN=Q_LEN, Hq=Hq, Hkv=Hkv, page_size=page_size,
                                             num_pages=num_pages, seed=Q_LEN + page_size)
    table[table < 0] = 10 ** 6  # entries past a sequence's pages are never read
    options = None if splits is None else {"kv_splits": splits}
    kern = ac.compile(pattern, q, kc, vc, page_table=table, kv_lens=kv_lens, kernel_options=options)
    assert kern.config["kernel"] == "decode" and kern.config["paged"]
    out, lse = kern(q, kc, vc, page_table=table, kv_lens=kv_lens, return_lse=True)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and not out.isnan().any()
    for b, n in enumerate(lens):
        if n == 0:
            assert (out[b] == 0).all() and (lse[b] == -torch.inf).all()
            continue
        want, want_lse = oracle(q[b], dense_sequence(kc, table, b, n), dense_sequence(vc, table, b, n), pattern)
        live = torch.isfinite(want_lse)
        assert torch.equal(torch.isfinite(lse[b]), live)
        assert rel(out[b], want) < tol and rel(lse[b][live], want_lse[live]) < tol, (b, n)
    return out, kern


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("Q_LEN, Hq, Hkv, page_size", [(1, 8, 2, 16), (5, 4, 4, 64)])
def test_paged_decode_matches_the_reference(name, Q_LEN, Hq, Hkv, page_size):
    check_paged(PATTERNS[name](Hq), [37, 0, 77, Q_LEN], Q_LEN, Hq, Hkv, page_size)


def test_paged_tree_verification():
    # speculative decoding: the 5 tree tokens are each sequence's last, after a 40-token prefix
    check_paged(ac.patterns.tree(TREE, prefix_len=40), [45, 0, 45], 5, 8, 2, 16)


@pytest.mark.parametrize("page_size", [16, 64])
def test_forced_splits_agree(page_size):
    outs = [check_paged(ac.patterns.sinks(4, 70), [203, 131, 0], 2, 4, 2, page_size, splits=S)[0] for S in (1, 3, 7)]
    assert rel(outs[1], outs[0].double()) < 1e-6 and rel(outs[2], outs[0].double()) < 1e-6


def test_splits_follow_the_cost_model():
    _, kern = check_paged(ac.patterns.causal(), [300, 0], 1, 4, 2, 16)
    assert kern.config["kv_splits"] == 2  # 300 keys: 10 tiles of 32, two splits of at least 128
    # B * Hkv * row blocks = 8 programs on the generic profile's 108 SMs, 2 waves: 27, capped by
    # 8 live tiles of 32 keys / 128 keys per split = 2, or not (6400 tiles), then a power of two
    from attncc.compiler import cost

    generic = cost.load_profile("generic")
    assert [cost.decode_splits(8, tiles, 32, generic) for tiles in (3, 8, 12, 64 * 100)] == [1, 2, 2, 16]
    assert cost.decode_splits(1024, 64 * 100, 32, cost.load_profile("generic")) == 1


def test_paged_calls_do_not_gather(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the paged cache was gathered")

    monkeypatch.setattr(sequences, "paged_call", refuse)
    lens = [37, 50]
    q, kc, vc, table, kv_lens = paged_inputs(lens, Q_LEN=3)
    out = ac.attention(q, kc, vc, ac.patterns.sinks(3, 10), page_table=table, kv_lens=kv_lens)
    want, _ = oracle(q[1], dense_sequence(kc, table, 1, 50), dense_sequence(vc, table, 1, 50), ac.patterns.sinks(3, 10))
    assert rel(out[1], want) < 1e-5
    kern = ac.compile(ac.patterns.sinks(3, 10), q, kc, vc, page_table=table, kv_lens=kv_lens)
    assert kern.config["kernel"] == "decode" and "def attention_decode(" in kern.source
    assert "mask = " in kern.source and "paged_kv_len" not in kern.source  # the pattern itself, inlined
    # the block map is the kernel's: sinks + window read 2 of the 4 tiles (32 keys) of a 128-key row
    lens = [128]
    q, kc, vc, table, kv_lens = paged_inputs(lens, Q_LEN=1, num_pages=8)
    kern = ac.compile(ac.patterns.sinks(3, 10), q, kc, vc, page_table=table, kv_lens=kv_lens)
    meta = kern._meta
    assert int(meta.full_num.sum() + meta.partial_num.sum()) == 2


def test_a_decode_loop_reuses_its_lists_for_a_span_of_steps(monkeypatch):
    from attncc.runtime import decode

    monkeypatch.setattr(decode, "DECODE_SPAN", 5)
    built = []
    real = decode.build_meta

    def counted(*args, **kwargs):
        meta = real(*args, **kwargs)
        built.append(meta.lengths_to.tolist())
        return meta
    monkeypatch.setattr(decode, "build_meta", counted)
    Hq, Hkv, D = 4, 2, 16
    cache = ac.KVCache(num_pages=16, page_size=16, heads=Hkv, head_dim=D, batch=3, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    keys, values = [torch.randn(Hkv, 30, D, generator=g) for _ in range(2)], [torch.randn(Hkv, 30, D, generator=g) for _ in range(2)]
    cache.append(torch.stack(keys), torch.stack(values), seqs=[0, 2])  # sequence 1 stays empty
    pattern = ac.patterns.sinks(2, 20)  # its window moves every step
    for step in range(13):
        if step == 12:  # sequence 0 ends, another takes its place: shorter, so the lists are rebuilt
            cache.release(0)
            keys[0], values[0] = torch.randn(Hkv, 16, D, generator=g), torch.randn(Hkv, 16, D, generator=g)
            cache.append(keys[0][None], values[0][None], seqs=[0])
        new_k, new_v = torch.randn(2, Hkv, 1, D, generator=g), torch.randn(2, Hkv, 1, D, generator=g)
        cache.append(new_k, new_v, seqs=[0, 2])
        keys = [torch.cat([keys[i], new_k[i]], 1) for i in range(2)]
        values = [torch.cat([values[i], new_v[i]], 1) for i in range(2)]
        q = torch.randn(3, Hq, 1, D, generator=g)
        out, lse = cache.attention(q, pattern, return_lse=True)
        assert (out[1] == 0).all() and (lse[1] == -torch.inf).all()
        for i, b in enumerate((0, 2)):
            ref, ref_lse = oracle(q[b], keys[i], values[i], pattern)
            assert rel(out[b], ref) < 1e-5 and rel(lse[b], ref_lse) < 1e-5, (step, b)
    # lengths 31..35 (the tile of 32 keys crossed on the way), 36..40, 41..42, then 17 beside 43
    assert built == [[36, 1, 36], [41, 1, 41], [46, 1, 46], [22, 1, 48]]


def _classes(meta, B: int, Hkv: int, KB: int) -> torch.Tensor:
    """int8 [B, Hkv, KB] from a DecodeMeta's lists: FULL, PARTIAL, else EMPTY."""
    from attncc.compiler.blockmask import EMPTY, FULL, PARTIAL

    out = torch.full((B, Hkv, KB), EMPTY, dtype=torch.int8)
    for value, num, idx in ((FULL, meta.full_num, meta.full_idx), (PARTIAL, meta.partial_num, meta.partial_idx)):
        num, idx = num.expand(B, Hkv), idx.expand(B, Hkv, -1)
        for b in range(B):
            for h in range(Hkv):
                out[b, h, idx[b, h, :int(num[b, h])].long()] = value
    return out


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_span_lists_are_sound_for_every_length_they_serve(data):
    """A tile the span's lists call FULL is FULL for every length they serve, and a tile some
    served length sees is listed (FULL or PARTIAL): the kernel's loops stay exact."""
    from attncc.compiler.blockmask import EMPTY, FULL
    from attncc.compiler.codegen import TileConfig
    from attncc.runtime import decode
    from attncc.runtime.inputs import Shapes

    Hq, Hkv, Q = 4, 2, data.draw(st.integers(1, 3), label="Q_LEN")
    # the non-causal ones see keys past the queries: only the lengths bound them
    every_7th = torch.arange(200) % 7 == 0
    patterns = {**PATTERNS, "two_sided_window": lambda Hq: ac.patterns.sliding_window(40, causal=False),
                "global_tokens": lambda Hq: ac.patterns.global_tokens(every_7th, window=3)}
    name = data.draw(st.sampled_from(sorted(patterns)), label="pattern")
    lens = data.draw(st.lists(st.one_of(st.just(0), st.integers(Q, 150)), min_size=1, max_size=3), label="lens")
    span, capacity = data.draw(st.integers(2, 40), label="span"), data.draw(st.sampled_from([150, 192]), label="capacity")
    tiles = TileConfig(16, data.draw(st.sampled_from([16, 32]), label="BLOCK_N"), 4, 1)
    pattern, cpu, B = patterns[name](Hq), torch.device("cpu"), len(lens)
    meta = decode.build_meta(pattern, Shapes(B, Hq, Hkv, Q, max(1, *lens), 16, 16), tiles, cpu, 1, torch.tensor(
        lens, dtype=torch.int32), span, capacity)
    served = [data.draw(st.integers(int(lo), int(hi) - 1), label=f"length {b}")
              for b, (lo, hi) in enumerate(zip(meta.lengths_from, meta.lengths_to))]
    assert all(n == 0 or Q <= n <= capacity for n in served)
    exact = decode.build_meta(pattern, Shapes(B, Hq, Hkv, Q, max(1, *served), 16, 16), tiles, cpu, 1,
                              torch.tensor(served, dtype=torch.int32))
    KB = max(meta.block_mask.shape[3], exact.block_mask.shape[3])
    merged, truth = _classes(meta, B, Hkv, KB), _classes(exact, B, Hkv, KB)
    assert bool(((merged != FULL) | (truth == FULL)).all()), "a FULL tile that is not FULL for a served length"
    assert bool(((truth == EMPTY) | (merged != EMPTY)).all()), "a live tile the lists leave out"
    # the PARTIAL tiles at or past a served length end their list, and partial_tail holds them all
    # (the kernel drops them by it), its width fixed by the span and tiles (one compiled kernel)
    assert meta.partial_tail.shape[-1] == 1 << (max(1, -(-(span - 1) // tiles.BLOCK_N)) - 1).bit_length()
    num, idx = meta.partial_num.expand(B, Hkv), meta.partial_idx.expand(B, Hkv, -1)
    for b, n in enumerate(served):
        for h in range(Hkv):
            listed = idx[b, h, :int(num[b, h])].tolist()
            past = [t for t in listed if t * tiles.BLOCK_N >= n]
            if past:
                assert listed[-len(past):] == past
                assert meta.partial_tail.expand(B, Hkv, -1)[b, h].tolist()[-len(past):] == past


def test_the_span_stops_at_the_page_tables_capacity():
    _, kern = check_paged(ac.patterns.sinks(2, 9), [30, 5, 0], 1, 4, 2, 16)  # 2 pages: 32 tokens
    assert kern._meta.lengths_to.tolist() == [33, 33, 1] and kern._meta.lengths_from.tolist() == [30, 5, 0]


def test_lists_serve_one_length_where_the_span_leaves_the_domain():
    ids = torch.tensor([0] * 20 + [1] * 11)  # document ids of the first 31 positions only
    pattern = ac.Pattern(lambda b, h, q, kv: (ids[q] == ids[kv]) & (q >= kv), name="short_ids")
    q, kc, vc, table, kv_lens = paged_inputs([31, 25], Q_LEN=2)
    kern = ac.compile(pattern, q, kc, vc, page_table=table, kv_lens=kv_lens)
    assert kern._meta.serves(kv_lens) and not kern._meta.serves(kv_lens + 1)
    out = kern(q, kc, vc, page_table=table, kv_lens=kv_lens)
    for b, n in enumerate((31, 25)):
        k_s, v_s = dense_sequence(kc, table, b, n), dense_sequence(vc, table, b, n)
        assert rel(out[b], oracle(q[b], k_s, v_s, pattern)[0]) < 1e-5
    with pytest.raises(ac.PatternError, match="not defined everywhere"):
        kern(q, kc, vc, page_table=table, kv_lens=torch.tensor([32, 25], dtype=torch.int32))


@pytest.mark.parametrize("splits", [1, 3])
def test_lengths_changed_where_python_cannot_see_are_exact_or_nan(splits):
    """kv_lens rewritten without a new version (as a CUDA graph's replay of a decode step meets
    lengths its capture did not see): the kernel reads the queries' positions from kv_lens itself,
    so lengths the lists serve stay exact; a sequence whose length left them gets NaN rows, never
    a wrong number."""
    pattern = ac.patterns.sinks(2, 9)
    q, kc, vc, table, kv_lens = paged_inputs([20, 40], Q_LEN=2, num_pages=8)
    table = torch.cat((table, torch.tensor([[6, 7], [5, 4]], dtype=torch.int32)), 1)[:, :4]  # room to grow
    kern = ac.compile(pattern, q, kc, vc, page_table=table, kv_lens=kv_lens, kernel_options={"kv_splits": splits})
    kern(q, kc, vc, page_table=table, kv_lens=kv_lens)
    hi = kern._meta.lengths_to.tolist()
    for grown in ([21, 45], [hi[0] - 1, hi[1]]):  # served; then sequence 1 one past its span
        kv_lens.data.copy_(torch.tensor(grown))  # no version bump: the cached lists are reused
        out, lse = kern(q, kc, vc, page_table=table, kv_lens=kv_lens, return_lse=True)
        for b, n in enumerate(grown):
            if n >= hi[b]:
                assert out[b].isnan().all() and lse[b].isnan().all()
                continue
            want, want_lse = oracle(q[b], dense_sequence(kc, table, b, n), dense_sequence(vc, table, b, n), pattern)
            assert rel(out[b], want) < 1e-5 and rel(lse[b], want_lse) < 1e-5, (grown, b)


def test_gradients_take_the_other_path():
    lens = [37, 20]
    q, kc, vc, table, kv_lens = paged_inputs(lens, Hq=2, Hkv=1)
    kern = ac.compile(ac.patterns.causal(), q, kc, vc, page_table=table, kv_lens=kv_lens)
    qg = q.clone().requires_grad_()
    out = kern(qg, kc, vc, page_table=table, kv_lens=kv_lens)
    out.sum().backward()
    assert qg.grad is not None and qg.grad.abs().sum() > 0
    assert choices.choose_decode(ac.patterns.causal(), 4, None, {}, grad=True) is False


def test_dense_decode_matches_the_reference():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 8, 3, 32, generator=g)
    k, v = (torch.randn(2, 2, 150, 32, generator=g) for _ in range(2))
    for pattern in (ac.patterns.causal(offset=147), ac.patterns.sinks(4, 30), ac.patterns.alibi(8)):
        out, lse = ac.attention(q, k, v, pattern, return_lse=True, kernel_options={"decode": True, "kv_splits": 3})
        ref, ref_lse = ac.reference(q, k, v, pattern, return_lse=True)
        live = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), live) and not out.isnan().any()
        assert rel(out, ref) < 1e-5 and rel(lse[live], ref_lse[live]) < 1e-5
    kern = ac.compile(ac.patterns.causal(offset=147), q, k, v, kernel_options={"decode": True})
    assert kern.config["kernel"] == "decode" and not kern.config["paged"]
    # a query that sees nothing (zeros, lse -inf, no NaN), values of another head dim
    pattern = ac.Pattern(lambda b, h, q, kv: kv < 40 * q)
    v16 = torch.randn(2, 2, 150, 16, generator=g)
    out, lse = ac.attention(q, k, v16, pattern, return_lse=True, kernel_options={"decode": True, "kv_splits": 2})
    ref, ref_lse = ac.reference(q, k, v16, pattern, return_lse=True)
    assert (out[:, :, 0] == 0).all() and (lse[:, :, 0] == -torch.inf).all() and not out.isnan().any()
    assert rel(out, ref) < 1e-5 and rel(lse[:, :, 1:], ref_lse[:, :, 1:]) < 1e-5
    rule = lambda Q, KV, **o: choices.choose_decode(ac.patterns.causal(), Q, KV, o, grad=False)  # noqa: E731
    assert rule(4, 8192) and not rule(4, 1024) and not rule(65, 8192)  # the unmeasured rule
    assert not rule(4, 8192, backend="fa4") and not rule(4, 8192, decode=False)
    paged = lambda **o: choices.choose_decode(ac.patterns.causal(), 4, None, o, grad=False)  # noqa: E731
    assert paged() and paged(decode=True) and not paged(decode=False)  # a paged call reads its pages in place
    with pytest.raises(ValueError, match="decode=True cannot run this call: Q_LEN = 65"):
        rule(65, 8192, decode=True)
    # 128-key tiles become 64 where each split reads at most 1024 keys, unless options set BLOCK_N
    t128 = TileConfig(32, 128, 4, 3)
    t64 = TileConfig(32, 64, 4, 3)
    assert choices.decode_tiles_for_splits(t128, 256, {}) == t64  # B1 8K, 32 splits
    assert choices.decode_tiles_for_splits(t128, 1024, {}) == t64
    assert choices.decode_tiles_for_splits(t128, 1152, {}) == t128
    assert choices.decode_tiles_for_splits(t128, 1152, {}, shrunk=True) == t64  # no switching back at the edge
    assert choices.decode_tiles_for_splits(t128, 4096, {}, shrunk=True) == t128  # B1 128K: 4096 keys a split
    assert choices.decode_tiles_for_splits(t128, 256, {"BLOCK_N": 128}) == t128
    assert choices.decode_tiles_for_splits(TileConfig(16, 64, 4, 3), 256, {}) == TileConfig(16, 64, 4, 3)
    # ac.attention skips the choice on shapes alone where no option says otherwise: the same verdicts
    for Q in (1, 8, 64, 65, 300):
        for KV in (None, 100, 1023, 1024, 4096, 5000, 1 << 20):
            assert choices.decode_shaped(Q, KV) == rule(Q, KV), (Q, KV)


@pytest.mark.parametrize("splits", [1, 3])  # the exact path on a worklist / inlined in the program
def test_bf16_and_non_finite_values(splits):
    lens = [40, 33]
    q, kc, vc, table, kv_lens = paged_inputs(lens, Q_LEN=2)
    pattern = ac.patterns.sinks(2, 8)
    vc = vc.clone()
    p0, p1 = int(table[0, 0]), int(table[0, 2])  # sequence 0: keys 0-15, 32-47 (32-39 used)
    vc[p0, 5] = torch.nan  # masked out for every query (past the sinks, before the window)
    vc[p1, 12] = torch.inf  # past kv_len = 40 in a used page: never read
    vc[int(table[1, 0]), 1] = torch.nan  # a sink: live, so sequence 1's outputs are NaN there
    out = ac.attention(q, kc, vc, pattern, page_table=table, kv_lens=kv_lens, kernel_options={"kv_splits": splits})
    assert not out[0].isnan().any()
    want, _ = oracle(q[0], dense_sequence(kc, table, 0, 40), dense_sequence(vc, table, 0, 40), pattern)
    assert rel(out[0], want) < 1e-5
    assert out[1].isnan().all()
    q16, k16, v16 = (t.bfloat16() for t in (q, kc, paged_inputs(lens, Q_LEN=2)[2]))
    out16 = ac.attention(q16, k16, v16, pattern, page_table=table, kv_lens=kv_lens)
    assert out16.dtype == torch.bfloat16
    want, _ = oracle(q16[1].double(), dense_sequence(k16.double(), table, 1, 33),
                     dense_sequence(v16.double(), table, 1, 33), pattern)
    assert rel(out16[1], want) < 1e-2


def test_bad_page_tables_are_refused_before_any_read():
    q, kc, vc, table, kv_lens = paged_inputs([37, 20], num_pages=5)
    def run(**kw):
        return ac.compile(ac.patterns.causal(), q, kc, vc, **{"page_table": table, "kv_lens": kv_lens, **kw})
    for bad_page in (5, -1, 2 ** 31 - 1):
        bad = table.clone()
        bad[0, 2] = bad_page  # sequence 0's third page: tokens 32-36
        with pytest.raises(ValueError, match=rf"page_table\[0, 2\] = {bad_page} is not a page of the 5-page cache"):
            run(page_table=bad)
    with pytest.raises(ValueError, match="page_table must be an int32 tensor, got torch.int64"):
        run(page_table=table.long())
    with pytest.raises(ValueError, match="kv_lens must be an int32 tensor, got torch.float32"):
        run(kv_lens=kv_lens.float())
    with pytest.raises(ValueError, match="page_table must have shape"):
        run(page_table=table[:1])
    kern = run()
    bad = table.clone()
    bad[1, 1] = 99
    with pytest.raises(ValueError, match=r"page_table\[1, 1\] = 99"):  # checked again for new contents
        kern(q, kc, vc, page_table=bad, kv_lens=kv_lens)
    table[1, 1] = 99  # in place: a new version, checked again
    with pytest.raises(ValueError, match=r"page_table\[1, 1\] = 99"):
        kern(q, kc, vc, page_table=table, kv_lens=kv_lens)
    with pytest.raises(ValueError, match="kv_splits'] must be an int from 1"):
        run(kernel_options={"kv_splits": 0})


@pytest.mark.parametrize("decode", [True, False])
def test_a_batch_of_empty_sequences_with_no_pages(decode):
    """kv_lens all 0 and a page table of width 0: zeros and lse -inf, on the decode kernel and on
    the gathering path alike."""
    kc, vc = torch.randn(2, 4, 16, 2, 16)
    out, lse = ac.attention(torch.randn(2, 4, 1, 16), kc, vc, ac.patterns.causal(), return_lse=True,
                            page_table=torch.zeros(2, 0, dtype=torch.int32), kv_lens=torch.zeros(2, dtype=torch.int32),
                            kernel_options={"decode": decode})
    assert (out == 0).all() and (lse == -torch.inf).all()


def test_the_decode_benchmark_runs_in_smoke_mode(tmp_path):
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(ac.__file__).resolve().parents[1]))
    from benchmarks import decode as bench

    rows = bench.main(["--smoke", "--patterns", "document", "--splits", "auto,3", "--out-dir", str(tmp_path)])
    assert len(rows) == 1 and isinstance(rows[0]["paged_tbps"], float) and isinstance(rows[0]["attncc_3_tbps"], float)
    assert rows[0]["attncc_3_splits"] == 3 and isinstance(rows[0]["attncc_auto_tbps"], float)
    assert "| pattern | B |" in (tmp_path / "decode.md").read_text()


def test_the_serving_loop_benchmark_runs_in_smoke_mode(tmp_path):
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(ac.__file__).resolve().parents[1]))
    from benchmarks import serving_loop

    rows = serving_loop.main(["--smoke", "--patterns", "sinks", "--out-dir", str(tmp_path)])
    assert len(rows) == 1 and rows[0]["step_ms"] > 0 and rows[0]["repeat_ms"] > 0
    assert rows[0]["builds"] == 0  # the lists of the first steps serve the next ones (DECODE_SPAN)
    assert "| sinks | 2 | 40 | 2 |" in (tmp_path / "serving_loop.md").read_text()


def test_repeated_decode_calls_reuse_one_kernel(monkeypatch):
    """A step's layers (and the next steps) run one DecodeKernel: no checks or choices rebuilt;
    another parameter value, shape or option gets its own."""
    from attncc.runtime import decode

    made = []
    real = decode.DecodeKernel.__init__

    def counted(self, *args, **kwargs):
        made.append(args[0])
        real(self, *args, **kwargs)
    monkeypatch.setattr(decode.DecodeKernel, "__init__", counted)
    lens = [37, 50]
    q, kc, vc, table, kv_lens = paged_inputs(lens, Q_LEN=1)
    for window in (10, 10, 12, 10):
        pattern = ac.patterns.sinks(3, window)
        for _ in range(2):
            out = ac.attention(q, kc, vc, pattern, page_table=table, kv_lens=kv_lens)
            want, _ = oracle(q[1], dense_sequence(kc, table, 1, 50), dense_sequence(vc, table, 1, 50), pattern)
            assert rel(out[1], want) < 1e-5
    kv_lens -= 1  # the lengths change in place (a new version): the same kernel, new lists
    out = ac.attention(q, kc, vc, ac.patterns.sinks(3, 10), page_table=table, kv_lens=kv_lens)
    want, _ = oracle(q[1], dense_sequence(kc, table, 1, 49), dense_sequence(vc, table, 1, 49), ac.patterns.sinks(3, 10))
    assert rel(out[1], want) < 1e-5
    ac.attention(q, kc, vc, ac.patterns.sinks(3, 10), page_table=table, kv_lens=kv_lens, kernel_options={"kv_splits": 2})
    assert [p.params for p in made] == [ac.patterns.sinks(3, 10).params, ac.patterns.sinks(3, 12).params,
                                        ac.patterns.sinks(3, 10).params]


def test_decode_tiles_follow_the_splits_as_a_loop_grows(monkeypatch):
    """A decode loop's kernel takes 64-key tiles while each split reads few keys and 128 once its
    sequences have grown (choices.decode_tiles_for_splits, asked again at each new lists); CPU
    tiles are 32 keys, so choose_decode_tiles is made to answer 128 as on the GPU."""
    real = choices.choose_decode_tiles
    monkeypatch.setattr(choices, "choose_decode_tiles",
                        lambda *a: TileConfig(real(*a).BLOCK_M, 128, 4, 1))
    Hq, Hkv, D = 2, 1, 16
    cache = ac.KVCache(num_pages=160, page_size=64, heads=Hkv, head_dim=D, batch=1, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    keys, values = torch.randn(1, Hkv, 300, D, generator=g), torch.randn(1, Hkv, 300, D, generator=g)
    cache.append(keys, values)
    pattern, options = ac.patterns.causal(), {"kv_splits": 2}
    seen = []
    for grow in (0, 1, 4800, 1):
        if grow:
            new_k, new_v = torch.randn(1, Hkv, grow, D, generator=g), torch.randn(1, Hkv, grow, D, generator=g)
            cache.append(new_k, new_v)
            keys, values = torch.cat([keys, new_k], 2), torch.cat([values, new_v], 2)
        q = torch.randn(1, Hq, 1, D, generator=g)
        out = cache.attention(q, pattern, kernel_options=options)
        assert rel(out[0], oracle(q[0], keys[0], values[0], pattern)[0]) < 1e-5, grow
        seen.append(api_kernel(q, cache, pattern, options).config["BLOCK_N"])
    assert seen == [64, 64, 128, 128]  # 2 splits of 150 keys; of 2550 (past twice 1024)


def api_kernel(q, cache, pattern, options):
    """The DecodeKernel ac.attention reuses for this call (api._decode_kernel)."""
    from attncc.runtime import api

    return api._decode_kernel(pattern, q, cache.k, cache.v, None, options, cache.page_table, cache.kv_lens, True)


def test_explain_names_the_decode_kernel():
    """ac.explain of a call the decode kernel runs lists the forward configurations for comparison,
    none marked as running, and names the decode kernel's tiles and splits."""
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 4, 4, 16, generator=g), torch.randn(1, 2, 5000, 16, generator=g)
    text = ac.explain(ac.patterns.causal(), q, k, k)
    config = ac.compile(ac.patterns.causal(), q, k, k).config
    assert config["kernel"] == "decode" and "<- runs" not in text and "which do not run this call" in text
    assert f"{config['BLOCK_M']}x{config['BLOCK_N']} tiles, kv_splits {config['kv_splits']}" in text
    meta = (torch.empty(1, 32, 8, 128, device="meta", dtype=torch.bfloat16),
            torch.empty(1, 8, 8192, 128, device="meta", dtype=torch.bfloat16))
    on_h200 = ac.explain(ac.patterns.causal(), meta[0], meta[1], meta[1], target="h200")
    assert "chosen at run time" in on_h200 and "below the roofline" in on_h200  # the forward model's blind spot


@pytest.mark.parametrize("splits, page_size", [(None, 16), (1, 16), (3, 64)])
def test_a_page_outside_the_cache_written_unseen_gives_nan_rows_never_a_read(splits, page_size):
    """A table edited where attncc's checks cannot see it (.data here; a CUDA graph's replay on
    the GPU): the kernel reads page 0 instead and the rows that see the bad page's keys are NaN;
    rows that do not see it are exact (16-key pages under 32- or 64-key tiles: a page per key
    range; 64-key pages: one per tile)."""
    q, kc, vc, table, kv_lens = paged_inputs([150, 90], Q_LEN=3, num_pages=20, page_size=page_size)
    opts = {} if splits is None else {"kv_splits": splits}
    for pat, sees in ((ac.patterns.causal(), torch.ones(3, dtype=torch.bool)),
                      (ac.patterns.sliding_window(20), torch.tensor([1, 0, 0]).bool())):  # 147 sees key 127
        good = ac.attention(q, kc, vc, pat, page_table=table, kv_lens=kv_lens, kernel_options=opts)
        for bad in (20, -7, 2 ** 31 - 1):
            t = table.clone()
            ac.attention(q, kc, vc, pat, page_table=t, kv_lens=kv_lens, kernel_options=opts)  # checked, cached
            t.data[0, 128 // page_size - 1] = bad  # the page of keys [112, 128) (16) or [64, 128) (64)
            out = ac.attention(q, kc, vc, pat, page_table=t, kv_lens=kv_lens, kernel_options=opts)
            assert torch.equal(out[1], good[1])
            assert out[0, :, sees].isnan().all() and torch.equal(out[0, :, ~sees], good[0, :, ~sees])
