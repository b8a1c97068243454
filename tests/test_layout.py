"""Token layouts (compiler/layout.py): the permutation and its IR agree, patterns run in a layout
give the natural-order results (forward, gradients, torch.compile), and bricks cut live tiles."""
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import attncc as ac
from attncc.compiler.evaluate import evaluate
from attncc.compiler.layout import Layout, cancel_digits, default_layout
from attncc.dsl import ir
from test_backward import check, qkv


@pytest.mark.parametrize("canvas,brick,dilation", [
    ((24,), (3,), 2), ((8, 12), (4, 4), 1), ((6, 12), (1, 3), (2, 2)), ((4, 6, 8), (2, 3, 2), (1, 1, 2)),
    ((12, 10), (2, 5), (3, 1))])
def test_permutation_and_its_ir_agree(canvas, brick, dilation):
    layout = Layout(canvas, brick, dilation)
    assert sorted(layout.perm.tolist()) == list(range(layout.n))
    p = torch.arange(layout.n)
    assert torch.equal(evaluate(layout.natural(ir.Var("q")), {"q": p}, {}, {}), layout.perm)
    x = torch.randn(1, 2, layout.n, 3)
    assert torch.equal(layout.unpermute(layout.permute(x)), x)


@pytest.mark.parametrize("make", [
    lambda: ac.patterns.neighborhood((8, 12), (3, 5), dilation=(2, 1)),
    lambda: ac.patterns.neighborhood((4, 8, 8), (3, 3, 5), causal=(True, False, False)),
    lambda: ac.patterns.neighborhood((12, 16), (5, 5), stride=(2, 4)),
    lambda: ac.patterns.sliding_tile((8, 12, 12), (3, 3, 3), (2, 4, 4)),
    lambda: ac.patterns.dilated(9, 3, seq_len=72),
    lambda: ac.patterns.natten2d(8, 12, 3).with_layout(Layout((8, 12), (4, 4))),
], ids=["dilated-2d", "causal-3d", "strided", "sliding-tile", "dilated-1d", "natten2d"])
def test_composed_masks_read_brick_digits_and_mean_the_same(make):
    """compose() cancels the natural index rebuilt from brick digits against the pattern's cuts
    (`natural(q) // W`, `% W`): same mask at every pair, fewer operations, tiles decided without
    evaluation."""
    pat = make()
    plain = _assert_composed_mask_is_the_uncancelled_one(pat)
    assert len(str(pat.kernel_pattern.mask)) < len(str(plain))


def _assert_composed_mask_is_the_uncancelled_one(pat) -> ir.Node:
    """Asserts the composed (digit-cancelled) mask equals, at every pair, the token mask with
    natural(q), natural(kv) substituted and nothing cancelled; returns the latter."""
    layout = pat.layout
    nat = {"q": layout.natural(ir.Var("q")), "kv": layout.natural(ir.Var("kv"))}
    plain = ir.substitute(ac.compiler.evaluate.token_mask(pat),
                          lambda node: nat.get(node.name) if isinstance(node, ir.Var) else None)
    p = torch.arange(layout.n)
    env = {"b": torch.tensor(0), "h": torch.tensor(0), "q": p[:, None], "kv": p[None, :]}
    want = evaluate(plain, env, pat.params, pat.buffers).bool().expand(layout.n, layout.n)
    got = evaluate(pat.kernel_pattern.mask, env, pat.params, pat.buffers).bool().expand(layout.n, layout.n)
    assert torch.equal(got, want)
    return plain


