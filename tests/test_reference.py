"""ac.reference against hand-written softmax attention (GQA, Q_LEN != KV_LEN, empty rows, scale,
Dv != D, dtypes), its input checks, and ac.create_mask's broadcasting and errors."""
import math

import pytest
import torch

import attncc as ac
from attncc import PatternError
from attncc.runtime import api

INF = math.inf


def naive_attention(q, k, v, allowed, score_fn=None, scale=None):
    """Softmax attention written out per (batch, query head, row), float64.

    allowed: bool broadcastable to [B, Hq, Q, KV]; score_fn(s [Q, KV], b, h, qi [Q, 1], ki [1, KV]).
    Returns out [B, Hq, Q, Dv] and lse [B, Hq, Q] (zeros / -inf for rows with no live key).
    """
    B, Hq, Q, D = q.shape
    KV, Dv, group = k.shape[2], v.shape[3], Hq // k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    allowed = torch.broadcast_to(allowed, (B, Hq, Q, KV))
    qi, ki = torch.arange(Q)[:, None], torch.arange(KV)[None, :]
    out = torch.zeros(B, Hq, Q, Dv, dtype=torch.float64)
    lse = torch.full((B, Hq, Q), -INF, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kh = h // group
            s = scale * (q[b, h].double() @ k[b, kh].double().T)
            if score_fn is not None:
                s = torch.broadcast_to(score_fn(s, b, h, qi, ki), (Q, KV))
            s = s.masked_fill(~allowed[b, h], -INF)
            for i in range(Q):
                live = s[i] > -INF
                if not live.any():
                    continue
                m = s[i][live].max()
                w = torch.exp(s[i] - m)
                out[b, h, i] = (w @ v[b, kh].double()) / w.sum()
                lse[b, h, i] = m + torch.log(w.sum())
    return out, lse


def qkv(B=2, Hq=4, Hkv=2, Q=5, KV=9, D=16, Dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return mk(B, Hq, Q, D), mk(B, Hkv, KV, D), mk(B, Hkv, KV, Dv or D)


SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])
DOC = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
CASES = {
    "full": (lambda: None, lambda b, h, qi, ki: torch.tensor(True), None),
    "causal": (lambda: ac.Pattern(lambda b, h, q, kv: q >= kv), lambda b, h, qi, ki: qi >= ki, None),
    "window_softcap": (
        lambda: ac.Pattern(lambda b, h, q, kv: (q >= kv) & (q - kv <= 2),
                           lambda s, b, h, q, kv: 5.0 * torch.tanh(s / 5.0)),
        lambda b, h, qi, ki: (qi >= ki) & (qi - ki <= 2), lambda s, b, h, qi, ki: 5.0 * torch.tanh(s / 5.0)),
    "alibi": (lambda: ac.Pattern(score_mod=lambda s, b, h, q, kv: s + SLOPES[h] * (kv - q)),
              lambda b, h, qi, ki: torch.tensor(True), lambda s, b, h, qi, ki: s + SLOPES[h].double() * (ki - qi)),
    "document_bidirectional": (lambda: ac.Pattern(lambda b, h, q, kv: DOC[q] == DOC[kv]),
                               lambda b, h, qi, ki: DOC[qi] == DOC[ki], None),
    "block_predicate": (lambda: ac.Pattern(lambda b, h, q, kv: q + 1 >= kv,
                                           block_mask_mod=lambda b, h, qb, kb: (qb + kb) % 2 == 0, block_size=(2, 3)),
                        lambda b, h, qi, ki: (qi + 1 >= ki) & ((qi // 2 + ki // 3) % 2 == 0), None),
    "per_batch_and_head": (lambda: ac.Pattern(lambda b, h, q, kv: (kv + b + h) % 3 != 0),
                           lambda b, h, qi, ki: (ki + torch.arange(2).view(2, 1, 1, 1)
                                                 + torch.arange(4).view(1, 4, 1, 1)) % 3 != 0, None),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", [dict(), dict(Hq=4, Hkv=1, Q=9, KV=4, D=24, Dv=8), dict(Hq=4, Hkv=4, Q=7, KV=7)],
                         ids=["gqa2_q5_kv9", "mqa_q9_kv4_dv8", "mha_square"])
def test_reference_matches_hand_written_attention(case, shape):
    make, allowed, score_fn = CASES[case]
    q, k, v = qkv(**shape)
    out, lse = ac.reference(q, k, v, make(), return_lse=True)
    allowed_t = allowed(None, None, torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None])
    want, want_lse = naive_attention(q, k, v, allowed_t, score_fn)
    assert out.dtype == torch.float64 and out.shape == want.shape and lse.shape == want_lse.shape
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)
    assert ac.reference(q, k, v, make()).shape == out.shape


@pytest.mark.parametrize("chunk", [1, 2 * 9, 4 * 9 * 5 + 1])  # row by row; 2 rows of a head; 4 heads of all rows
def test_reference_chunks_keep_head_and_query_indices(monkeypatch, chunk):
    """With a small chunk the reference loops over heads and query rows (memory bounded at any
    length); h and q must still be the absolute head and query."""
    q, k, v = qkv()  # Hq 4, Q 5, KV 9
    make, allowed, score_fn = CASES["alibi"]
    pattern = make() & ac.patterns.causal(offset=2)
    causal = torch.arange(5)[:, None] + 2 >= torch.arange(9)[None]
    want, want_lse = naive_attention(q, k, v, causal, score_fn)
    monkeypatch.setattr(api, "_REFERENCE_CHUNK", chunk)
    out, lse = ac.reference(q, k, v, pattern, return_lse=True)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


def test_gqa_query_head_reads_kv_head_h_over_group():
    q, k, v = qkv(B=1, Hq=6, Hkv=3, Q=4, KV=6)
    base = ac.reference(q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:, 1] += 1.0
    v2[:, 1] -= 2.0
    changed = (ac.reference(q, k2, v2) - base).abs().amax(dim=(0, 2, 3)) > 1e-6
    assert changed.tolist() == [False, False, True, True, False, False]  # heads 2, 3 read kv head 1
    for h in range(6):
        one, _ = naive_attention(q[:, h:h + 1], k[:, h // 2:h // 2 + 1], v[:, h // 2:h // 2 + 1], torch.tensor(True))
        torch.testing.assert_close(base[:, h:h + 1], one, rtol=1e-12, atol=1e-12)


def test_empty_rows_give_zeros_and_minus_inf_lse():
    q, k, v = qkv(Q=7, KV=5)
    pat = ac.Pattern(lambda b, h, q, kv: (q % 3 != 0) & (kv <= q))
    out, lse = ac.reference(q, k, v, pat, return_lse=True)
    empty = torch.arange(7) % 3 == 0
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[:, :, empty] == 0).all() and torch.isneginf(lse[:, :, empty]).all()
    assert torch.isfinite(lse[:, :, ~empty]).all()
    i = torch.arange(7)[:, None]
    want, want_lse = naive_attention(q, k, v, (i % 3 != 0) & (torch.arange(5)[None] <= i))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


def test_rows_masked_by_the_score_mod_are_empty_too():
    q, k, v = qkv(Q=4, KV=4)
    pat = ac.Pattern(score_mod=lambda s, b, h, q, kv: torch.where(q == 1, -float("inf"), s))
    out, lse = ac.reference(q, k, v, pat, return_lse=True)
    assert (out[:, :, 1] == 0).all() and torch.isneginf(lse[:, :, 1]).all() and not out.isnan().any()


def test_all_rows_empty():
    q, k, v = qkv(Q=3, KV=3)
    out, lse = ac.reference(q, k, v, ac.Pattern(lambda b, h, q, kv: q < 0), return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_cross_attention_indices_are_absolute():
    q, k, v = qkv(Q=3, KV=8)
    out = ac.reference(q, k, v, ac.patterns.causal())
    want, _ = naive_attention(q, k, v, torch.arange(3)[:, None] >= torch.arange(8)[None])
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    # row 0 reads only key 0: its output is v[kv head][0]
    torch.testing.assert_close(out[:, :, 0], v[:, [0, 0, 1, 1], 0].double(), rtol=1e-12, atol=1e-12)
    aligned = ac.reference(q, k, v, ac.patterns.causal(offset=5))
    want, _ = naive_attention(q, k, v, torch.arange(3)[:, None] + 5 >= torch.arange(8)[None])
    torch.testing.assert_close(aligned, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", [None, 0.3, 0.0, -1.5, 2])
def test_scale(scale):
    q, k, v = qkv(D=32)
    out, lse = ac.reference(q, k, v, ac.patterns.causal(), scale=scale, return_lse=True)
    want, want_lse = naive_attention(q, k, v, torch.arange(5)[:, None] >= torch.arange(9)[None], scale=scale)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)
    if scale is None:
        other = ac.reference(q, k, v, ac.patterns.causal(), scale=32 ** -0.5)
        torch.testing.assert_close(out, other, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_are_upcast_exactly(dtype):
    q, k, v = qkv(dtype=dtype, Dv=24)
    out = ac.reference(q, k, v, ac.patterns.sliding_window(3))
    i = torch.arange(5)[:, None]
    j = torch.arange(9)[None]
    want, _ = naive_attention(q, k, v, (i >= j) & (i - j <= 3))
    assert out.dtype == torch.float64 and out.shape == (2, 4, 5, 24)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Bad input: ValueError naming the argument

def _bad(**change):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v)
    for name, fn in change.items():
        args[name] = fn(args[name])
    return args


BAD = [
    ("q_rank", dict(q=lambda t: t[0]), r"\bq must have 4 dims"),
    ("k_rank", dict(k=lambda t: t[None]), r"\bk must have 4 dims"),
    ("v_rank", dict(v=lambda t: t[..., 0]), r"\bv must have 4 dims"),
    ("batch", dict(k=lambda t: torch.cat([t, t[:1]]), v=lambda t: torch.cat([t, t[:1]])), r"batch.*k 3"),
    ("kv_heads", dict(v=lambda t: t[:, :1]), r"\bk and v\b.*heads"),
    ("kv_len", dict(v=lambda t: t[:, :, :4]), r"\bk and v\b.*length"),
    ("head_dim", dict(k=lambda t: t[..., :8]), r"\bq and k\b.*head dim"),
    ("gqa_ratio", dict(q=lambda t: t[:, :3]), r"\bq has 3 heads.*multiple of the 2 heads of k and v"),
    ("kv_more_heads", dict(k=lambda t: torch.cat([t] * 4, 1), v=lambda t: torch.cat([t] * 4, 1)),
     r"\bq has 4 heads.*8 heads of k and v"),
    ("device", dict(k=lambda t: t.to("meta")), r"device"),
    ("int_dtype", dict(q=lambda t: t.long()), r"\bq has dtype torch.int64"),
    ("complex_dtype", dict(v=lambda t: t.to(torch.complex64)), r"\bv has dtype torch.complex64"),
    ("mixed_dtypes", dict(k=lambda t: t.half()), r"share a dtype"),
    ("not_tensor", dict(q=lambda t: t.tolist()), r"\bq must be a torch.Tensor"),
    ("empty", dict(k=lambda t: t[:, :, :0], v=lambda t: t[:, :, :0]), r"\bk is empty"),
]


@pytest.mark.parametrize("name,change,match", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(name, change, match):
    args = _bad(**change)
    with pytest.raises(ValueError, match=match):
        ac.reference(args["q"], args["k"], args["v"], ac.patterns.causal())


def test_bad_scale_and_pattern():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="scale"):
        ac.reference(q, k, v, scale="0.1")
    with pytest.raises(ValueError, match="pattern must be"):
        ac.reference(q, k, v, lambda b, h, q, kv: q >= kv)


def test_unbound_and_out_of_range_buffers():
    q, k, v = qkv()
    pat = ac.patterns.document(ids=torch.tensor([0, 0, 1, 1]))
    with pytest.raises(PatternError, match="inside dim 0 of size 4"):
        ac.reference(q, k, v, pat)
    with pytest.raises(PatternError, match="doc"):
        ac.reference(q, k, v, pat.bind(doc=None))


# ----------------------------------------------------------------------------------------------
# create_mask

def test_create_mask_broadcasts_none():
    pat = ac.patterns.sliding_window(2)
    m = ac.create_mask(pat, None, None, 5, 7)
    assert m.shape == (1, 1, 5, 7) and m.dtype == torch.bool
    i, j = torch.arange(5)[:, None], torch.arange(7)[None]
    assert torch.equal(m[0, 0], (i >= j) & (i - j <= 2))
    full = ac.create_mask(pat, 2, 3, 5, 7)
    assert full.shape == (2, 3, 5, 7) and torch.equal(full, m.expand(2, 3, 5, 7))
    assert ac.create_mask(None, None, None, 2, 3).all()


def test_create_mask_none_refused_when_the_mask_reads_b_or_h():
    by_head = ac.Pattern(lambda b, h, q, kv: (q + h) % 2 == 0)
    with pytest.raises(ValueError, match="H=None.*depends on h"):
        ac.create_mask(by_head, 1, None, 4, 4)
    assert ac.create_mask(by_head, None, 2, 4, 4).shape == (1, 2, 4, 4)
    docs = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    by_batch = ac.Pattern(lambda b, h, q, kv: docs[b, q] == docs[b, kv])
    with pytest.raises(ValueError, match="B=None.*depends on b"):
        ac.create_mask(by_batch, None, 1, 4, 4)
    m = ac.create_mask(by_batch, 2, None, 4, 4)
    assert torch.equal(m[:, 0], docs[:, :, None] == docs[:, None, :])
    block_by_head = ac.Pattern(block_mask_mod=lambda b, h, qb, kb: h == 0, block_size=2)
    with pytest.raises(ValueError, match="H=None"):
        ac.create_mask(block_by_head, 1, None, 4, 4)


def test_create_mask_allows_none_when_only_the_score_reads_h():
    m = ac.create_mask(ac.patterns.alibi(4), None, None, 4, 4)
    assert torch.equal(m[0, 0], torch.ones(4, 4, dtype=torch.bool).tril())


@pytest.mark.parametrize("args,match", [((1, 1, 0, 4), "Q_LEN"), ((1, 1, 4, True), "KV_LEN"),
                                        ((2.0, 1, 4, 4), r"\bB\b"), ((1, -1, 4, 4), r"\bH\b"),
                                        ((1, 1, None, 4), "Q_LEN")])
def test_create_mask_bad_sizes(args, match):
    with pytest.raises(ValueError, match=match):
        ac.create_mask(ac.patterns.causal(), *args)
