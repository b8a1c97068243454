"""The 1-D language-model families of the catalogue (sinks, chunked, global_tokens, strided_heads,
vertical_slash, power, document's three input forms): each mask against a dense definition
written here with plain Python loops, param / buffer rebinding, and the kernels (interpreter)
forward and backward against the float64 oracle at one small size."""
import pytest
import torch

import attncc as ac
from attncc import PatternError
from attncc.patterns.chunked import chunked
from attncc.patterns.document import document
from attncc.patterns.global_tokens import global_tokens
from attncc.patterns.power import power, power_table
from attncc.patterns.sinks import sinks
from attncc.patterns.strided_heads import strided_heads
from attncc.patterns.vertical_slash import vertical_slash, vertical_slash_tables
from test_backward import check, qkv
from test_patterns import mask_of, pairs

SIZES = [(1, 1), (17, 17), (40, 40), (23, 31), (31, 23)]  # (Q_LEN, KV_LEN): odd, square and not


def per_head(H: int, Q: int, KV: int, live) -> torch.Tensor:
    """bool [1, H, Q, KV] from a plain-Python predicate live(h, i, j)."""
    return torch.stack([pairs(Q, KV, lambda i, j: live(h, i, j)) for h in range(H)])[None]


def forward_and_backward(pattern, B=1, Hq=2, Hkv=1, Q=64, KV=64, seed=0):
    """The compiled forward against ac.reference, then dq, dk, dv against float64 autograd."""
    q, k, v = qkv(B, Hq, Hkv, Q, KV, 16, seed=seed)
    ac.testing.compare(pattern, q.detach(), k.detach(), v.detach())
    check(pattern, q, k, v, seed=seed)


# ----------------------------------------------------------------------------------------------
# sinks (StreamingLLM)

@pytest.mark.parametrize("S,W", [(0, 0), (1, 0), (4, 3), (2, 10), (50, 2)])
def test_sinks_mask(S, W):
    for Q, KV in SIZES:
        expected = pairs(Q, KV, lambda i, j: j <= i and (j < S or i - j <= W))
        assert torch.equal(mask_of(sinks(S, W), Q, KV), expected), (Q, KV)


def test_sinks_window_counts_like_sliding_window_and_rebinds():
    # no sinks: exactly sliding_window(W), the query itself plus the W keys before it
    assert torch.equal(mask_of(sinks(0, 5), 30), mask_of(ac.patterns.sliding_window(5), 30))
    pat = sinks(2, 3)
    bound = pat.bind(S=5, W=1)
    assert bound.mask is pat.mask and bound.params == {"S": 5, "W": 1}
    assert torch.equal(mask_of(bound, 21, 25), pairs(21, 25, lambda i, j: j <= i and (j < 5 or i - j <= 1)))
    with pytest.raises(ValueError, match="num_sinks"):
        sinks(-1, 3)
    with pytest.raises(ValueError, match="window"):
        sinks(2, 1.5)


def test_sinks_kernels():
    forward_and_backward(sinks(4, 9), Q=70, KV=70)


# ----------------------------------------------------------------------------------------------
# chunked (Llama 4 local attention)

@pytest.mark.parametrize("C", [1, 4, 7, 64])
@pytest.mark.parametrize("causal", [True, False])
def test_chunked_mask(C, causal):
    for Q, KV in SIZES:
        expected = pairs(Q, KV, lambda i, j: i // C == j // C and (j <= i or not causal))
        assert torch.equal(mask_of(chunked(C, causal=causal), Q, KV), expected), (Q, KV)


def test_chunked_is_block_diagonal_and_checks_its_chunk():
    blocks = [torch.ones(5, 5, dtype=torch.bool).tril()] * 4 + [torch.ones(3, 3, dtype=torch.bool).tril()]
    assert torch.equal(mask_of(chunked(5), 23), torch.block_diag(*blocks))
    assert chunked(5).params == {}  # the chunk size is a compile-time constant, like dilated's d
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="chunk"):
            chunked(bad)


