"""The interval / tri-state domain: exactness where promised (without element-wise evaluation),
soundness on modular, buffer and float expressions, and the bounds check."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import attncc as ac
from attncc.compiler import intervals
from attncc.compiler.blockmask import classify
from attncc.dsl import ir
from attncc.dsl.pattern import Pattern
from test_blockmask import tile_truth

Q, KV = ir.Var("q"), ir.Var("kv")
c = ir.const


def classes(pattern, N, KVN, BM, BN, refine, S=None, B=1, H=1):
    return classify(pattern, B, H, N, KVN, BM, BN, refine=refine, super_tile=S).dense()


def box_of(q_lo, q_hi, kv_lo, kv_hi, buffers=None):
    t = lambda v: torch.tensor(v, dtype=torch.float64)
    return intervals.Box(t(q_lo).view(1, 1, -1, 1), t(q_hi).view(1, 1, -1, 1), t(kv_lo).view(1, 1, 1, -1),
                         t(kv_hi).view(1, 1, 1, -1), t([0.0]).view(1, 1, 1, 1), t([0.0]).view(1, 1, 1, 1),
                         {}, buffers or {}, {})


def test_linear_forms_cancel_and_bound_from_corners():
    box = box_of([0.0, 10.0], [9.0, 19.0], [5.0], [7.0])
    e = ir.op("sub", ir.op("add", ir.op("mul", Q, c(2)), KV), ir.op("add", Q, KV))   # == q
    tri = intervals.analyse(ir.op("ge", e, c(5)), box)
    assert tri.t.flatten().tolist() == [False, True] and tri.f.flatten().tolist() == [False, False]
    assert tri.exact is True   # q's bounds are attained: row 0 is certainly mixed


def test_floordiv_and_mod_of_aligned_tiles_are_points():
    box = box_of([0.0, 16.0], [15.0, 31.0], [0.0, 8.0], [7.0, 15.0])
    tri = intervals.analyse(ir.op("eq", ir.op("floordiv", Q, c(16)), ir.op("floordiv", KV, c(8))), box)
    assert tri.t.flatten().tolist() == [True, False, False, True]
    assert tri.f.flatten().tolist() == [False, True, True, False]


@settings(max_examples=60, deadline=None)
@given(st.integers(-2, 2), st.integers(-2, 2), st.integers(-9, 9), st.sampled_from([2, 3, 4, 7, 16]),
       st.integers(0, 6), st.sampled_from(["eq", "ne", "lt", "ge"]), st.integers(1, 80),
       st.sampled_from([1, 2, 3, 5, 8, 16]), st.sampled_from([1, 3, 7, 16]))
def test_modular_masks_sound_and_exact_after_refinement(a, b, e, d, r, cmp, N, BM, BN):
    form = ir.op("add", ir.op("add", ir.op("mul", Q, c(a)), ir.op("mul", KV, c(b))), c(e))
    pat = Pattern.from_ir(ir.op(cmp, ir.op("mod", form, c(d)), c(r % d)))
    truth = tile_truth(pat, 1, 1, N, N, BM, BN)
    rough = classes(pat, N, N, BM, BN, refine=False)
    assert bool(((rough == truth) | (rough == 1)).all())
    assert torch.equal(classes(pat, N, N, BM, BN, refine=True), truth)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=60), st.booleans(), st.booleans(),
       st.sampled_from([1, 2, 4, 8]), st.sampled_from([None, 1, 2]))
def test_documents_with_any_ids_sound_and_exact(ids, sort, causal, BM, S):
    doc = torch.tensor(sorted(ids) if sort else ids)
    pat = ac.patterns.document(ids=doc, causal=causal)
    N = len(ids)
    truth = tile_truth(pat, 1, 1, N, N, BM, BM)
    rough = classes(pat, N, N, BM, BM, refine=False, S=S)
    assert bool(((rough == truth) | (rough == 1)).all())
    assert torch.equal(classes(pat, N, N, BM, BM, refine=True, S=S), truth)


def test_natten_on_aligned_tiles_needs_no_evaluation():
    pat = ac.patterns.natten2d(16, 32, 5)
    assert torch.equal(classes(pat, 512, 512, 32, 32, refine=False), tile_truth(pat, 1, 1, 512, 512, 32, 32))


def test_block_predicate_on_its_own_grid_needs_no_evaluation():
    sel = torch.rand(2, 5, 7, generator=torch.Generator().manual_seed(0)) < 0.5   # [H, QB, KB]
    pat = Pattern(lambda b, h, q, kv: q >= kv, block_mask_mod=lambda b, h, qb, kb: sel[h, qb, kb],
                  block_size=(16, 8))
    truth = tile_truth(pat, 1, 2, 70, 50, 16, 8)
    got = classes(pat, 70, 50, 16, 8, refine=False, H=2)
    assert torch.equal(got, truth)
    assert bool((got[sel.unsqueeze(0) == 0] == 0).all())
    coarser = classes(pat, 70, 50, 32, 16, refine=True, H=2)   # another tile size: exact after evaluation
    assert torch.equal(coarser, tile_truth(pat, 1, 2, 70, 50, 32, 16))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["exp", "log", "sqrt", "tanh", "sigmoid"]), st.floats(-3, 3), st.integers(1, 50),
       st.sampled_from([1, 4, 16]))
def test_float_buffers_and_functions_are_sound(fn, thresh, N, BM):
    w = torch.randn(N, generator=torch.Generator().manual_seed(N)).abs() + 0.01
    x = ir.op("truediv", ir.op("sub", ir.load("w", (Q,)), ir.load("w", (KV,))), c(2.0))
    mask = ir.op("lt", ir.op(fn, ir.op("add", x, c(1.5))), c(float(thresh)))
    pat = Pattern.from_ir(mask, buffers={"w": w})
    truth = tile_truth(pat, 1, 1, N, N, BM, BM)
    rough = classes(pat, N, N, BM, BM, refine=False)
    assert bool(((rough == truth) | (rough == 1)).all())
    assert torch.equal(classes(pat, N, N, BM, BM, refine=True), truth)


def test_index_that_may_leave_its_buffer_is_an_error():
    table = torch.arange(10)
    pat = Pattern(lambda b, h, q, kv: table[q - kv] > 3)   # q - kv < 0 for kv > q
    with pytest.raises(ac.PatternError, match=r"index q - kv of buffer 'table' must stay inside dim 0 .* fails at b=0, h=0, q=0, kv=1"):
        ac.create_block_mask(pat, 1, 1, 10, 10, block_size=4)
    guarded = Pattern(lambda b, h, q, kv: table[(q - kv).clamp(0, 9)] > 3)
    assert torch.equal(classes(guarded, 10, 10, 4, 4, refine=True), tile_truth(guarded, 1, 1, 10, 10, 4, 4))


def test_division_by_a_range_containing_zero_is_unknown_not_wrong():
    pat = Pattern.from_ir(ir.op("ge", ir.op("floordiv", c(100), ir.op("add", ir.op("sub", Q, KV), c(50))), c(2)))
    truth = tile_truth(pat, 1, 1, 40, 40, 8, 8)
    rough = classes(pat, 40, 40, 8, 8, refine=False)
    assert bool(((rough == truth) | (rough == 1)).all())


def test_strided_index_bounds_are_not_claimed_attained():
    w = torch.tensor([0, 5] * 16)   # even positions 0, odd 5: w[2q] is always 0
    pat = Pattern(lambda b, h, q, kv: w[(2 * q).clamp(max=31)] == 5)
    assert int((classes(pat, 15, 8, 4, 8, refine=True) != 0).sum()) == 0


def test_huge_integer_buffers_are_evaluated_exactly():
    ids = torch.tensor([2 ** 60, 2 ** 60 + 1] * 8)   # equal in float64, different in int64
    pat = Pattern(lambda b, h, q, kv: ids[q] == ids[kv])
    assert torch.equal(classes(pat, 16, 16, 1, 1, refine=True), tile_truth(pat, 1, 1, 16, 16, 1, 1))
