"""The generated backward kernels (interpreter, CPU) against float64 autograd through ac.reference."""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attncc as ac
from attncc.testing import random_patterns, shapes

SETTINGS = settings(max_examples=10, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))
TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}


def qkv(B, Hq, Hkv, Q, KV, D, dtype=torch.float32, Dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g).to(dtype).requires_grad_()  # noqa: E731
    return make(B, Hq, Q, D), make(B, Hkv, KV, D), make(B, Hkv, KV, Dv or D)


def grads(pattern, q, k, v, w_out, w_lse, kernel_options=None):
    """d(sum(out * w_out) + sum(lse * w_lse over live rows))/d(q, k, v), by attncc's kernels."""
    out, lse = ac.attention(q, k, v, pattern, return_lse=True, kernel_options=kernel_options)
    loss = (out.float() * w_out).sum() + torch.where(torch.isinf(lse), 0.0, lse * w_lse).sum()
    return torch.autograd.grad(loss, (q, k, v))


def oracle(pattern, q, k, v, w_out, w_lse):
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = ac.reference(qd, kd, vd, pattern, return_lse=True)
    loss = (out * w_out.double()).sum() + torch.where(torch.isinf(lse), 0.0, lse * w_lse.double()).sum()
    return torch.autograd.grad(loss, (qd, kd, vd))


def check(pattern, q, k, v, seed=0, kernel_options=None):
    g = torch.Generator().manual_seed(seed + 1)
    w_out = torch.randn(*q.shape[:3], v.shape[3], generator=g)
    w_lse = torch.randn(*q.shape[:3], generator=g)
    ours = grads(pattern, q, k, v, w_out, w_lse, kernel_options)
    want = oracle(pattern, q, k, v, w_out, w_lse)
    for name, a, b, t in zip("qkv", ours, want, (q, k, v)):
        assert a.dtype == t.dtype and a.shape == t.shape, name
        assert not a.isnan().any(), f"NaN in d{name} for {pattern!r}"
        err = ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()
        assert err < TOL[q.dtype], f"d{name}: relative error {err:.2e} for {pattern!r}, q {tuple(q.shape)}"
    return ours


@SETTINGS
@given(pattern=random_patterns(), shape=shapes(max_len=90), seed=st.integers(0, 1000))
def test_random_patterns_gradients_match_the_oracle(pattern, shape, seed):
    """Affine/modular masks, softcap/alibi/relpos score mods, odd lengths, Q_LEN != KV_LEN, GQA,
    D 16..64, rows with no live key: dq, dk, dv against float64 autograd."""
    check(pattern, *qkv(*shape, seed=seed), seed=seed)


@pytest.mark.parametrize("pattern", [
    ac.patterns.document([17, 30, 9, 21]) & ac.patterns.softcap(8.0, causal=False),
    ac.patterns.alibi(6),
    ac.patterns.dilated(20, 3),
    ac.patterns.natten2d(7, 11, 3),
    ac.Pattern(lambda b, h, q, kv: q >= kv + 30),  # the first 30 rows see nothing
], ids=["document-softcap", "alibi", "dilated", "natten2d", "empty-rows"])
def test_catalogue_gradients(pattern):
    check(pattern, *qkv(1, 6, 3, 77, 77, 32, Dv=24))


@pytest.mark.parametrize("pattern, Q", [(ac.patterns.causal(), 77), (ac.patterns.sinks(3, 20), 150),
                                        (ac.Pattern(lambda b, h, q, kv: (q - kv >= 40) & (q - kv < 70)), 150)],
                         ids=["causal-77x150", "sinks", "empty-rows"])
def test_every_backward_candidate_pair_is_exact(pattern, Q):
    """The tile pairs the cost model picks between on the GPU (choices.BACKWARD_CANDIDATES, every head
    dim class's), forced in the interpreter: odd lengths, GQA, rows that see nothing."""
    from attncc.runtime.choices import BACKWARD_CANDIDATES, tile_tuple

    q, k, v = qkv(2, 4, 2, Q, 150, 16)
    g = torch.Generator().manual_seed(1)
    w_out, w_lse = torch.randn(2, 4, Q, 16, generator=g), torch.randn(2, 4, Q, generator=g)
    want = oracle(pattern, q, k, v, w_out, w_lse)
    for pair in sorted({p for pairs in BACKWARD_CANDIDATES.values() for p in pairs}, key=str):
        ours = grads(pattern, q, k, v, w_out, w_lse, {"dkdv_tiles": tile_tuple(pair.dkdv), "dq_tiles": tile_tuple(pair.dq)})
        for a, b in zip(ours, want):
            assert ((a.double() - b).norm() / b.norm()).item() < TOL[torch.float32], pair