def test_cancel_digits_only_where_the_remainder_is_proven():
    q = ir.Var("q")
    hi, lo = ir.op("floordiv", q, ir.const(8)), ir.op("mod", q, ir.const(8))
    index = ir.op("add", ir.op("mul", ir.const(16), hi), lo)  # 16 * (q // 8) + q % 8, lo in [0, 8)
    assert cancel_digits(ir.op("floordiv", index, ir.const(16))) is hi
    assert cancel_digits(ir.op("mod", index, ir.const(16))) is lo
    shifted = ir.op("add", index, ir.const(9))  # remainder q % 8 + 9 may reach 16: kept, divided alone
    rest = ir.op("add", lo, ir.const(9))
    assert cancel_digits(ir.op("floordiv", shifted, ir.const(16))) is ir.op(
        "add", hi, ir.op("floordiv", rest, ir.const(16)))
    assert cancel_digits(ir.op("mod", shifted, ir.const(16))) is ir.op("mod", rest, ir.const(16))
    minus = ir.op("sub", ir.op("mul", ir.const(16), hi), lo)  # remainder -(q % 8) may be negative
    assert cancel_digits(ir.op("mod", minus, ir.const(16))) is ir.op("mod", ir.op("neg", lo), ir.const(16))
    # random sums of digits, constants and signs against plain evaluation
    g = torch.Generator().manual_seed(0)
    x = torch.arange(-700, 5000)
    for _ in range(300):
        terms = []
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            a, c = (int(v) for v in torch.randint(1, 9, (2,), generator=g))
            digit = [ir.op("floordiv", q, ir.const(a)), ir.op("mod", q, ir.const(a)),
                     ir.op("mod", ir.op("floordiv", q, ir.const(a)), ir.const(c)), q][int(torch.randint(0, 4, (1,), generator=g))]
            terms.append(ir.op("mul", ir.const(int(torch.randint(-3, 40, (1,), generator=g))), digit))
        node = terms[0]
        for t in terms[1:]:
            node = ir.op("add", node, t)
        node = ir.op("add", node, ir.const(int(torch.randint(-5, 6, (1,), generator=g))))
        for how in ("floordiv", "mod"):
            cut = ir.op(how, node, ir.const(int(torch.randint(1, 33, (1,), generator=g))))
            for values in (x.clamp(min=0), x):  # q >= 0 is what the ranges assume
                if values.min() < 0 and _proven_by_range(cut):
                    continue
                got = evaluate(cancel_digits(cut), {"q": values}, {}, {}).expand(values.shape)
                assert torch.equal(got, evaluate(cut, {"q": values}, {}, {}).expand(values.shape)), str(cut)


