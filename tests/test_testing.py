"""attncc.testing.check_pattern: the user's property test of a pattern."""
import pytest
import torch

import attncc as ac
import attncc.testing as testing
from attncc.dsl import ir


def test_buffers_cap_the_lengths_and_heads_drawn():
    doc = ac.patterns.lengths_to_ids([30, 25, 20])          # 75 tokens, far below max_len
    report = testing.check_pattern(ac.patterns.document(ids=doc), max_examples=4, max_len=200)
    calls = [r for r in report.rows if "decode" not in r]
    assert calls and all(r["q"][2] <= 75 and r["k"][2] <= 75 for r in calls)
    assert all(max(r["kv_lens"]) <= 75 for r in report.rows if "decode" in r)
    report = testing.check_pattern(ac.patterns.alibi(2), max_examples=3, max_len=40)  # slopes for 2 heads
    assert all(r["q"][1] <= 2 for r in report.rows)
    with pytest.raises(ac.PatternError, match="must stay inside"):
        testing.check_pattern(ac.Pattern(lambda b, h, q, kv: doc[q + 80] > 0))


def test_each_distinct_failure_is_reported_with_its_smallest_example(monkeypatch):
    def fake_compare(pattern, q, k, v, **options):
        if q.shape[2] % 2:
            raise ValueError(f"odd length {q.shape[2]}")
        raise AssertionError(f"even length {q.shape[2]}")
    monkeypatch.setattr(testing, "compare", fake_compare)
    with pytest.raises(AssertionError) as info:
        testing.check_pattern(ac.patterns.causal(), max_examples=20, max_len=30)
    text = str(info.value)
    assert "2 distinct failures" in text and "ValueError: odd length 1" in text
    assert "AssertionError: even length 2" in text and text.count("Falsifying example") + text.count("Failing test case") == 2


def test_gradients_and_classification_are_checked(monkeypatch):
    table = torch.randn(2 * 40 - 1)
    pat = ac.Pattern(lambda b, h, q, kv: q >= kv, lambda s, b, h, q, kv: s + table[q - kv + 39])
    report = testing.check_pattern(pat, max_examples=3, max_len=40)
    assert all("dtable_err" in r and "dq_err" in r for r in report.rows if "decode" not in r)
    # a kernel whose gradients are off by 1% must fail
    import attncc.runtime.kernel as kernel

    real = kernel.Kernel.backward
    monkeypatch.setattr(kernel.Kernel, "backward", lambda self, *a: tuple(g * 1.01 for g in real(self, *a)))
    monkeypatch.setattr(testing, "SHRINK_SECONDS", 3.0)  # any failing example will do here
    with pytest.raises(AssertionError, match="relative error"):
        testing.check_pattern(ac.patterns.causal(), max_examples=2, max_len=30)


def test_unsound_classification_is_caught(monkeypatch):
    import attncc.runtime.api as api

    real = api.create_block_mask

    def all_full(*args, **kwargs):  # claims every tile FULL
        bm = real(*args, **kwargs)
        monkeypatch.setattr(type(bm), "to_dense", lambda self: torch.full(self.shape, 2, dtype=torch.int8))
        return bm
    monkeypatch.setattr(api, "create_block_mask", all_full)
    monkeypatch.setattr(testing, "SHRINK_SECONDS", 3.0)  # any failing example will do here
    # decode=False: the serving steps' tile lists would come from the same false map and fail first
    with pytest.raises(AssertionError, match="FULL tile .* holds dead pairs"):
        testing.check_pattern(ac.patterns.causal(), max_examples=2, max_len=40, grad=False, decode=False)


def test_a_pattern_with_a_layout_is_checked_in_and_out_of_it():
    pat = ac.patterns.natten2d(8, 16, 3)
    assert pat.layout is not None
    report = testing.check_pattern(pat, max_examples=6, max_len=60, grad=False)
    calls = [r for r in report.rows if "decode" not in r]
    assert {r["layout"] for r in calls} == {True, False}
    assert all(r["q"][2] == 128 for r in calls if r["layout"])


def test_check_pattern_passes_kernel_options():
    report = ac.testing.check_pattern(ac.patterns.sliding_window(5), max_examples=2, max_len=40, grad=False,
                                      kernel_options={"backend": "triton"})
    assert len(report.rows) == 4 and str(report).startswith("2 examples and 2 serving steps passed")
    with pytest.raises(ValueError, match="backend='fa4' runs on CUDA only"):
        ac.testing.check_pattern(ac.patterns.sliding_window(5), max_examples=1, max_len=40, grad=False,
                                 device="cpu", kernel_options={"backend": "fa4"})


def test_lse_near_zero_is_compared_by_its_absolute_error(monkeypatch):
    """Found by fuzzing: one live key whose score rounds near 0 (lse -2.1e-4, off by 5e-11 in
    float32) is no mismatch; an lse off by 1e-3 (each softmax weight of its row off by 0.1%) is."""
    pattern = ac.Pattern(lambda b, h, q, kv: q - h >= kv, score_mod=lambda s, b, h, q, kv: s + (kv - q) * (1.0 / (h + 2)))
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 6, 1, 32, generator=g), torch.randn(1, 2, 1, 32, generator=g), torch.randn(1, 2, 1, 32, generator=g)
    row = testing.compare(pattern, q, k, v)
    assert 0 < row["lse_err"] < 1e-6
    from attncc.runtime import api

    exact = api.attention
    monkeypatch.setattr(api, "attention", lambda *a, **o: (lambda out, lse: (out, lse + 1e-3))(*exact(*a, **o)))
    with pytest.raises(AssertionError, match="lse 1.00e-03"):
        testing.compare(pattern, q, k, v)