def test_cross_lengths_and_16_bit():
    check(ac.patterns.causal(offset=40), *qkv(2, 2, 1, 33, 73, 16))
    for dtype in (torch.float16, torch.bfloat16):
        dq, dk, dv = check(ac.Pattern(lambda b, h, q, kv: q >= kv + 10), *qkv(1, 2, 2, 50, 50, 16, dtype=dtype))
        assert dq[:, :, :10].abs().max() == 0  # rows with no live key: zero gradients, no NaN


def test_gradients_are_deterministic():
    q, k, v = qkv(2, 4, 2, 64, 64, 16)
    pat = ac.patterns.sliding_window(20) & ac.patterns.softcap(10.0, causal=False)
    w = torch.randn(2, 4, 64, 16)
    first = grads(pat, q, k, v, w, torch.zeros(2, 4, 64))
    second = grads(pat, q, k, v, w, torch.zeros(2, 4, 64))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_loss_backward_through_attention():
    q, k, v = qkv(1, 2, 2, 40, 40, 16)
    out = ac.attention(q, k, v, ac.patterns.causal())
    out.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None
    with torch.no_grad():  # no graph when grad is off
        assert not ac.attention(q, k, v, ac.patterns.causal()).requires_grad


def _buffer_case(name):
    """(pattern, its learnable buffer) for the buffer-gradient tests."""
    g = torch.Generator().manual_seed(3)
    if name == "alibi_slopes":
        slopes = torch.rand(4, generator=g).requires_grad_()
        return ac.Pattern(lambda b, h, q, kv: q >= kv, lambda s, b, h, q, kv: s + slopes[h] * (kv - q)), slopes
    if name == "head_scale":
        scale = (torch.rand(4, generator=g) + 0.5).requires_grad_()
        return ac.Pattern(score_mod=lambda s, b, h, q, kv: s * scale[h]), scale
    if name == "relative_bias":  # a table read at q - kv, twice (two reads of one buffer add up)
        table = torch.randn(2 * 50 - 1, generator=g).requires_grad_()
        return ac.Pattern(lambda b, h, q, kv: (q - kv).abs() < 23,
                          lambda s, b, h, q, kv: s + table[q - kv + 49] - 0.5 * table[kv - q + 49]), table
    if name == "t5_buckets":  # [buckets, heads], bf16, behind a where
        bias = torch.randn(8, 4, generator=g).to(torch.bfloat16).requires_grad_()

        def score(s, b, h, q, kv):
            d = (q - kv).abs()
            bucket = torch.where(d < 4, d, 4 + (d >= 16).long() * 3)
            return torch.tanh(s / 5.0) * 5.0 + bias[bucket, h]
        return ac.Pattern(score_mod=score), bias
    raise ValueError(name)


@pytest.mark.parametrize("name", ["alibi_slopes", "head_scale", "relative_bias", "t5_buckets"])
def test_buffer_gradients_match_the_oracle(name):
    pat, buf = _buffer_case(name)
    q, k, v = qkv(2, 4, 2, 50, 45 if name != "relative_bias" else 50, 16, seed=1)
    w = torch.randn(2, 4, q.shape[2], 16, generator=torch.Generator().manual_seed(2))
    ours = torch.autograd.grad((ac.attention(q, k, v, pat) * w).sum(), (q, k, v, buf))
    leaf = buf.detach().double().requires_grad_()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = torch.autograd.grad((ac.reference(qd, kd, vd, pat.bind(**{_name(pat, buf): leaf})) * w.double()).sum(),
                              (qd, kd, vd, leaf))
    assert ours[3].dtype == buf.dtype and ours[3].shape == buf.shape
    tol = 2e-2 if buf.dtype == torch.bfloat16 else 1e-4
    for a, b in zip(ours, ref):
        assert ((a.double() - b).norm() / b.norm()).item() < tol
    again = torch.autograd.grad((ac.attention(q, k, v, pat) * w).sum(), (q, k, v, buf))
    assert all(torch.equal(a, b) for a, b in zip(ours, again))  # deterministic


def _name(pattern, tensor):
    return next(n for n, t in pattern.buffers.items() if t is tensor)


