"""Pattern as a value: hash/eq/str, pickling, bind (params and buffers), & and | (params, buffer
renaming, score composition, block predicates), block_size semantics, from_ir checks."""
import copy
import math
import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import attncc as ac
from attncc import PatternError
from attncc.compiler import evaluate as ev
from attncc.dsl import ir
from ir_terms import BBUF, BUFFERS, FBUF, IBUF, PARAMS, as_function, bool_terms, float_terms
from test_patterns import mask_of, pairs, score_grid


def _sw(w):
    W = ac.param("W", w)
    return lambda b, h, q, kv: (q >= kv) & (q - kv <= W)


def test_hash_eq_and_str():
    a, b = ac.Pattern(_sw(4), name="one"), ac.Pattern(_sw(4), name="two")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert ac.Pattern(_sw(5)) != a and ac.Pattern(_sw(5)).bind(W=4) == a
    assert str(a) == "# one\nparam W = 4\nmask = q >= kv and q - kv <= W"
    assert ac.Pattern(lambda b, h, q, kv: q >= kv) != ac.Pattern(lambda b, h, q, kv: q > kv)
    t1, t2 = torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1])
    assert ac.patterns.document(ids=t1) == ac.patterns.document(ids=t2)
    assert hash(ac.patterns.document(ids=t1)) == hash(ac.patterns.document(ids=t2))
    assert ac.patterns.document(ids=t1) != ac.patterns.document(ids=torch.tensor([0, 1, 1]))
    assert ac.patterns.document(ids=t1) != ac.patterns.document(ids=t1.int())
    assert a != "mask = q >= kv"
    with pytest.raises(AttributeError, match="immutable"):
        a.mask = ir.TRUE


def test_pickle_and_deepcopy_keep_the_value():
    pat = ac.patterns.document(ids=torch.tensor([0, 0, 1, 1])) & ac.patterns.softcap(10.0)
    for twin in (pickle.loads(pickle.dumps(pat)), copy.deepcopy(pat), copy.copy(pat)):
        assert twin == pat and hash(twin) == hash(pat) and twin.mask is pat.mask and str(twin) == str(pat)


def test_bind_params():
    pat = ac.Pattern(_sw(4), lambda s, b, h, q, kv: s * ac.param("t", 0.5))
    bound = pat.bind(W=1, t=2)
    assert bound.params == {"W": 1, "t": 2.0} and isinstance(bound.params["t"], float)
    assert bound.mask is pat.mask and bound.score is pat.score and pat.params == {"W": 4, "t": 0.5}
    assert pat.bind(W=3.0).params["W"] == 3 and isinstance(pat.bind(W=3.0).params["W"], int)
    assert pat.bind(W=torch.tensor(2)).params["W"] == 2
    assert torch.equal(mask_of(bound, 6), pairs(6, 6, lambda i, j: 0 <= i - j <= 1))
    for bad, match in [(dict(W=3.5), "integer param"), (dict(W=True), "number"), (dict(t="x"), "number"),
                       (dict(window=3), "'window' is not a param or buffer.*'W', 't'")]:
        with pytest.raises(PatternError, match=match):
            pat.bind(**bad)


def test_bind_buffers():
    pat = ac.patterns.document(ids=torch.tensor([0, 0, 1, 1]), causal=False)
    other = torch.tensor([0, 1, 1, 1])
    bound = pat.bind(doc=other)
    assert bound.buffers["doc"] is other and bound.mask is pat.mask and bound != pat
    assert torch.equal(mask_of(bound, 4), other[:, None] == other[None])
    for bad, match in [([0, 1, 1, 1], "torch.Tensor"), (torch.zeros(4, dtype=torch.complex64), "dtype"),
                       (torch.tensor(1), "at least one dimension")]:
        with pytest.raises(PatternError, match=match):
            pat.bind(doc=bad)
    unbound = pat.bind(doc=None)
    assert unbound.unbound_buffers() == ["doc"]
    with pytest.raises(PatternError, match="bind"):
        ac.create_mask(unbound, None, None, 4, 4)


def test_and_or_masks():
    a, b = ac.patterns.causal(), ac.patterns.sliding_window(2, causal=False)
    i, j = torch.arange(8)[:, None], torch.arange(8)[None]
    assert torch.equal(mask_of(a & b, 8), (i >= j) & ((i - j).abs() <= 2))
    assert torch.equal(mask_of(a | b, 8), (i >= j) | ((i - j).abs() <= 2))
    assert (a & b).name == "causal & sliding_window" and (a & b).params == {"W": 2}


