"""Block classification and BlockMask: soundness and exactness against dense evaluation, lists,
transposed lists, contiguity flags, flex interop, argument checks."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import attncc as ac
from attncc.compiler import evaluate
from attncc.compiler.blockmask import BlockMask, build_block_mask, classify
from attncc.dsl import ir
from attncc.dsl.pattern import Pattern

Q, KV, B, H = ir.Var("q"), ir.Var("kv"), ir.Var("b"), ir.Var("h")
c = ir.const


def tile_truth(pattern: Pattern, B: int, H: int, QL: int, KL: int, BM: int, BN: int) -> torch.Tensor:
    """int8 [B, H, QB, KB] exact classes from the dense mask (existing pairs only)."""
    m = evaluate.dense_mask(pattern, B, H, QL, KL).int()
    QB, KB = -(-QL // BM), -(-KL // BN)
    live = torch.zeros(B, H, QB * BM, KB * BN, dtype=torch.int32)
    exists = torch.zeros_like(live)
    live[..., :QL, :KL] = m
    exists[..., :QL, :KL] = 1
    pool = lambda x: x.view(B, H, QB, BM, KB, BN).sum((3, 5))
    n_live, n = pool(live), pool(exists)
    return torch.where(n_live == n, 2, torch.where(n_live == 0, 0, 1)).to(torch.int8)


# ----------------------------------------------------------------------------------------------
# Random patterns: affine, modular, min/max/abs/where, buffer loads, b/h dependence, block predicates.

def ints(draw, depth: int, buffers: dict, n_tokens: int) -> ir.Node:
    leaf = st.sampled_from(["q", "kv", "b", "h", "const", "param", "doc_q", "doc_kv"])
    kind = draw(leaf if depth == 0 else st.sampled_from(
        ["leaf", "add", "sub", "mul", "floordiv", "mod", "abs", "min", "max", "where", "clamp"]))
    if kind == "leaf":
        return ints(draw, 0, buffers, n_tokens)
    if kind in ("q", "kv", "b", "h"):
        return ir.Var(kind)
    if kind == "const":
        return c(draw(st.integers(-9, 9)))
    if kind == "param":
        return ir.Param("P", "int")
    if kind.startswith("doc"):
        buffers.setdefault("doc", None)
        var = Q if kind == "doc_q" else KV
        index = draw(st.sampled_from([var, ir.op("floordiv", var, c(2)),
                                      ir.op("min", ir.op("mul", var, c(2)), c(n_tokens - 1))]))
        return ir.load("doc", (index,))
    sub = lambda: ints(draw, depth - 1, buffers, n_tokens)
    if kind in ("add", "sub", "min", "max"):
        return ir.op(kind, sub(), sub())
    if kind == "mul":
        return ir.op("mul", sub(), c(draw(st.integers(-3, 3))))
    if kind in ("floordiv", "mod"):
        return ir.op(kind, sub(), c(draw(st.sampled_from([1, 2, 3, 5, 7, 16]))))
    if kind == "abs":
        return ir.op("abs", sub())
    if kind == "clamp":
        lo = draw(st.integers(-5, 20))
        return ir.op("min", ir.op("max", sub(), c(lo)), c(lo + draw(st.integers(0, 30))))
    return ir.op("where", bools(draw, depth - 1, buffers, n_tokens), sub(), sub())


def bools(draw, depth: int, buffers: dict, n_tokens: int) -> ir.Node:
    kind = draw(st.sampled_from(["cmp", "cmp", "cmp", "and", "or", "not"] if depth > 0 else ["cmp"]))
    if kind == "cmp":
        o = draw(st.sampled_from(ir.COMPARE))
        return ir.op(o, ints(draw, max(depth, 1), buffers, n_tokens), ints(draw, max(depth, 1), buffers, n_tokens))
    if kind == "not":
        return ir.op("not", bools(draw, depth - 1, buffers, n_tokens))
    return ir.op(kind, bools(draw, depth - 1, buffers, n_tokens), bools(draw, depth - 1, buffers, n_tokens))


@st.composite
def cases(draw):
    QL, KL = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    BM, BN = draw(st.sampled_from([1, 2, 3, 8, 16, 32])), draw(st.sampled_from([1, 3, 8, 16, 64]))
    buffers: dict = {}
    mask = bools(draw, draw(st.integers(0, 2)), buffers, max(QL, KL))
    if "doc" in buffers:
        n = max(QL, KL)
        if draw(st.booleans()):
            lengths = draw(st.lists(st.integers(1, 12), min_size=1, max_size=12))
            ids = ac.patterns.lengths_to_ids(lengths + [n])[:n]
        else:
            ids = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
        buffers["doc"] = ids
    block, block_size = ir.TRUE, 128
    if draw(st.booleans()):
        block_size = (draw(st.sampled_from([BM, 2, 5, 16])), draw(st.sampled_from([BN, 3, 16])))
        qb, kb = ir.Var("qb"), ir.Var("kb")
        choice = draw(st.sampled_from(["sel", "diag", "mod"]))
        if choice == "sel":
            shape = (-(-QL // block_size[0]), -(-KL // block_size[1]))
            buffers["sel"] = torch.rand(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))) < 0.6
            block = ir.load("sel", (qb, kb))
        elif choice == "diag":
            block = ir.op("ge", ir.op("add", qb, c(1)), kb)
        else:
            block = ir.op("ne", ir.op("mod", ir.op("add", qb, ir.op("add", kb, H)), c(3)), c(0))
    score = ir.op("mul", ir.Var("score"), ir.op("add", ir.op("mul", H, c(0.5)), c(1.0)))
    pattern = Pattern.from_ir(mask, score, block, {"P": draw(st.integers(-5, 40))}, buffers,
                              block_size=block_size)
    return pattern, draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 3])), QL, KL, BM, BN, \
        draw(st.sampled_from([None, 1, 2, 4]))


@settings(max_examples=150, deadline=None)
@given(cases())
def test_classification_sound_and_exact(case):
    pattern, Bn, Hn, QL, KL, BM, BN, S = case
    truth = tile_truth(pattern, Bn, Hn, QL, KL, BM, BN)
    analysed = classify(pattern, Bn, Hn, QL, KL, BM, BN, refine=False, super_tile=S).dense()
    assert bool(((analysed.expand_as(truth) == truth) | (analysed == 1)).all()), "unsound EMPTY/FULL"
    refined = classify(pattern, Bn, Hn, QL, KL, BM, BN, super_tile=S).dense()
    assert torch.equal(refined.expand_as(truth), truth)
    used = ir.free_vars(evaluate.token_mask(pattern))
    assert refined.shape[:2] == (Bn if "b" in used else 1, Hn if "h" in used else 1)


@st.composite
def affine(draw):
    a, b_ = draw(st.integers(-3, 3)), draw(st.integers(-3, 3))
    form = ir.op("add", ir.op("add", ir.op("mul", Q, c(a)), ir.op("mul", KV, c(b_))),
                 ir.op("add", c(draw(st.integers(-40, 40))), ir.op("mul", H, c(draw(st.integers(-4, 4))))))
    kind = draw(st.sampled_from(["cmp", "abs", "sides"]))
    if kind == "cmp":
        mask = ir.op(draw(st.sampled_from(["lt", "le", "gt", "ge"])), form, c(0))
    elif kind == "abs":   # |q - kv + d| <= W: a band
        band = ir.op("add", ir.op("sub", Q, KV), c(draw(st.integers(-20, 20))))
        mask = ir.op("le", ir.op("abs", band), c(draw(st.integers(0, 30))))
    else:                 # a q-only and a kv-only condition: independent, so still exact
        mask = ir.op(draw(st.sampled_from(["and", "or"])), ir.op("ge", ir.op("mul", Q, c(a)), c(7)),
                     ir.op("lt", ir.op("mod", KV, c(5)), c(3)))
    return Pattern.from_ir(mask)


@settings(max_examples=80, deadline=None)
@given(affine(), st.integers(1, 90), st.integers(1, 90), st.sampled_from([1, 4, 16, 32]),
       st.sampled_from([1, 5, 16]), st.sampled_from([None, 1, 2]))
def test_affine_masks_classified_exactly_without_evaluation(pattern, QL, KL, BM, BN, S):
    got = classify(pattern, 1, 3, QL, KL, BM, BN, refine=False, super_tile=S).dense()
    assert torch.equal(got.expand(1, 3, -1, -1), tile_truth(pattern, 1, 3, QL, KL, BM, BN))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=20), st.sampled_from([1, 4, 16, 32]),
       st.sampled_from([None, 1, 4]))
def test_document_masks_classified_exactly_without_evaluation(lengths, BM, S):
    ids = ac.patterns.lengths_to_ids(lengths)
    pattern = ac.patterns.document(ids=ids, causal=False)
    N = len(ids)
    got = classify(pattern, 1, 1, N, N, BM, BM, refine=False, super_tile=S).dense()
    assert torch.equal(got, tile_truth(pattern, 1, 1, N, N, BM, BM))


# ----------------------------------------------------------------------------------------------
# Lists.

def check_lists(num, idx, dense_rows, value):
    """num/idx list exactly the positions of `value` in dense_rows [..., R, K], ascending, 0-padded."""
    K = dense_rows.shape[-1]
    flat_num, flat_idx, rows = num.reshape(-1), idx.reshape(-1, idx.shape[-1]), dense_rows.reshape(-1, K)
    assert idx.shape[-1] == max(1, int(flat_num.max()))
    for n, ix, row in zip(flat_num.tolist(), flat_idx.tolist(), rows):
        assert ix[:n] == (row == value).nonzero().flatten().tolist()
        assert all(v == 0 for v in ix[n:])


def is_contiguous(num, idx) -> bool:
    n = num.reshape(-1).tolist()
    return all(ix[:k] == list(range(ix[0], ix[0] + k)) for k, ix in zip(n, idx.reshape(-1, idx.shape[-1]).tolist()) if k)


@settings(max_examples=60, deadline=None)
@given(cases())
def test_lists_transposes_and_flags(case):
    pattern, Bn, Hn, QL, KL, BM, BN, _ = case
    bm = build_block_mask(pattern, Bn, Hn, QL, KL, BM, BN)
    dense = bm.to_dense()
    assert dense.dtype == torch.int8 and dense.shape == bm.shape
    assert torch.equal(dense.expand(Bn, Hn, -1, -1), tile_truth(pattern, Bn, Hn, QL, KL, BM, BN))
    for kind, value in (("full", 2), ("partial", 1)):
        check_lists(getattr(bm, f"{kind}_kv_num"), getattr(bm, f"{kind}_kv_idx"), dense, value)
        check_lists(getattr(bm, f"{kind}_q_num"), getattr(bm, f"{kind}_q_idx"), dense.transpose(-1, -2), value)
        assert getattr(bm, f"{kind}_kv_contiguous") == is_contiguous(getattr(bm, f"{kind}_kv_num"),
                                                                     getattr(bm, f"{kind}_kv_idx"))
    for t in (bm.full_kv_num, bm.full_kv_idx, bm.partial_q_num, bm.partial_q_idx):
        assert t.dtype == torch.int32
    assert bm.sparsity() == pytest.approx(float((dense == 0).float().mean()))


def test_causal_lists_and_repr():
    bm = ac.create_block_mask(ac.patterns.causal(), None, None, 300, 300, block_size=(64, 32))
    assert (bm.B, bm.H, bm.BLOCK_M, bm.BLOCK_N) == (1, 1, 64, 32)
    assert bm.full_kv_num.tolist() == [[[0, 2, 4, 6, 8]]]
    assert bm.partial_kv_idx[0, 0].tolist() == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert bm.full_kv_contiguous and bm.partial_kv_contiguous
    text = repr(bm)
    assert "20 FULL" in text and "10 PARTIAL" in text and "++........" in text


def test_sliding_window_partial_lists_are_not_contiguous():
    bm = ac.create_block_mask(ac.patterns.sliding_window(70), None, None, 256, 256, block_size=32)
    assert bm.partial_kv_idx[0, 0, 4].tolist() == [1, 2, 4] and bm.full_kv_idx[0, 0, 4].tolist()[:1] == [3]
    assert not bm.partial_kv_contiguous and bm.full_kv_contiguous


def test_params_are_runtime_values():
    pat = ac.patterns.sliding_window(64)
    small = ac.create_block_mask(pat, None, None, 512, 512, block_size=32)
    wide = ac.create_block_mask(pat.bind(W=200), None, None, 512, 512, block_size=32)
    assert small.partial_kv_num.sum() + small.full_kv_num.sum() < wide.partial_kv_num.sum() + wide.full_kv_num.sum()
    assert torch.equal(wide.to_dense(), tile_truth(pat.bind(W=200), 1, 1, 512, 512, 32, 32))


# ----------------------------------------------------------------------------------------------
# Flex interop.

def test_flex_round_trip_and_agreement():
    from torch.nn.attention.flex_attention import create_block_mask as flex_create
    doc = ac.patterns.lengths_to_ids([100, 37, 200, 63])
    pat = ac.patterns.document(ids=doc)
    bm = ac.create_block_mask(pat, None, None, 400, 400, block_size=(32, 64))
    fb = bm.to_flex()
    back = BlockMask.from_flex(fb)
    for name in ("full_kv_num", "full_kv_idx", "partial_kv_num", "partial_kv_idx", "full_q_idx", "partial_q_idx"):
        assert torch.equal(getattr(back, name), getattr(bm, name)), name
    assert fb.seq_lengths == (400, 400) and tuple(fb.BLOCK_SIZE) == (32, 64)
    mask_mod, _ = evaluate.as_flex_mods(pat)
    theirs = BlockMask.from_flex(flex_create(mask_mod, None, None, 400, 400, device="cpu", BLOCK_SIZE=(32, 64)))
    ours = bm.to_dense()
    assert bool(((theirs.to_dense() == ours) | (theirs.to_dense() == 1)).all())  # flex: ragged tiles PARTIAL
    assert int((theirs.to_dense() == 1).sum()) >= int((ours == 1).sum())
    assert bool(fb.mask_mod(torch.tensor(0), torch.tensor(0), torch.tensor(150), torch.tensor(140)))
    assert not bool(fb.mask_mod(torch.tensor(0), torch.tensor(0), torch.tensor(150), torch.tensor(120)))


def test_to_flex_needs_a_mask_mod_for_partial_tiles():
    classes = torch.tensor([[[[1, 0], [2, 1]]]], dtype=torch.int8)
    bm = BlockMask.from_classes(classes, 20, 20, 16, 16)
    with pytest.raises(ValueError, match="mask_mod"):
        bm.to_flex()
    assert torch.equal(BlockMask.from_flex(bm.to_flex(mask_mod=lambda b, h, q, kv: q >= kv)).to_dense(), classes)


# ----------------------------------------------------------------------------------------------
# b / h and argument checks.

def test_per_head_masks_and_broadcast_rules():
    sel = torch.tensor([8, 16, 40])   # window per head
    pat = Pattern(lambda b, h, q, kv: (q >= kv) & (q - kv < sel[h]))
    bm = ac.create_block_mask(pat, 2, 3, 64, 64, block_size=8)
    assert (bm.B, bm.H) == (1, 3)
    assert torch.equal(bm.to_dense(), tile_truth(pat, 1, 3, 64, 64, 8, 8))
    with pytest.raises(ValueError, match="H=None"):
        ac.create_block_mask(pat, None, None, 64, 64)
    alibi = ac.patterns.alibi(4)   # h only in the score mod: the block mask broadcasts
    assert ac.create_block_mask(alibi, None, None, 64, 64, block_size=16).H == 1


@pytest.mark.parametrize("bad", [dict(Q_LEN=0), dict(Q_LEN=None), dict(KV_LEN=2.5), dict(block_size=(16, 0)),
                                 dict(block_size=True), dict(block_size=2.0), dict(B=-1)])
def test_bad_arguments(bad):
    args = dict(pattern=ac.patterns.causal(), B=None, H=None, Q_LEN=64, KV_LEN=64, block_size=16)
    args.update(bad)
    with pytest.raises(ValueError):
        ac.create_block_mask(**args)


def test_buffer_bounds_checked_at_build_time():
    doc = torch.zeros(64, dtype=torch.long)
    with pytest.raises(ac.PatternError, match="must stay inside dim 0 of size 64, but it fails at b=0, h=0, q=63"):
        ac.create_block_mask(Pattern(lambda b, h, q, kv: doc[q + 1] == doc[kv]), None, None, 64, 64)
    with pytest.raises(ac.PatternError, match="doc"):
        ac.create_block_mask(Pattern(lambda b, h, q, kv: doc[q] == doc[kv]), None, None, 64, 65)
    safe = Pattern(lambda b, h, q, kv: doc[(q + 1).clamp(max=63)] == doc[kv])
    assert ac.create_block_mask(safe, None, None, 64, 64, block_size=16).sparsity() == 0.0


def _sound(pattern: Pattern, B: int, H: int, N: int, block: int) -> None:
    """The classifier's FULL tiles are FULL and its EMPTY tiles EMPTY in the dense mask."""
    got = ac.create_block_mask(pattern, B, H, N, N, block_size=block).to_dense()
    truth = tile_truth(pattern, B, H, N, N, block, block)
    assert bool(((got != 2) | (truth == 2)).all()) and bool(((got != 0) | (truth == 0)).all())