def test_given_shapes_dtypes_and_the_strategies():
    """check_pattern(pattern, shapes, dtypes): the listed shapes (those of a layout's length in the
    layout), the dtypes drawn from; patterns() and inputs() serve a user's own hypothesis tests."""
    from hypothesis import given, settings

    pat = ac.patterns.natten2d(8, 16, 3)
    report = testing.check_pattern(pat, [(1, 2, 1, 37, 50, 16), (1, 1, 1, 128, 128, 32)],
                                   [torch.float32, torch.bfloat16], max_examples=6, grad=False)
    calls = [r for r in report.rows if "decode" not in r]
    assert {r["q"] for r in calls} <= {(1, 2, 37, 16), (1, 1, 128, 32)}
    assert all(r["layout"] == (r["q"][2] == 128) for r in calls)
    steps = [r for r in report.rows if "decode" in r]  # one serving step per example, from its shape
    assert len(steps) == len(calls) and all(r["q"][1] in (1, 2) and max(r["kv_lens"]) in (50, 128) for r in steps)
    assert len(testing.check_pattern(ac.patterns.causal(), [(1, 1, 1, 9, 9, 16)], None, max_examples=2,
                                     decode=False).rows) == 2
    with pytest.raises(ValueError, match="Hq a multiple of Hkv"):
        testing.check_pattern(ac.patterns.causal(), [(1, 3, 2, 9, 9, 16)])
    with pytest.raises(ValueError, match="dtypes must be some of"):
        testing.check_pattern(ac.patterns.causal(), dtypes=[torch.float64])
    doc = ac.patterns.lengths_to_ids([30, 25, 20])
    with pytest.raises(ValueError, match="not defined at shapes"):
        testing.check_pattern(ac.patterns.document(ids=doc), [(1, 1, 1, 80, 80, 16)])

    @settings(max_examples=3, deadline=None, database=None)
    @given(pattern=testing.patterns(), qkv=testing.inputs(max_len=40))
    def users_test(pattern, qkv):
        q, k, v = qkv
        assert q.shape[1] % k.shape[1] == 0 and k.shape == v.shape and q.dtype == torch.float32
        testing.compare(pattern, q, k, v)

    users_test()


@pytest.mark.parametrize("bad, message", [
    ({"head_dims": ()}, "head_dims must be ints in 16..256"), ({"head_dims": (8,)}, "head_dims must be ints"),
    ({"shapes": [(1, 1, 1, 4, 4, 8)]}, "D in 16..256"), ({"max_len": 0}, "max_len must be a positive int"),
    ({"max_examples": 0}, "max_examples must be a positive int"), ({"grad": "no"}, "grad must be True or False"),
])
def test_check_pattern_refuses_bad_arguments_as_such(bad, message):
    """Bad arguments are a ValueError, never reported as a failure of the pattern."""
    with pytest.raises(ValueError, match=message):
        ac.testing.check_pattern(ac.patterns.causal(), **bad)


def test_a_missing_buffer_gradient_is_named(monkeypatch):
    table = torch.randn(2, 9, requires_grad=True)
    pattern = ac.patterns.relative_bias(table)
    real = ac.runtime.api.attention

    def detached(q, k, v, p, **kw):  # a kernel that drops the table's gradient
        return real(q, k, v, p.bind(**{n: t.detach() for n, t in p.buffers.items()}), **kw)
    monkeypatch.setattr(ac.runtime.api, "attention", detached)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 16, generator=g) for _ in range(3))
    with pytest.raises(AssertionError, match="no gradient for dtable from attncc's kernels"):
        testing.compare_grads(pattern, q, k, v)


def test_serving_steps_are_checked_paged_and_packed(monkeypatch):
    """Each example also runs a decode step over paged caches or packed sequences (the split-KV
    decode kernel), its queries at the end of each sequence; a decode kernel off by 1% fails it,
    and a pattern with block predicates (which those calls refuse) runs none."""
    report = testing.check_pattern(ac.patterns.sinks(2, 7), max_examples=6, max_len=60, grad=False)
    steps = [r for r in report.rows if "decode" in r]
    assert len(steps) == 6 and {r["decode"] for r in steps} == {"paged", "packed"}
    assert all(1 <= r["q"][2] <= 8 and max(r["kv_lens"]) >= r["q"][2] for r in steps)
    from attncc.runtime.decode import DecodeKernel

    real = DecodeKernel.forward
    monkeypatch.setattr(DecodeKernel, "forward", lambda self, *a, **kw: (lambda o: (o[0] * 1.01, o[1]))(
        real(self, *a, **kw)))
    monkeypatch.setattr(testing, "SHRINK_SECONDS", 3.0)  # any failing example will do here
    with pytest.raises(AssertionError, match="'decode'"):
        testing.check_pattern(ac.patterns.causal(), max_examples=2, max_len=40, grad=False)
    blocky = ac.Pattern.from_ir(block=ir.op("ge", ir.Var("qb"), ir.Var("kb")), block_size=16)
    report = testing.check_pattern(blocky, max_examples=2, max_len=40, grad=False)
    assert report.rows and not any("decode" in r for r in report.rows)