def test_combining_params():
    same = ac.patterns.sliding_window(3) & ac.patterns.dilated(3, 2)  # both call their window W = 3
    assert same.params == {"W": 3}
    with pytest.raises(PatternError, match="param 'W'"):
        ac.patterns.sliding_window(3) & ac.patterns.dilated(4, 2)
    with pytest.raises(PatternError, match="param 'W'"):
        ac.patterns.sliding_window(3) | ac.Pattern(lambda b, h, q, kv: q - kv <= ac.param("W", 3.0))


def test_combining_renames_clashing_buffers():
    d1, d2 = torch.tensor([0, 0, 1, 1, 1, 2]), torch.tensor([0, 1, 1, 1, 2, 2])
    both = ac.patterns.document(ids=d1, causal=False) & ac.patterns.document(ids=d2, causal=False)
    assert set(both.buffers) == {"doc", "doc1"} and both.buffers["doc"] is d1 and both.buffers["doc1"] is d2
    assert str(both.mask) == "doc[q] == doc[kv] and doc1[q] == doc1[kv]"
    assert torch.equal(mask_of(both, 6), (d1[:, None] == d1[None]) & (d2[:, None] == d2[None]))
    shared = ac.patterns.document(ids=d1) | ac.patterns.document(ids=d1.clone(), causal=False)
    assert list(shared.buffers) == ["doc"]
    assert torch.equal(mask_of(shared, 6), d1[:, None] == d1[None])


def test_a_buffer_named_like_a_param_is_renamed():
    W = torch.tensor([1, 2, 3, 4])  # the tensor variable and the param are both called W
    window = ac.param("W", 2)
    pat = ac.Pattern(lambda b, h, q, kv: (W[q] > kv) & (q - kv < window))
    assert str(pat) == "param W = 2\nbuffer W1\nmask = W1[q] > kv and q - kv < W"
    assert pat.bind(W=3, W1=W + 1).params == {"W": 3}
    with pytest.raises(PatternError, match="name both a param and a buffer"):
        pat & ac.Pattern(lambda b, h, q, kv: q < ac.param("W1", 3))
    with pytest.raises(PatternError, match="name both a param and a buffer"):
        ac.Pattern.from_ir(ir.op("lt", ir.load("W", (ir.Var("q"),)), ir.Param("W", "int")), params={"W": 1},
                           buffers={"W": W})


def test_combining_score_mods():
    double = ac.Pattern(score_mod=lambda s, b, h, q, kv: s * 2.0)
    shift = ac.Pattern(lambda b, h, q, kv: q >= kv, lambda s, b, h, q, kv: s + 1.0)
    assert str((double & shift).score) == "2.0 * score + 1.0"  # the left pattern's mod applies first
    assert str((shift & double).score) == "2.0 * (score + 1.0)"
    assert (ac.patterns.causal() | shift).score is shift.score
    assert (shift | ac.patterns.causal()).score is shift.score
    assert (shift | shift).score is shift.score
    with pytest.raises(PatternError, match="different score mods"):
        double | shift
    negate = ac.Pattern(score_mod=lambda s, b, h, q, kv: -s)
    assert (negate & negate).score is ir.Var("score")


