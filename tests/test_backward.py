"""The generated backward kernels (interpreter, CPU) against float64 autograd through ac.reference."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attncc as ac
from attncc.testing import random_patterns, shapes

SETTINGS = settings(max_examples=14, deadline=None, database=None, derandomize=True,
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


def check(pattern, q, k, v, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    w_out = torch.randn(*q.shape[:3], v.shape[3], generator=g)
    w_lse = torch.randn(*q.shape[:3], generator=g)
    ours = grads(pattern, q, k, v, w_out, w_lse)
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
    ac.patterns.document(ac.patterns.lengths_to_ids([17, 30, 9, 21])) & ac.patterns.softcap(8.0, causal=False),
    ac.patterns.alibi(6),
    ac.patterns.dilated(20, 3),
    ac.patterns.natten2d(7, 11, 3),
    ac.Pattern(lambda b, h, q, kv: q >= kv + 30),  # the first 30 rows see nothing
], ids=["document-softcap", "alibi", "dilated", "natten2d", "empty-rows"])
def test_catalogue_gradients(pattern):
    check(pattern, *qkv(1, 6, 3, 77, 77, 32, Dv=24))


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


def test_buffer_gradients_are_refused_clearly():
    slopes = torch.rand(4).requires_grad_()
    pat = ac.Pattern(score_mod=lambda s, b, h, q, kv: s + slopes[h] * (kv - q))
    with pytest.raises(NotImplementedError, match="buffer.*slopes.*require grad"):
        ac.attention(*qkv(1, 4, 4, 20, 20, 16), pat)
    out = ac.attention(*qkv(1, 4, 4, 20, 20, 16), pat.bind(slopes=slopes.detach()))
    assert out.requires_grad


def test_torch_compile_fullgraph_matches_eager():
    pat = ac.patterns.document(ac.patterns.lengths_to_ids([20, 25])) & ac.patterns.softcap(6.0, causal=False)

    def loss(q, k, v):
        out, lse = ac.attention(q, k, v, pat, return_lse=True)
        return (out * out).sum() + torch.where(torch.isinf(lse), 0.0, lse).sum()

    q, k, v = qkv(1, 4, 2, 45, 45, 16)
    eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    value = compiled(q, k, v)
    assert torch.equal(value.detach(), loss(q, k, v).detach())
    assert all(torch.equal(a, b) for a, b in zip(eager, torch.autograd.grad(value, (q, k, v))))
    full = torch.compile(lambda q, k, v: ac.attention(q, k, v).sum(), backend="aot_eager", fullgraph=True)
    assert torch.allclose(full(q, k, v), ac.attention(q, k, v).sum())