def test_zero_dim_learnable_scalars_get_their_gradients():
    """A 0-dim tensor that requires grad (a learnable temperature, or one element `w[1]` of a
    learnable w) is read as a one-element buffer viewing it, so its gradient flows back; a 0-dim
    tensor without grad stays a constant."""
    temp = torch.tensor(0.7, requires_grad=True)
    w = torch.tensor([0.5, 2.0], requires_grad=True)
    fixed = torch.tensor(3.0)
    pat = ac.Pattern(lambda b, h, q, kv: q >= kv, lambda s, b, h, q, kv: s * temp + w[1] * (kv - q) / 64 + fixed)
    assert sorted(t.shape for t in pat.buffers.values()) == [(1,), (1,)] and "3.0" in str(pat.score)
    q, k, v = qkv(1, 2, 2, 40, 40, 16, seed=4)
    g = torch.randn(1, 2, 40, 16, generator=torch.Generator().manual_seed(5))
    ours = torch.autograd.grad((ac.attention(q, k, v, pat) * g).sum(), (temp, w))
    t64, w64 = temp.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref_pat = ac.Pattern(lambda b, h, q, kv: q >= kv, lambda s, b, h, q, kv: s * t64 + w64[1] * (kv - q) / 64 + 3.0)
    qd, kd, vd = (t.detach().double() for t in (q, k, v))
    want = torch.autograd.grad((ac.reference(qd, kd, vd, ref_pat) * g.double()).sum(), (t64, w64))
    assert ours[0].shape == () and ours[1].shape == (2,) and ours[1][0] == 0
    for a, b in zip(ours, want):
        assert ((a.double() - b).norm() / b.norm()).item() < 1e-4


def test_buffer_gradients_only_where_asked_and_through_lse():
    slopes = torch.rand(4).requires_grad_()
    pat = ac.Pattern(score_mod=lambda s, b, h, q, kv: s + slopes[h] * (kv - q))
    q, k, v = qkv(1, 4, 4, 20, 20, 16)
    q.requires_grad_(False)
    k.requires_grad_(False)
    v.requires_grad_(False)
    _, lse = ac.attention(q, k, v, pat, return_lse=True)
    (g,) = torch.autograd.grad(lse.sum(), (slopes,))
    leaf = slopes.detach().double().requires_grad_()
    _, ref_lse = ac.reference(q.double(), k.double(), v.double(), pat.bind(slopes=leaf), return_lse=True)
    (ref,) = torch.autograd.grad(ref_lse.sum(), (leaf,))
    assert torch.allclose(g.double(), ref, rtol=1e-4, atol=1e-5)
    out = ac.attention(q, k, v, pat.bind(slopes=slopes.detach()))
    assert not out.requires_grad


def test_torch_compile_fullgraph_matches_eager():
    pat = ac.patterns.document(lengths=[20, 25]) & ac.patterns.softcap(6.0, causal=False)

    def loss(q, k, v):
        out, lse = ac.attention(q, k, v, pat, return_lse=True)
        return (out * out).sum() + torch.where(torch.isinf(lse), 0.0, lse).sum()

    q, k, v = qkv(1, 4, 2, 45, 45, 16)
    eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    value = compiled(q, k, v)
    assert torch.equal(value.detach(), loss(q, k, v).detach())
    assert all(torch.equal(a, b) for a, b in zip(eager, torch.autograd.grad(value, (q, k, v))))
    from attncc.runtime import api
    made = []
    real = api._prepare
    api._prepare = lambda *a, **kw: made.append(1) or real(*a, **kw)
    try:  # a repeated compiled call reuses its Kernel: no choice, no block-map lookups before the launch
        again = compiled(q, k, v)
        torch.autograd.grad(again, (q, k, v))
    finally:
        api._prepare = real
    assert torch.equal(again.detach(), value.detach()) and not made
    full = torch.compile(lambda q, k, v: ac.attention(q, k, v).sum(), backend="aot_eager", fullgraph=True)
    assert torch.allclose(full(q, k, v), ac.attention(q, k, v).sum())


FRESH_PROCESS = """
import sys, torch, attncc as ac
q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
pat = ac.patterns.causal()
eager = ac.attention(q, k, v, pat)
eager.sum().backward()
assert "torch._dynamo" not in sys.modules, "an eager call imported torch._dynamo"
assert "attncc.runtime.compiled_op" not in sys.modules
grads = [t.grad.clone() for t in (q, k, v)]
for t in (q, k, v):
    t.grad = None
out = torch.compile(lambda q, k, v: ac.attention(q, k, v, pat), backend="aot_eager", fullgraph=True)(q, k, v)   # the custom ops' module is imported while dynamo traces
out.sum().backward()
assert torch.equal(out, eager) and all(torch.equal(t.grad, g) for t, g in zip((q, k, v), grads))
print("ok")
"""


def test_eager_calls_never_import_dynamo_and_compile_still_works():
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS], capture_output=True, text=True,
                          env=dict(os.environ, TRITON_INTERPRET="1"))
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_torch_compile_buffer_gradients_and_tile_options():
    pat, slopes = _buffer_case("alibi_slopes")
    opts = {"dkdv_tiles": [16, 16, 4, 1], "BLOCK_M": 16}

    def loss(q, k, v):  # the pattern holds the learnable slopes, as a model's module would
        return (ac.attention(q, k, v, pat, kernel_options=opts) ** 2).sum()

    q, k, v = qkv(1, 4, 2, 37, 37, 16)
    eager = torch.autograd.grad(loss(q, k, v), (q, k, v, slopes))
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v, slopes))
    assert all(torch.equal(a, b) for a, b in zip(eager, got))