def test_block_predicate_and_block_size():
    blocks = ac.Pattern(lambda b, h, q, kv: q >= kv, block_mask_mod=lambda b, h, qb, kb: (qb - kb) % 2 == 0,
                        block_size=(2, 3))
    assert blocks.block_size == (2, 3) and blocks.has_block_mask
    assert str(blocks).endswith("block_size = 2, 3\nblock = (qb - kb) % 2 == 0")
    expected = pairs(10, 11, lambda i, j: i >= j and (i // 2 - j // 3) % 2 == 0)
    assert torch.equal(mask_of(blocks, 10, 11), expected)
    square = ac.Pattern(block_mask_mod=lambda b, h, qb, kb: qb == kb, block_size=4)
    assert square.block_size == (4, 4)
    assert torch.equal(mask_of(square, 9), pairs(9, 9, lambda i, j: i // 4 == j // 4))
    # block_size only matters when there is a block predicate
    assert ac.Pattern(lambda b, h, q, kv: q >= kv, block_size=16) == ac.patterns.causal()
    assert square != ac.Pattern(block_mask_mod=lambda b, h, qb, kb: qb == kb, block_size=2)
    for bad in (0, (2, 3, 4), True, (2, 0), 2.0):
        with pytest.raises(PatternError, match="block_size"):
            ac.Pattern(block_mask_mod=lambda b, h, qb, kb: qb == kb, block_size=bad)


def test_block_predicate_reading_a_selection_buffer():
    """MoBA/NSA-style gating: a per-head top-k choice of key blocks, as a bool [H, QB, KB] buffer."""
    g = torch.Generator().manual_seed(5)
    chosen = torch.rand(3, 4, 5, generator=g) > 0.5
    lag = ac.param("lag", 1)
    gated = ac.Pattern(lambda b, h, q, kv: q + lag >= kv, block_mask_mod=lambda b, h, qb, kb: chosen[h, qb, kb],
                       block_size=(3, 2))
    assert str(gated.block) == "chosen[h, qb, kb]" and gated.params == {"lag": 1}
    for lag_value in (1, 4):
        got = mask_of(gated.bind(lag=lag_value), 12, 10, B=1, H=3)
        for h in range(3):
            blocks = torch.kron(chosen[h].int(), torch.ones(3, 2, dtype=torch.int)).bool()
            assert torch.equal(got[0, h], blocks & pairs(12, 10, lambda i, j: i + lag_value >= j))


def test_combining_block_predicates():
    blocks = ac.Pattern(lambda b, h, q, kv: q >= kv, block_mask_mod=lambda b, h, qb, kb: qb == kb, block_size=2)
    first = ac.Pattern(lambda b, h, q, kv: q < 2)
    i, j = torch.arange(7)[:, None], torch.arange(7)[None]
    blk = (i >= j) & (i // 2 == j // 2)
    assert torch.equal(mask_of(blocks & first, 7), blk & (i < 2))
    assert torch.equal(mask_of(blocks | first, 7), blk | (i < 2))
    assert torch.equal(mask_of(first | blocks, 7), blk | (i < 2))
    other = ac.Pattern(block_mask_mod=lambda b, h, qb, kb: kb == 0, block_size=2)
    assert torch.equal(mask_of(blocks | other, 7), blk | (j // 2 == 0))
    assert torch.equal(mask_of(blocks & other, 7), blk & (j // 2 == 0))
    with pytest.raises(PatternError, match="block sizes"):
        blocks & ac.Pattern(block_mask_mod=lambda b, h, qb, kb: kb == 0, block_size=4)


OTHER_BUFFERS = {"ibuf": IBUF.flip(0), "fbuf": FBUF * 2, "bbuf": ~BBUF}  # clash by name with the first


def random_pattern(data, buffers, with_block: bool) -> ac.Pattern:
    """A pattern from a random mask function and maybe a random block predicate (block_size 2 or 3)."""
    params = {k: ac.param(k, v) for k, v in PARAMS.items()}
    f = as_function(data.draw(bool_terms(3, score=False)), data.draw(st.integers(0, 99)), buffers)
    block = None
    if with_block:
        g = as_function(data.draw(bool_terms(2, score=False)), data.draw(st.integers(0, 99)), buffers)
        block = lambda b, h, qb, kb: g({"b": b, "h": h, "q": qb, "kv": kb, **params})  # noqa: E731
    return ac.Pattern(lambda b, h, q, kv: f({"b": b, "h": h, "q": q, "kv": kv, **params}), block_mask_mod=block,
                      block_size=data.draw(st.sampled_from([2, 3])))


@pytest.mark.parametrize("blocks", [(False, False), (True, False), (False, True), (True, True)])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_and_or_of_random_patterns_are_and_or_of_their_masks(blocks, data):
    p1, p2 = random_pattern(data, BUFFERS, blocks[0]), random_pattern(data, OTHER_BUFFERS, blocks[1])
    if p1.has_block_mask and p2.has_block_mask and p1.block_size != p2.block_size:
        for combine in (lambda: p1 & p2, lambda: p1 | p2):
            with pytest.raises(PatternError, match="block sizes"):
                combine()
        return
    m1, m2 = (ac.create_mask(p, 2, 3, 6, 7) for p in (p1, p2))
    assert torch.equal(ac.create_mask(p1 | p2, 2, 3, 6, 7), m1 | m2)
    both = p1 & p2
    assert torch.equal(ac.create_mask(both, 2, 3, 6, 7), m1 & m2)
    assert both == p1 & p2 and hash(both) == hash(p1 & p2)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_and_of_random_score_mods_composes_them(data):
    """(p1 & p2).score is p2's score mod applied to p1's."""
    f1, f2 = (as_function(data.draw(float_terms(3)), data.draw(st.integers(0, 99)), bufs)
              for bufs in (BUFFERS, OTHER_BUFFERS))
    p1, p2 = (ac.Pattern(score_mod=lambda s, b, h, q, kv, f=f: f({"score": s, "b": b, "h": h, "q": q, "kv": kv,
                                                                   **PARAMS})) for f in (f1, f2))
    env = score_grid(2, 3, 4, 5)
    both = p1 & p2
    got = ev.evaluate(both.score, env, both.params, both.buffers)
    first = torch.broadcast_to(ev.evaluate(p1.score, env, p1.params, p1.buffers), env["score"].shape)
    want = ev.evaluate(p2.score, {**env, "score": first}, p2.params, p2.buffers)
    torch.testing.assert_close(torch.broadcast_to(got, want.shape).double(), want.double(), rtol=1e-9, atol=1e-9,
                               equal_nan=True)


def test_from_ir_checks():
    q, kv, score = ir.Var("q"), ir.Var("kv"), ir.Var("score")
    with pytest.raises(PatternError, match="param 'W' has no value"):
        ac.Pattern.from_ir(ir.op("lt", q, ir.Param("W", "int")))
    with pytest.raises(PatternError, match="not declared"):
        ac.Pattern.from_ir(ir.op("eq", ir.load("doc", (q,)), ir.const(0)))
    with pytest.raises(PatternError, match="mask may use only"):
        ac.Pattern.from_ir(ir.op("gt", score, ir.const(0.0)))
    with pytest.raises(PatternError, match="block may use only"):
        ac.Pattern.from_ir(block=ir.op("ge", q, kv))
    pat = ac.Pattern.from_ir(ir.op("ge", q, kv), ir.op("sub", q, kv))  # an integer score becomes float
    assert ir.kind_of(pat.score) == "float" and not math.isnan(ev.evaluate(pat.score, {"q": torch.tensor(3),
                                                                                       "kv": torch.tensor(1)}, {}, {}))


def test_a_pattern_with_a_block_predicate_says_so_in_its_name():
    def causal(b, h, q, kv):
        return q >= kv

    def top_blocks(b, h, qb, kb):
        return qb - kb < 2
    pat = ac.Pattern(causal, block_mask_mod=top_blocks, block_size=16)
    assert pat.name == "causal with block predicate top_blocks"
    assert ac.Pattern(block_mask_mod=top_blocks).name == "top_blocks"
    assert ac.Pattern(causal, block_mask_mod=lambda b, h, qb, kb: qb >= kb).name == "causal with block predicate"


def test_params_zero_and_negative_zero_are_different_values():
    """0.0 == -0.0, but 1 / W tells them apart: a call after bind(C=-0.0) must not reuse the
    cached metadata (and param values) of a call with C=0.0, nor the reverse."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for n in (45, 67, 67))
    C = ac.param("C", 0.0)
    pat = ac.Pattern(score_mod=lambda s, b, h, qi, ki: torch.where(s / (s * 0.0 + C) > 0, s, -s))
    assert pat.bind(C=0.0) != pat.bind(C=-0.0)
    for c in (0.0, -0.0, 0.0):
        p = pat.bind(C=c)
        assert (ac.attention(q, k, v, p).double() - ac.reference(q, k, v, p)).abs().max() < 1e-5, c


def test_int_params_must_fit_int64():
    """The kernels take int params as int64: a value past it is refused when bound (it was accepted,
    then failed at launch)."""
    pat = ac.Pattern(lambda b, h, q, kv: q - kv < ac.param("W", 5))
    assert pat.bind(W=2 ** 63 - 1).params["W"] == 2 ** 63 - 1
    for bad in (2 ** 63, -2 ** 63 - 1):
        with pytest.raises(PatternError, match="must fit int64"):
            pat.bind(W=bad)