def test_chunked_kernels():
    forward_and_backward(chunked(16), Q=77, KV=77)
    q, k, v = qkv(1, 1, 1, 45, 45, 16, seed=3)
    ac.testing.compare(chunked(8, causal=False), q.detach(), k.detach(), v.detach())


# ----------------------------------------------------------------------------------------------
# global_tokens (Longformer)

def _globals(N: int, positions) -> torch.Tensor:
    g = torch.zeros(N, dtype=torch.bool)
    g[list(positions)] = True
    return g


@pytest.mark.parametrize("window", [None, 0, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_global_tokens_mask(window, causal):
    N, glob = 41, {0, 7, 8, 20, 40}
    pat = global_tokens(_globals(N, glob), window, causal=causal)

    def live(i, j):
        ok = i in glob or j in glob or (window is not None and abs(i - j) <= window)
        return ok and (j <= i or not causal)

    for Q, KV in [(41, 41), (17, 17), (23, 41), (41, 30), (1, 1)]:
        assert torch.equal(mask_of(pat, Q, KV), pairs(Q, KV, live)), (Q, KV)


def test_global_tokens_rebind_and_errors():
    N = 30
    pat = global_tokens(_globals(N, {3}), 2)
    assert list(pat.buffers) == ["is_global"] and pat.params == {"W": 2}
    other = _globals(N, {0, 29})
    bound = pat.bind(W=0, is_global=other)
    assert bound.mask is pat.mask
    assert torch.equal(mask_of(bound, N), pairs(N, N, lambda i, j: i in (0, 29) or j in (0, 29) or i == j))
    # no global token and no window: every row empty
    assert not mask_of(global_tokens(torch.zeros(N, dtype=torch.bool)), N).any()
    for bad in (torch.tensor([0, 1, 0]), [True, False], torch.zeros(2, 3, dtype=torch.bool)):
        with pytest.raises(ValueError, match="is_global"):
            global_tokens(bad, 2)
    with pytest.raises(ValueError, match="window"):
        global_tokens(_globals(N, {3}), -1)
    with pytest.raises(PatternError, match="is_global"):  # longer than the buffer
        mask_of(pat, N + 1)


def test_global_tokens_kernels():
    N = 75
    forward_and_backward(global_tokens(_globals(N, {0, 1, 33, 60}), 5), Q=N, KV=N)
    q, k, v = qkv(1, 1, 1, 50, 50, 16, seed=2)
    ac.testing.compare(global_tokens(_globals(N, {2, 49}), None, causal=True), q.detach(), k.detach(), v.detach())


# ----------------------------------------------------------------------------------------------
# strided_heads (S2-Attention)

@pytest.mark.parametrize("S,W", [(1, 0), (3, 2), (4, 0), (5, 7)])
def test_strided_heads_mask(S, W):
    H = 6
    for Q, KV in SIZES:
        expected = per_head(H, Q, KV, lambda h, i, j: j <= i and (j % S == h % S or i - j <= W))
        assert torch.equal(mask_of(strided_heads(S, W), Q, KV, B=1, H=H), expected), (Q, KV)


def test_strided_heads_rebind_and_cover():
    S, H, N = 4, 4, 33
    pat = strided_heads(S, 1)
    bound = pat.bind(W=6)
    assert pat.params == {"W": 1} and bound.mask is pat.mask
    assert torch.equal(mask_of(bound, N, N, B=1, H=H),
                       per_head(H, N, N, lambda h, i, j: j <= i and (j % S == h or i - j <= 6)))
    # together the heads cover the whole causal triangle
    assert torch.equal(mask_of(pat, N, N, B=1, H=H)[0].any(0), torch.ones(N, N, dtype=torch.bool).tril())
    with pytest.raises(ValueError, match="num_shards"):
        strided_heads(0, 2)


def test_strided_heads_kernels():
    forward_and_backward(strided_heads(3, 4), Hq=4, Hkv=2, Q=70, KV=70)


# ----------------------------------------------------------------------------------------------
# vertical_slash (MInference)

def _lines(H, N, Kc, Ks, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, N, (H, Kc), generator=g), torch.randint(0, N, (H, Ks), generator=g)


@pytest.mark.parametrize("Kc,Ks", [(3, 2), (0, 4), (5, 0), (1, 1), (12, 9)])
def test_vertical_slash_mask(Kc, Ks):
    H, N = 3, 41
    cols, offs = _lines(H, N, Kc, Ks, seed=Kc * 10 + Ks)
    pat = vertical_slash(cols, offs, N)
    c, o = cols.tolist(), offs.tolist()
    for Q, KV in [(41, 41), (17, 17), (23, 41), (41, 30), (1, 1)]:
        expected = per_head(H, Q, KV, lambda h, i, j: j <= i and (j in c[h] or i - j in o[h]))
        assert torch.equal(mask_of(pat, Q, KV, B=1, H=H), expected), (Q, KV)


def test_vertical_slash_lists_tables_and_rebinding():
    N = 20
    pat = vertical_slash([[0, 5], [1, 1]], [[0], [3]], N)  # lists, repeats
    assert sorted(pat.buffers) == ["slash", "vertical"]
    want = per_head(2, N, N, lambda h, i, j: j <= i and (j in ([0, 5], [1])[h] or i - j == (0, 3)[h]))
    assert torch.equal(mask_of(pat, N, N, B=1, H=2), want)
    vertical, slash = vertical_slash_tables([[2], [19]], [[1, 2], []], N)
    assert vertical.shape == slash.shape == (2, N) and vertical.dtype == torch.bool
    bound = pat.bind(vertical=vertical, slash=slash)
    assert bound.mask is pat.mask
    want = per_head(2, N, N, lambda h, i, j: j <= i and (j == (2, 19)[h] or (h == 0 and i - j in (1, 2))))
    assert torch.equal(mask_of(bound, N, N, B=1, H=2), want)


def test_vertical_slash_errors():
    with pytest.raises(ValueError, match=r"columns entries must lie in \[0, seq_len = 10\)"):
        vertical_slash([[10]], [[0]], 10)
    with pytest.raises(ValueError, match="offsets entries"):
        vertical_slash([[1]], [[-1]], 10)
    with pytest.raises(ValueError, match="one row per head"):
        vertical_slash([[1], [2]], [[0]], 10)
    for bad in ([1, 2], torch.tensor([1, 2]), [], torch.zeros(1, 2), [[0.5]]):
        with pytest.raises(ValueError, match=r"\[H, K\]"):
            vertical_slash(bad, [[0]], 10)
    with pytest.raises(ValueError, match="seq_len"):
        vertical_slash([[1]], [[0]], 0)
    pat = vertical_slash([[1]], [[0]], 10)
    for Q, KV, H in [(11, 10, 1), (10, 11, 1), (10, 10, 2)]:  # beyond the tables: refused, never read
        with pytest.raises(PatternError, match="inside dim"):
            mask_of(pat, Q, KV, B=1, H=H)


def test_vertical_slash_kernels():
    H, N = 4, 77
    cols, offs = _lines(H, N, 6, 4, seed=5)
    offs[:, 0] = 0  # the diagonal, as MInference's selection has it
    forward_and_backward(vertical_slash(cols, offs, N), Hq=H, Hkv=2, Q=N, KV=70)


# ----------------------------------------------------------------------------------------------
# power (PowerAttention)

def _power_of_two_or_zero(d: int) -> bool:
    return d == 0 or any(d == 2 ** k for k in range(d.bit_length() + 1))


def test_power_table():
    assert power_table(1).tolist() == [True]
    assert torch.nonzero(power_table(70)).flatten().tolist() == [0, 1, 2, 4, 8, 16, 32, 64]
    assert torch.nonzero(power_table(65)).flatten().tolist() == [0, 1, 2, 4, 8, 16, 32, 64]
    assert torch.nonzero(power_table(64)).flatten().tolist() == [0, 1, 2, 4, 8, 16, 32]


@pytest.mark.parametrize("W", [0, 1, 5])
def test_power_mask(W):
    N = 41
    pat = power(N, W)
    for Q, KV in [(41, 41), (17, 17), (23, 41), (41, 30), (30, 60), (1, 1)]:  # KV may pass N: q - kv < Q
        expected = pairs(Q, KV, lambda i, j: j <= i and (_power_of_two_or_zero(i - j) or i - j <= W))
        assert torch.equal(mask_of(pat, Q, KV), expected), (Q, KV)


def test_power_rebind_and_errors():
    N = 50
    pat = power(N)
    assert pat.params == {"W": 0} and list(pat.buffers) == ["pow2"]
    assert torch.equal(mask_of(pat.bind(W=3), N), pairs(N, N, lambda i, j: j <= i and (
        _power_of_two_or_zero(i - j) or i - j <= 3)))
    assert mask_of(pat, N).sum(1).tolist()[:9] == [1, 2, 3, 3, 4, 4, 4, 4, 5]  # row i: 0 and 2^k <= i
    with pytest.raises(PatternError, match="pow2"):
        mask_of(pat, N + 1, N)  # a distance beyond the table
    with pytest.raises(ValueError, match="window"):
        power(N, -2)


def test_power_kernels():
    forward_and_backward(power(80, 2), Q=77, KV=77)


# ----------------------------------------------------------------------------------------------
# document: lengths, offsets or ids

def _doc_of(lengths):
    out = []
    for d, n in enumerate(lengths):
        out += [d] * n
    return out


@pytest.mark.parametrize("lengths", [[3, 1, 5, 2, 4], [7], [0, 4, 0, 0, 9, 1, 0]])
@pytest.mark.parametrize("causal", [True, False])
def test_document_from_lengths_offsets_ids(lengths, causal):
    doc = _doc_of(lengths)
    N = len(doc)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    forms = [document(offsets=offsets, causal=causal), document(offsets=torch.tensor(offsets), causal=causal),
             document(ids=torch.tensor(doc), causal=causal), document(None, None, causal, torch.tensor(doc))]
    if min(lengths) > 0:  # empty documents only through offsets
        forms += [document(lengths, causal=causal), document(lengths=torch.tensor(lengths), causal=causal)]
    assert all(f == forms[0] for f in forms)  # one buffer `doc`, the same ids, the same IR
    for Q, KV in [(N, N), (N - 3, N), (N, N - 2), (1, 1)]:
        expected = pairs(Q, KV, lambda i, j: doc[i] == doc[j] and (j <= i or not causal))
        for f in forms:
            assert torch.equal(mask_of(f, Q, KV), expected), (Q, KV)


def test_document_bad_input():
    for kwargs, match in [({}, "exactly one.*got none"),
                          (dict(lengths=[2, 3], offsets=[0, 2, 5]), "lengths and offsets"),
                          (dict(lengths=[2], ids=torch.zeros(2, dtype=torch.long)), "lengths and ids"),
                          (dict(lengths=[3, -1, 2]), "positive"),
                          (dict(lengths=[0, 0]), "positive"),
                          (dict(lengths=torch.tensor([0, 0, 1, 1])), "per-token document ids.*ids="),
                          (dict(offsets=[0, 0]), "no token"),
                          (dict(lengths=[]), "empty"),
                          (dict(lengths=[2.0, 3.0]), "integers"),
                          (dict(lengths=[[2, 3]]), "1-D"),
                          (dict(offsets=[1, 3, 5]), "start at 0"),
                          (dict(offsets=[0, 4, 3, 6]), "non-decreasing"),
                          (dict(offsets=[0]), "no token"),
                          (dict(ids=torch.zeros(3)), "ids must be"),
                          (dict(ids=torch.zeros(2, 2, dtype=torch.long)), "ids must be")]:
        with pytest.raises(ValueError, match=match):
            document(**kwargs)


def test_document_rebinds_and_kernels():
    pat = document(offsets=[0, 30, 41, 41, 77])  # an empty third document
    assert list(pat.buffers) == ["doc"]
    other = torch.tensor(_doc_of([10, 67]))
    assert torch.equal(mask_of(pat.bind(doc=other), 77), pairs(77, 77, lambda i, j: other[i] == other[j] and j <= i))
    forward_and_backward(document(offsets=[0, 30, 41, 41, 77]), Q=77, KV=77)


# ----------------------------------------------------------------------------------------------
# The block classifier on every family: sound without element-wise evaluation, exact with it

def _families():
    N = 45
    cols, offs = _lines(3, N, 4, 3, seed=9)
    return [("sinks", sinks(3, 5), 1), ("chunked", chunked(6), 1), ("chunked-bidir", chunked(8, causal=False), 1),
            ("global", global_tokens(_globals(N, {0, 17, 30}), 2), 1),
            ("global-causal", global_tokens(_globals(N, {5, 6}), None, causal=True), 1),
            ("strided", strided_heads(3, 2), 3), ("vertical_slash", vertical_slash(cols, offs, N), 3),
            ("power", power(N, 1), 1), ("document", document(offsets=[0, 9, 9, 30, 45]), 1)]


@pytest.mark.parametrize("name,pat,H", _families(), ids=lambda x: x if isinstance(x, str) else "")
def test_block_classes_sound_and_exact(name, pat, H):
    from attncc.compiler.blockmask import classify
    from test_blockmask import tile_truth

    for Q, KV, BM, BN in [(45, 45, 4, 4), (45, 38, 8, 4), (33, 45, 1, 16), (45, 45, 16, 16)]:
        truth = tile_truth(pat, 1, H, Q, KV, BM, BN)
        rough = classify(pat, 1, H, Q, KV, BM, BN, refine=False).dense()
        assert bool(((rough == truth) | (rough == 1)).all()), (name, Q, KV, BM, BN)
        assert torch.equal(classify(pat, 1, H, Q, KV, BM, BN).dense(), truth), (name, Q, KV, BM, BN)


def test_softcap_refuses_a_cap_that_is_not_a_positive_finite_number():
    assert ac.patterns.softcap(2).params == {"cap": 2.0}
    for bad in (0, -3.0, float("inf"), float("nan"), True, "30"):
        with pytest.raises(ValueError, match="cap must be a finite number > 0"):
            ac.patterns.softcap(bad)


@pytest.mark.parametrize("build, message", [
    (lambda: ac.patterns.sliding_window(-1), "window must be a non-negative int"),
    (lambda: ac.patterns.sliding_window(2.5), "window must be a non-negative int"),
    (lambda: ac.patterns.sliding_window(4, causal=1), "causal must be True or False"),
    (lambda: ac.patterns.dilated(-3, 2), "window must be a non-negative int"),
    (lambda: ac.patterns.dilated(4, 2, seq_len=True), "seq_len must be a positive int"),
    (lambda: ac.patterns.dilated(4, 2, seq_len=0), "seq_len must be a positive int"),
    (lambda: ac.patterns.prefix_lm(-2), "prefix must be a non-negative int"),
    (lambda: ac.patterns.causal(0.5), "offset must be an int"),
    (lambda: ac.patterns.chunked(4, causal="no"), "causal must be True or False"),
    (lambda: ac.patterns.softcap(causal=None), "causal must be True or False"),
    (lambda: ac.patterns.global_tokens(torch.zeros(8, dtype=torch.bool), 2, causal="x"), "causal must be True"),
    (lambda: ac.patterns.alibi(2.5), "num_heads must be a positive int"),
    (lambda: ac.patterns.alibi(-2), "num_heads must be a positive int"),
    (lambda: ac.patterns.alibi(True), "num_heads must be a positive int"),
    (lambda: ac.patterns.relative_bias(torch.zeros(7), bidirectional=False), "bidirectional=False needs num_buckets"),
    (lambda: ac.patterns.relative_bias(torch.zeros(32, 2), num_buckets=32, bidirectional="no"),
     "bidirectional must be True or False"),
])
def test_constructor_arguments_are_checked_never_read_loosely(build, message):
    """A typo gives a ValueError naming the argument, never another pattern (a negative window
    masking every row, a float window, a flag read by truthiness)."""
    with pytest.raises(ValueError, match=message):
        build()


def test_numpy_integers_are_taken_as_ints():
    import numpy as np

    assert ac.patterns.sliding_window(np.int64(8)) == ac.patterns.sliding_window(8)
    assert ac.patterns.causal(np.int32(-3)) == ac.patterns.causal(-3)