def test_a_tile_constant_index_known_only_to_a_range_reads_the_range():
    """`win[(b % W) % 4]` with a negative W: the index is constant on each tile but the analysis
    bounds it only to [0, 3]; it read win[lower bound] and called live tiles EMPTY."""
    win = torch.tensor([0, 2, 30, 40])
    W = ac.param("W", -3)
    _sound(Pattern(lambda b, h, q, kv: (q - kv).abs() <= win[(b % W) % 4]), 2, 1, 48, 16)
    _sound(ac.parse("buffer win\nmask = abs(q - kv) <= win[(b % -3) % 4]").bind(win=win), 2, 1, 48, 16)


def test_functions_that_narrow_bounds_never_prove_a_comparison_of_a_nan():
    """abs, min/max, % and monotone functions narrow bounds; a value that may be NaN (an infinity
    in reach, a buffer's NaN) compares false, so they must not make such tiles FULL."""
    buf = torch.randn(64, dtype=torch.float64)
    buf[::7] = float("nan")
    inf = float("inf")
    for pattern in (Pattern(lambda b, h, q, kv: buf[kv].abs() >= 0.0),
                    Pattern(lambda b, h, q, kv: (q * inf - kv * inf).abs() >= 0),
                    Pattern(lambda b, h, q, kv: torch.minimum(q * inf - kv * inf, torch.tensor(1.0)) <= 1),
                    Pattern(lambda b, h, q, kv: torch.sigmoid(buf[kv]) >= 0.0),
                    Pattern(lambda b, h, q, kv: buf[kv] ** 2 >= 0.0)):
        _sound(pattern, 1, 1, 64, 16)


def test_sizes_may_be_numpy_integers():
    import numpy as np

    bm = ac.create_block_mask(ac.patterns.causal(), np.int64(2), None, np.int32(100), np.int64(90), block_size=16)
    assert bm.shape == (1, 1, 7, 6) and torch.equal(bm.to_dense(),
                                                     ac.create_block_mask(ac.patterns.causal(), 2, None, 100, 90, 16).to_dense())