@settings(max_examples=60, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_random_masks_in_random_layouts_keep_their_meaning(data):
    """Per-axis windows, clamped windows, causal cuts, residues and linear cuts of natural
    coordinates, and/or-combined, composed with a random brick layout: the same mask at every pair."""
    dims = data.draw(st.integers(1, 3))
    brick = tuple(data.draw(st.sampled_from([1, 2, 4, 8])) for _ in range(dims))
    dil = tuple(data.draw(st.sampled_from([1, 1, 2, 3])) for _ in range(dims))
    canvas = tuple(b * d * data.draw(st.integers(1, 3)) for b, d in zip(brick, dil))
    assume(2 <= math.prod(canvas) <= 1200)
    terms = [(data.draw(st.sampled_from(["win", "clamped", "causal", "residue", "linear"])),
              data.draw(st.integers(0, 4)), data.draw(st.integers(-2, 2)), data.draw(st.booleans()))
             for _ in range(dims)]

    def mask(b, h, q, kv):
        cq, ck, rest_q, rest_k = [], [], q, kv
        for size in reversed(canvas):
            cq.insert(0, rest_q % size)
            ck.insert(0, rest_k % size)
            rest_q, rest_k = rest_q // size, rest_k // size
        m = None
        for a, (kind, k, c, conj) in enumerate(terms):
            if kind == "win":
                t = abs(cq[a] - ck[a]) <= k
            elif kind == "clamped":
                k = min(k, canvas[a] // 2)
                t = abs(cq[a].clamp(k, canvas[a] - 1 - k) - ck[a]) <= k
            elif kind == "causal":
                t = cq[a] >= ck[a]
            elif kind == "residue":
                t = (cq[a] - ck[a]) % (k + 1) == 0
            else:
                t = c * cq[a] - ck[a] + k >= 0
            m = t if m is None else (m & t) if conj else (m | t)
        return m

    _assert_composed_mask_is_the_uncancelled_one(ac.Pattern(mask).with_layout(Layout(canvas, brick, dil)))


@pytest.mark.parametrize("make", [
    lambda: ac.patterns.natten2d(32, 64, 9),
    lambda: ac.patterns.neighborhood((8, 16, 16), (3, 5, 5)),
    lambda: ac.patterns.neighborhood((16, 32), (5, 5), dilation=(2, 2)),
    lambda: ac.patterns.sliding_tile((8, 16, 16), 3, (2, 4, 4)),
], ids=["natten2d", "natten3d", "dilated-2d", "sliding-tile"])
def test_layout_block_maps_evaluate_only_partial_tiles(make, monkeypatch):
    """With the digits cancelled the interval analysis decides every EMPTY and FULL tile of a
    catalogue layout; only tiles that are PARTIAL reach pair-by-pair evaluation (before, a
    natten2d map at 64 x 32 evaluated 1536 tiles for 288 PARTIAL ones)."""
    from attncc.compiler import blockmask

    evaluated = []
    exact = blockmask._evaluate_tiles
    monkeypatch.setattr(blockmask, "_evaluate_tiles", lambda ctx, coords: evaluated.append(exact(ctx, coords))
                        or evaluated[-1])
    pat = make()
    n = pat.layout.n
    for bm, bn in [(64, 32), (128, 64)]:
        classes = blockmask.classify(pat.kernel_pattern, 1, 1, n, n, bm, bn).dense()
        assert all(bool((e == blockmask.PARTIAL).all()) for e in evaluated), (bm, bn)
        assert sum(e.numel() for e in evaluated) <= int((classes == blockmask.PARTIAL).sum())
        evaluated.clear()


def _proven_by_range(cut) -> bool:
    """Whether cancel_digits dropped the remainder's division (or modulo) on q >= 0's ranges."""
    out = cancel_digits(cut)
    return not any(isinstance(n, ir.Op) and n.op == cut.op and n.args[1] is cut.args[1] for n in ir.walk(out))


def test_first_brick_is_a_box():
    layout = Layout((8, 12), (4, 4))
    rows, cols = layout.perm[:16] // 12, layout.perm[:16] % 12
    assert set(rows.tolist()) == {0, 1, 2, 3} and set(cols.tolist()) == {0, 1, 2, 3}
    dilated = Layout((24,), (1,), 3)
    assert dilated.perm[:8].tolist() == list(range(0, 24, 3))  # the residue class 0 first


@pytest.mark.parametrize("make", [
    lambda: ac.patterns.natten2d(8, 12, 3).with_layout(Layout((8, 12), (4, 4))),
    lambda: ac.patterns.dilated(9, 3).with_layout(Layout((72,), (2,), 3)),
    lambda: (ac.Pattern(lambda b, h, q, kv: abs(q // 16 - kv // 16) + abs(q % 16 - kv % 16) <= 5)
             & ac.patterns.softcap(4.0, causal=False)).with_layout(Layout((4, 16), (2, 8))),
], ids=["natten2d", "dilated", "manhattan-softcap"])
def test_attention_in_a_layout_is_attention_in_natural_order(make):
    pat = make()
    n = pat.layout.n
    q, k, v = qkv(1, 4, 2, n, n, 16, seed=2)
    ac.testing.compare(pat, q.detach(), k.detach(), v.detach())
    check(pat, q, k, v)  # gradients against float64 autograd of the (natural-order) oracle
    kern = ac.compile(pat, q, k, v)
    assert kern.layout == pat.layout and torch.allclose(kern(q, k, v), ac.attention(q, k, v, pat))
    assert kern.pattern is pat.kernel_pattern and kern.pattern.mask is not pat.mask  # runs the composed IR


def test_bricks_cut_live_tiles_of_a_2d_neighbourhood():
    pat = ac.patterns.natten2d(32, 128, 17)  # the suite's kernel; row-major, a 128-query tile is one row
    layout = default_layout((32, 128))
    natural = ac.create_block_mask(pat, None, None, 4096, 4096, (128, 64)).to_dense()
    bricked = ac.create_block_mask(pat.with_layout(layout).kernel_pattern, None, None, 4096, 4096,
                                   (128, 64)).to_dense()
    assert int((bricked > 0).sum()) * 2 < int((natural > 0).sum())


def test_layout_errors_are_clear():
    with pytest.raises(ValueError, match="whole number of bricks"):
        Layout((10, 12), (4, 4))
    pat = ac.patterns.natten2d(8, 12, 3).with_layout(Layout((8, 12), (4, 4)))
    with pytest.raises(ValueError, match="permutes 96 tokens"):
        ac.attention(*qkv(1, 1, 1, 90, 90, 16), pat)
    with pytest.raises(ac.PatternError, match="different layouts"):
        pat & ac.patterns.causal().with_layout(Layout((96,), (1,), 2))
    assert (pat & ac.patterns.softcap(3.0, causal=False)).layout == pat.layout
    assert pat.bind().layout == pat.layout and pat.with_layout(None).layout is None
    assert default_layout((96,)) is None and default_layout((10, 14)) is None
    x = torch.randn(1, 2, 100, 3)
    for wrong in (x, x[:, :, :50]):  # never a silently dropped tail, nor an IndexError
        for move in (pat.layout.permute, pat.layout.unpermute):
            with pytest.raises(ValueError, match="permutes 96 tokens along dim 2"):
                move(wrong)
    assert torch.equal(pat.layout.unpermute(pat.layout.permute(x[:, :, :96])), x[:, :, :96])
    assert torch.equal(pat.layout.permute(x[:, :, :96].transpose(1, 2), dim=1).transpose(1, 2),
                       pat.layout.permute(x[:, :, :96]))


def test_neighbourhoods_whose_dilation_leaves_ragged_classes_get_bricks_without_it():
    """A dilation that does not divide its axis (classes of unequal length, as NATTEN allows):
    that axis keeps natural order within bricks; the other axes' classes still sit together."""
    pat = ac.patterns.neighborhood((8, 48), 3, dilation=(1, 5))
    assert pat.layout == Layout((8, 48), (8, 16), (1, 1))  # a 128-token brick, 48 % 5 != 0
    assert ac.patterns.neighborhood((16, 48), 3, dilation=(2, 5)).layout.dilation == (2, 1)
    for canvas, dilation in (((17, 16), (2, 1)), (257, 2), ((4, 8, 9), (1, 1, 2))):
        ac.patterns.neighborhood(canvas, 3, dilation=dilation)  # built (these raised from torch)
    n = 8 * 48
    q, k, v = qkv(1, 2, 1, n, n, 16)
    ac.testing.compare(pat, q.detach(), k.detach(), v.detach())


def test_torch_compile_with_a_layout():
    pat = ac.patterns.natten2d(8, 12, 3).with_layout(Layout((8, 12), (4, 4)))

    def loss(q, k, v):
        return (ac.attention(q, k, v, pat) ** 2).sum()

    q, k, v = qkv(1, 2, 2, 96, 96, 16)
    eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
    got = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(q, k, v), (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(eager, got))


def test_triton_kernels_gather_rows_instead_of_permuting(monkeypatch):
    pat = ac.patterns.natten2d(8, 12, 3).with_layout(Layout((8, 12), (4, 4), (2, 1)))
    q, k, v = qkv(1, 4, 2, 96, 96, 16, seed=3)
    kern = ac.compile(pat, q, k, v, kernel_options={"backend": "triton"})
    assert f"The natural index of kernel position p in {pat.layout!r}" in kern.source
    assert "token_row(offs_n)" in kern.backward_source

    def refuse(*_):
        raise AssertionError("a permuted copy was made")
    monkeypatch.setattr(Layout, "permute", refuse)
    monkeypatch.setattr(Layout, "unpermute", refuse)
    check(pat, q, k, v)  # forward, LSE and gradients straight from natural-order tensors


def test_gathered_rows_with_ragged_tiles_gqa_and_empty_rows():
    # 60 tokens: the last 32-row tile is ragged; 4 query heads over 2 kv heads; a query that sees
    # nothing (its row has no live key: zeros, lse -inf) through the gather and scatter
    base = ac.patterns.natten2d(6, 10, 3) & ac.Pattern(lambda b, h, q, kv: q != 17)
    pat = base.with_layout(Layout((6, 10), (2, 5)))
    q, k, v = qkv(2, 4, 2, 60, 60, 16, seed=7)
    out, lse = ac.attention(q.detach(), k.detach(), v.detach(), pat, return_lse=True)
    assert (out[:, :, 17] == 0).all() and (lse[:, :, 17] == -torch.inf).all()
    check(pat, q, k, v)


def test_dilated_runs_in_its_residue_layout():
    pat = ac.patterns.dilated(60, 4, seq_len=96)  # within a class of 24 tokens: a window of 15
    assert pat.layout == Layout((96,), (1,), 4)
    natural = ac.create_block_mask(ac.patterns.dilated(60, 4), None, None, 96, 96, 8).to_dense()
    bricked = ac.create_block_mask(pat.kernel_pattern, None, None, 96, 96, 8).to_dense()
    assert int((bricked == 2).sum()) > 0 == int((natural == 2).sum())  # dense tiles only in the layout
    q, k, v = qkv(1, 2, 2, 96, 96, 16, seed=5)
    kern = ac.compile(pat, q, k, v, kernel_options={"fold": False})  # else the residue fold (runtime/fold.py) runs
    assert kern.layout == pat.layout and "fold" not in kern.config
    check(pat, q, k, v, kernel_options={"fold": False})
    assert ac.patterns.dilated(12, 5, seq_len=96).layout is None  # 96 % 5: natural order


def test_buffer_gradients_in_a_layout():
    table = torch.randn(2 * 96 - 1).requires_grad_()
    pat = (ac.patterns.natten2d(8, 12, 3)
           & ac.Pattern(score_mod=lambda s, b, h, q, kv: s + table[q - kv + 95])).with_layout(Layout((8, 12), (4, 4)))
    q, k, v = qkv(1, 2, 2, 96, 96, 16, seed=7)
    ours = torch.autograd.grad((ac.attention(q, k, v, pat) ** 2).sum(), (table,))[0]
    leaf = table.detach().double().requires_grad_()
    qd, kd, vd = (t.detach().double() for t in (q, k, v))
    ref = torch.autograd.grad((ac.reference(qd, kd, vd, pat.bind(table=leaf)) ** 2).sum(), (leaf,))[0]
    assert ((ours.double() - ref).norm() / ref.norm()).item() < 1e-4


def test_copies_and_pickles_keep_the_layout():
    import copy
    import pickle

    pat = ac.patterns.natten2d(8, 16, 3)
    for other in (pickle.loads(pickle.dumps(pat)), copy.deepcopy(pat), copy.copy(pat)):
        assert other == pat and other.layout == pat.layout
        assert other.kernel_pattern.mask is pat.kernel_pattern.mask


def test_neighbourhood_bricks_are_chosen_by_exact_tile_counts():
    import importlib

    from attncc.compiler.blockmask import build_block_mask

    nb = importlib.import_module("attncc.patterns.neighborhood")  # the module, not the function

    dims, ks, ds = (4, 16, 16), (3, 5, 5), (1, 1, 1)
    windows = [nb._axis_pairs(n, k, d, 1, False, d) for n, k, d in zip(dims, ks, ds)]
    plain = ac.patterns.neighborhood(dims, ks)
    for brick in [(2, 8, 8), (4, 4, 8), (1, 8, 16), (4, 8, 4)]:
        for block_m, block_n in [(128, 64), (64, 32), (64, 64), (32, 64)]:
            bm = build_block_mask(plain.with_layout(Layout(dims, brick)).kernel_pattern, None, None, 1024, 1024,
                                  block_m, block_n)
            live, full = nb.tile_counts(windows, brick, block_m, block_n)
            assert (live, full) == (int(bm.full_kv_num.sum() + bm.partial_kv_num.sum()), int(bm.full_kv_num.sum()))
    assert nb.tile_counts(windows, (1, 3, 1)) is None  # a 3-token brick holds no 128-token tile
    assert nb.tile_box((3, 8, 8), 64) == (1, 8, 8) and nb.tile_box((3, 8, 8), 128) is None
    assert nb.tile_box((8, 4, 4), 32) == (2, 4, 4) and nb.tile_box((2, 8, 8), 32) == (1, 4, 8)
    video = ac.patterns.neighborhood((8, 32, 32), (5, 9, 9))
    assert video.layout == Layout((8, 32, 32), (8, 4, 4))  # its 5x9x9 window, not the 2x8x8 default


def test_neighbourhood_bricks_suit_the_tiles_that_run():
    """A 16x32x32 clip, kernel 5x9x9: 128 x 64 tiles alone prefer 4x4x8 bricks, which leave the 64 x 32
    tiles the models pick for neighbourhoods 37% more score pairs to compute than 8x4x4 ones."""
    from attncc.compiler.blockmask import build_block_mask

    dims, n = (16, 32, 32), 16 * 32 * 32
    pat = ac.patterns.neighborhood(dims, (5, 9, 9))
    assert pat.layout == Layout(dims, (8, 4, 4))

    def live_tiles(brick):
        bm = build_block_mask(pat.with_layout(Layout(dims, brick)).kernel_pattern, None, None, n, n, 64, 32)
        return int(bm.full_kv_num.sum() + bm.partial_kv_num.sum())
    assert live_tiles((8, 4, 4)) * 1.3 < live_tiles((4, 4, 8))
