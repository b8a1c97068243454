"""Residue folds (runtime/fold.py, compiler/bands.residues): a dilated mask's residue classes run as
the heads of one call on views. The decomposition is exact pair by pair, folded calls match the
float64 oracle (outputs, LSE, gradients; odd class lengths, cross lengths, empty rows, softcap),
they read views and return natural order, and calls that cannot fold do not."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attncc as ac
from attncc.compiler import bands
from attncc.runtime.fold import fold_for
from attncc.runtime.inputs import check_qkv
from test_backward import check, qkv


def unfolded_mask(found: bands.Residues, params: dict, Q: int, KV: int) -> torch.Tensor:
    """The natural-order [Q, KV] mask the residue decomposition describes: pairs of one class whose
    class-local positions the folded mask keeps."""
    s = found.stride
    local = ac.create_mask(ac.Pattern.from_ir(found.mask, params=params), None, None, Q // s, KV // s)[0, 0]
    q, kv = torch.arange(Q)[:, None], torch.arange(KV)[None]
    return (q % s == kv % s) & local[q // s, kv // s]


RESIDUE_FORMS = ["(q - kv) % {s} == 0", "(kv - q) % {s} == 0", "q % {s} == kv % {s}", "(q - kv + {s}) % {s} == 0"]
RESTS = ["", " and abs(q - kv) <= {w}", " and q >= kv and q - kv <= {w}", " and kv - q > 2", " and not (q - kv < -{w})"]


@settings(max_examples=120, deadline=None)
@given(st.sampled_from(RESIDUE_FORMS), st.sampled_from(RESTS), st.integers(2, 5), st.integers(0, 30),
       st.integers(1, 9), st.integers(1, 9))
def test_the_decomposition_is_exact(form, rest, s, w, qn, kvn):
    text = "mask = " + (form + rest).format(s=s, w=w)
    pattern = ac.parse(text)
    Q, KV = s * qn, s * kvn
    found = bands.residues(pattern.mask, pattern.params, Q, KV)
    assert found is not None and found.stride == s, text
    assert torch.equal(unfolded_mask(found, pattern.params, Q, KV), ac.create_mask(pattern, None, None, Q, KV)[0, 0])


@pytest.mark.parametrize("text, Q, KV", [
    ("mask = (q - kv) % 4 == 0 and kv < 100", 64, 64),        # the rest reads kv alone: classes differ
    ("mask = (q - kv) % 4 == 0", 62, 64),                     # lengths not multiples of the stride
    ("mask = (q - kv) % 4 == 1", 64, 64),                     # q = kv + 1 (mod 4): not a class to itself
    ("mask = (2 * q - kv) % 4 == 0", 64, 64),
    ("mask = (q - kv) % 1 == 0", 64, 64),
    ("mask = q % 4 == kv % 3", 48, 48),
    ("mask = (q - kv) % 4 == 0 or q == kv", 64, 64),
])
def test_what_is_not_residue_classes(text, Q, KV):
    pattern = ac.parse(text)
    assert bands.residues(pattern.mask, pattern.params, Q, KV) is None


CALLS = {  # pattern, (B, Hq, Hkv, Q, KV, D)
    "dilated": (lambda: ac.patterns.dilated(40, 4), (2, 3, 3, 100, 100, 16)),            # 25 per class: ragged tiles
    "causal_softcap": (lambda: ac.patterns.dilated(30, 3) & ac.patterns.causal() & ac.patterns.softcap(5.0, causal=False),
                       (1, 2, 2, 87, 87, 32)),
    "cross_lengths": (lambda: ac.parse("mask = (kv - q) % 3 == 0 and kv - q <= 20"), (1, 2, 2, 45, 66, 16)),
    "empty_rows": (lambda: ac.parse("mask = (q - kv) % 2 == 0 and q - kv >= 30"), (1, 1, 1, 64, 64, 16)),
    "classes_only": (lambda: ac.parse("mask = q % 5 == kv % 5"), (1, 2, 2, 40, 40, 16)),
    "gqa": (lambda: ac.patterns.dilated(30, 4) & ac.patterns.causal(), (2, 4, 2, 64, 64, 16)),  # [B, s*H, N/s, D]
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_folded_calls_match_the_oracle(name):
    make, shape = CALLS[name]
    pattern = make()
    q, k, v = qkv(*shape, seed=3)
    kern = ac.compile(pattern, q, k, v)
    assert kern.config["fold"].startswith("residue classes mod") and kern.layout is None
    ac.testing.compare(pattern, q.detach(), k.detach(), v.detach())   # outputs, LSE, empty rows, NaN placement
    check(pattern, q, k, v)                                            # gradients (through the LSE too)
    if name == "empty_rows":
        out, lse = ac.attention(q.detach(), k.detach(), v.detach(), pattern, return_lse=True)
        assert (out[:, :, :30] == 0).all() and (lse[:, :, :30] == -torch.inf).all()


def test_the_fold_reads_views_and_returns_natural_order():
    pattern = ac.patterns.dilated(24, 4)
    q, k, v = (t.detach() for t in qkv(2, 3, 3, 64, 64, 16, seed=1))
    s = check_qkv(q, k, v)
    fold = fold_for(pattern, s, {})
    assert fold.stride == 4 and fold.shapes(s) == type(s)(6, 4, 4, 16, 16, 16, 16)
    view = fold.fold(q)
    assert view.data_ptr() == q.data_ptr() and view.shape == (6, 4, 16, 16)
    assert torch.equal(view[1 * 3 + 2, 3, 5], q[1, 2, 4 * 5 + 3])    # token 4*5 + 3 of (1, 2): head 3, row 5
    assert torch.equal(fold.unfold(view), q)
    # inputs laid out [B, N, H, D], as models make them: classes and heads as heads, [B, 4*H, N/4, D]
    t = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]
    fold = fold_for(pattern, s, {}, t)
    assert not fold.by_batch and fold.shapes(s) == type(s)(2, 12, 12, 16, 16, 16, 16)
    view = fold.fold(t[0])
    assert view.data_ptr() == t[0].data_ptr() and torch.equal(view[1, 3 * 3 + 2, 5], q[1, 2, 4 * 5 + 3])
    assert torch.equal(fold.unfold(view), q)
    assert torch.equal(ac.attention(*t, pattern), ac.attention(q, k, v, pattern))
    # GQA folds only so ([B*Hq, ...] batches would not match k's); contiguous inputs are then copied
    k2, v2 = (x[:, :1] for x in (k, v))
    gqa = fold_for(pattern, check_qkv(q, k2, v2), {}, (q, k2, v2))
    assert not gqa.by_batch and gqa.shapes(check_qkv(q, k2, v2)).Hkv == 4


@pytest.mark.parametrize("pattern, shape, options", [
    (lambda: ac.patterns.dilated(24, 4), (1, 2, 2, 66, 66, 16), {}),                 # 66 % 4
    (lambda: ac.patterns.dilated(24, 4), (1, 2, 2, 64, 64, 16), {"fold": False}),
    (lambda: ac.patterns.dilated(24, 4) & ac.patterns.alibi(2), (1, 2, 2, 64, 64, 16), {}),  # the score reads h, q, kv
    (lambda: ac.Pattern(lambda b, h, q, kv: (q - kv) % 4 == 0, block_mask_mod=lambda b, h, qb, kb: qb >= kb,
                        block_size=16), (1, 2, 2, 64, 64, 16), {}),
])
def test_calls_that_do_not_fold_still_run_exactly(pattern, shape, options):
    pattern = pattern()
    q, k, v = qkv(*shape, seed=4)
    assert "fold" not in ac.compile(pattern, q, k, v, kernel_options=options).config
    check(pattern, q, k, v, kernel_options=options)


def test_a_layout_stays_unless_fa4_or_a_faster_prediction_runs_the_fold(monkeypatch):
    """With a token layout, attncc's Triton kernels gather its rows in place, while a folded Triton
    call's output is copied back: the cost model keeps the layout unless the folded kernel is
    predicted faster by more than the copy (on the CPU, unmodelled, the layout stays); on a GPU
    where fa4 runs the folded call, the fold replaces the layout."""
    pattern = ac.patterns.dilated(40, 4, seq_len=96)
    q, k, v = qkv(1, 2, 2, 96, 96, 16, seed=2)
    kern = ac.compile(pattern, q, k, v)  # the CPU: Triton
    assert kern.layout == pattern.layout and "fold" not in kern.config
    meta = torch.empty(4, 16, 8192, 128, dtype=torch.bfloat16, device="meta")
    on_h200 = ac.compile(ac.patterns.dilated(2048, 4, seq_len=8192), meta, meta, meta, target="h200")
    assert on_h200.backend == "fa4" and on_h200.layout is None and "fold" in on_h200.config
    forced = ac.compile(ac.patterns.dilated(2048, 4, seq_len=8192), meta, meta, meta, target="h200",
                        kernel_options={"backend": "triton"})
    assert forced.layout is not None and "fold" not in forced.config  # predicted 0.716 folded vs 0.711 laid out
    from attncc.compiler import cost
    from attncc.runtime import choices

    copy_ms = 2 * 4 * 16 * 8192 * 128 * 2 / (cost.load_profile("h200").hbm_tbps * 1e12) * 1e3  # O, read + write
    for folded_ms, folds in ((1.0 - copy_ms - 0.01, True), (1.0 - copy_ms + 0.01, False)):
        monkeypatch.setattr(choices, "modelled_ms", lambda kp, s, backend, tiles, *rest, f=folded_ms:
                            f if s.Q == 2048 else 1.0)  # the folded call's classes have 2048 tokens
        kern = ac.compile(ac.patterns.dilated(2048, 4, seq_len=8192), meta, meta, meta, target="h200",
                          kernel_options={"backend": "triton"})
        assert ("fold" in kern.config, kern.layout is None) == (folds, folds), folded_ms


def test_explain_and_target_report_the_fold():
    q = torch.empty(4, 16, 8192, 128, dtype=torch.bfloat16, device="meta")
    kern = ac.compile(ac.patterns.dilated(2048, 4), q, q, q, target="h200")
    assert kern.config["fold"].startswith("residue classes mod 4") and kern.layout is None
    assert kern.shapes.B == 64 and kern.shapes.Hq == 4 and kern.shapes.Q == 2048
    q, k, v = (t.detach() for t in qkv(1, 2, 2, 64, 64, 16))
    assert "runs folded: residue classes mod 4" in ac.explain(ac.patterns.dilated(24, 4), q, k, v)


def test_torch_compile_runs_the_fold():
    pattern = ac.patterns.dilated(20, 3)

    def loss(q, k, v):
        out, lse = ac.attention(q, k, v, pattern, return_lse=True)
        return (out * out).sum() + lse.sum()

    q, k, v = qkv(1, 2, 2, 48, 48, 16, seed=6)
    eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    assert all(torch.equal(a, b) for a, b in zip(eager, torch.autograd.grad(compiled(q, k, v), (q, k, v))))