@pytest.mark.parametrize("opts, match", [({"dkdv_tiles": (48, 64, 4, 1)}, "dkdv_tiles.*BLOCK_M"),
                                         ({"dq_tiles": (16, 16)}, "dq_tiles.*must be"),
                                         ({"dq_tiles": (16, 16, 3, 1)}, "num_warps")])
def test_bad_backward_tile_options_are_clear_errors(opts, match):
    with pytest.raises(ValueError, match=match):
        ac.compile(None, *qkv(1, 1, 1, 20, 20, 16), kernel_options=opts)


def test_no_buffer_gradient_work_unless_a_buffer_requires_grad(monkeypatch):
    import attncc.runtime.buffer_grads as bg

    def refuse(*args, **kwargs):
        raise AssertionError("buffer gradients computed though no buffer requires grad")
    monkeypatch.setattr(bg, "buffer_grads", refuse)
    slopes = torch.rand(2)
    pat = ac.Pattern(score_mod=lambda s, b, h, q, kv: s + slopes[h] * (kv - q))
    q, k, v = qkv(1, 2, 2, 20, 20, 16)
    for fn in (ac.attention, torch.compile(ac.attention, backend="aot_eager", fullgraph=True)):
        assert all(g is not None for g in torch.autograd.grad(fn(q, k, v, pat).sum(), (q, k, v)))


def test_buffer_gradients_in_many_chunks(monkeypatch):
    import attncc.runtime.buffer_grads as bg

    pat, table = _buffer_case("relative_bias")
    pat = pat & ac.Pattern(lambda b, h, q, kv: q >= 40)  # query tile 0 (rows 0-31) has no live key
    q, k, v = qkv(1, 4, 2, 50, 50, 16, seed=4)
    one = torch.autograd.grad(ac.attention(q, k, v, pat).sum(), (table,))[0]
    monkeypatch.setattr(bg, "_CHUNK_ELEMENTS", 4 * 16 * 32)  # below one 32-row tile: a chunk per tile
    many = torch.autograd.grad(ac.attention(q, k, v, pat).sum(), (table,))[0]
    leaf = table.detach().double().requires_grad_()
    ref = torch.autograd.grad(ac.reference(q.double(), k.double(), v.double(), pat.bind(table=leaf)).sum(), (leaf,))[0]
    for g in (one, many):
        assert ((g.double() - ref).norm() / ref.norm()).item() < 1e-4

    # tiles of 4 rows x 2 keys: dead tile 1 skipped, runs cut at the budget, last run clipped to Q / KV
    assert list(bg._chunks([0, 5, 1, 1, 2], [2, 5, 3, 4, 4], 18, 7, 4, 2, 48)) == [
        (0, 4, 0, 4), (8, 16, 2, 7), (16, 18, 4, 7)]


def test_backward_source_is_readable():
    pat = ac.patterns.softcap(7.0)
    kern = ac.compile(pat, *qkv(1, 2, 2, 40, 40, 16))
    src = kern.backward_source
    assert "def attention_backward_dkdv" in src and "def attention_backward_dq" in src
    assert "def score_grad" in src and "tanh" in src and "DKDV_BLOCK_M, DKDV_BLOCK_N" in src
    assert "def attention_forward" not in src and "def attention_forward" in kern.source


def test_a_buffer_written_between_forward_and_backward_is_torchs_inplace_error():
    """The backward reads the pattern's buffers again: one written in place after the forward (a
    bias table stepped, doc ids of the next batch copied in) must not give gradients of a forward
    that never ran. They are saved for backward, so torch's version check refuses."""
    q, k, v = qkv(1, 2, 2, 24, 24, 16)
    table = torch.randn(9, requires_grad=True)
    ids = torch.arange(24) // 7
    for pattern, write in ((ac.Pattern(score_mod=lambda s, b, h, qi, ki: s + table[(qi - ki).abs().clamp(max=8)]),
                            lambda: table.add_(1.0)),
                           (ac.Pattern(lambda b, h, qi, ki: ids[qi] == ids[ki]), lambda: ids.copy_(ids.flip(0)))):
        out = ac.attention(q, k, v, pattern)
        with torch.no_grad():
            write()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def test_ties_of_min_and_max_at_zero_split_the_gradient_in_the_reference_too():
    """maximum(s, c) at s == c == 0: the kernels and torch give 1/2 to each side; the reference's
    signed-zero fix had given 1 to both."""
    q, k, v = qkv(1, 2, 2, 16, 16, 16)
    with torch.no_grad():
        q.zero_()
    c = torch.zeros(2, requires_grad=True)
    for fn in (torch.maximum, torch.minimum):
        pattern = ac.Pattern(score_mod=lambda s, b, h, qi, ki: fn(s, c[h]))
        ac.testing.compare_grads(pattern, q, k, v)
