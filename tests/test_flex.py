"""attncc.flex against torch's FlexAttention: one model, written against torch's API, run through both.

torch's flex_attention runs its eager math on CPU (no dynamo compile per call, see the fixture);
attncc.flex runs attncc's generated kernels in Triton's interpreter.
"""
import types

import pytest
import torch
import torch.nn.attention.flex_attention as torch_flex

import attncc as ac
import attncc.flex as ac_flex

pytestmark = pytest.mark.filterwarnings("ignore:return_lse is deprecated:FutureWarning")  # torch's own
TOL = dict(atol=1e-4, rtol=1e-4)
WINDOW = 24


@pytest.fixture(autouse=True)
def eager_torch_flex(monkeypatch):
    monkeypatch.setattr(torch_flex, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)


def model(flex_attention, create_block_mask, case, q, k, v, doc_ids, prefix):
    """attention-gym-style code: the last Q_LEN of KV_LEN positions query (decode when Q < KV)."""
    B, Hq, Q_LEN, _ = q.shape
    KV_LEN = k.shape[2]
    offset = KV_LEN - Q_LEN

    def causal(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    def strictly_causal(b, h, q_idx, kv_idx):  # query 0 sees no key: zeros, lse -inf
        return q_idx + offset > kv_idx

    def sliding_window(b, h, q_idx, kv_idx):
        return q_idx + offset - kv_idx <= WINDOW

    def document(b, h, q_idx, kv_idx):
        return doc_ids[b, q_idx + offset] == doc_ids[b, kv_idx]

    def prefix_lm(b, h, q_idx, kv_idx):
        return kv_idx < prefix[b]

    def softcap(score, b, h, q_idx, kv_idx):
        return 20.0 * torch.tanh(score / 20.0)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + torch.exp2(-8.0 * (h + 1) / Hq) * (kv_idx - q_idx - offset)

    mask_mod, score_mod, per_batch = {
        "causal": (causal, None, False),
        "sliding_window": (torch_flex.and_masks(causal, sliding_window), None, False),
        "document": (torch_flex.and_masks(causal, document), None, True),
        "prefix_lm": (torch_flex.or_masks(causal, prefix_lm), None, True),
        "softcap": (strictly_causal, softcap, False),
        "alibi": (None, alibi, False),
    }[case]
    block_mask = None
    if mask_mod is not None:
        block_mask = create_block_mask(mask_mod, B if per_batch else None, None, Q_LEN, KV_LEN,
                                       device=q.device, BLOCK_SIZE=64)
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=Hq != k.shape[1],
                          return_lse=True)


CASES = [  # case, B, Hq, Hkv, Q_LEN, KV_LEN, D, Dv
    ("causal", 1, 4, 2, 131, 131, 16, 16),
    ("sliding_window", 1, 2, 2, 77, 77, 32, 32),
    ("document", 2, 1, 1, 131, 131, 16, 16),
    ("prefix_lm", 2, 1, 1, 77, 77, 16, 16),
    ("softcap", 1, 2, 2, 100, 100, 16, 16),
    ("alibi", 1, 4, 1, 64, 64, 16, 16),
    ("sliding_window", 1, 2, 1, 77, 131, 16, 32),   # Q_LEN != KV_LEN, GQA, Dv != D
    ("document", 2, 1, 1, 40, 131, 16, 16),
]


def inputs(B, Hq, Hkv, Q_LEN, KV_LEN, D, Dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Q_LEN, D, generator=g)
    k = torch.randn(B, Hkv, KV_LEN, D, generator=g)
    v = torch.randn(B, Hkv, KV_LEN, Dv, generator=g)
    doc_ids = torch.stack([torch.arange(KV_LEN) // 37, torch.arange(KV_LEN) // 50])[:B]
    prefix = torch.tensor([20, 45])[:B]
    return q, k, v, doc_ids, prefix


def assert_same(ours, theirs):
    torch.testing.assert_close(ours[0], theirs[0], **TOL)
    torch.testing.assert_close(ours[1], theirs[1], **TOL)  # lse, natural log; -inf rows equal


@pytest.mark.parametrize("case,B,Hq,Hkv,Q_LEN,KV_LEN,D,Dv", CASES)
def test_model_gives_torch_output(case, B, Hq, Hkv, Q_LEN, KV_LEN, D, Dv):
    args = inputs(B, Hq, Hkv, Q_LEN, KV_LEN, D, Dv)
    theirs = model(torch_flex.flex_attention, torch_flex.create_block_mask, case, *args)
    ours = model(ac_flex.flex_attention, ac_flex.create_block_mask, case, *args)
    assert_same(ours, theirs)


@pytest.mark.parametrize("case", ["document", "prefix_lm"])
def test_torch_block_mask_from_create_block_mask(case):
    args = inputs(2, 1, 1, 77, 77, 16, 16)
    theirs = model(torch_flex.flex_attention, torch_flex.create_block_mask, case, *args)
    ours = model(ac_flex.flex_attention, torch_flex.create_block_mask, case, *args)
    assert_same(ours, theirs)


def test_block_mask_is_torchs_block_mask():
    doc = torch.arange(150) // 41

    def mask(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    def band(b, h, q_idx, kv_idx):  # FULL tiles in the ragged last row and column (torch: PARTIAL)
        return (q_idx - kv_idx).abs() < 70
    for mask, B, H, BLOCK_SIZE, separate in [(mask, None, None, 128, True), (mask, 2, 3, 32, True),
                                             (band, None, None, 16, True), (band, 1, 2, (32, 64), False)]:
        theirs = torch_flex.create_block_mask(mask, B, H, 131, 150, device="cpu", BLOCK_SIZE=BLOCK_SIZE,
                                              separate_full_blocks=separate)
        ours = ac_flex.create_block_mask(mask, B, H, 131, 150, device="cpu", BLOCK_SIZE=BLOCK_SIZE,
                                         separate_full_blocks=separate)
        assert isinstance(ours, torch_flex.BlockMask) and ours.pattern == ac.Pattern(mask)
        assert (ours.shape, ours.BLOCK_SIZE, ours.seq_lengths) == (theirs.shape, theirs.BLOCK_SIZE, theirs.seq_lengths)
        assert ours.sparsity() == theirs.sparsity() and str(ours) == str(theirs)
        assert ours.to_string(limit=2) == theirs.to_string(limit=2)
        for name in ("to_dense", *ac_flex._LISTS):
            a, b = getattr(ours, name), getattr(theirs, name)
            a, b = (a(), b()) if callable(a) else (a, b)
            assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), name
        assert torch.equal(ours[0, -1].to_dense(), theirs[0, -1].to_dense())
    q, k, v = (torch.randn(1, 2, n, 16) for n in (131, 150, 150))  # torch's flex_attention takes ours
    torch.testing.assert_close(torch_flex.flex_attention(q, k, v, block_mask=ours),
                               torch_flex.flex_attention(q, k, v, block_mask=theirs), **TOL)


def test_adjust_crops_like_torch():
    """torch's error for a block mask built for longer sequences suggests block_mask._adjust."""
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx
    ours, theirs = (create(causal, None, None, 128, 128, device="cpu", BLOCK_SIZE=32)._adjust(64, 96)
                    for create in (ac_flex.create_block_mask, torch_flex.create_block_mask))
    for name in ac_flex._LISTS:
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    q, k, v = (torch.randn(1, 1, n, 16) for n in (64, 96, 96))
    torch.testing.assert_close(ac_flex.flex_attention(q, k, v, block_mask=ours),
                               torch_flex.flex_attention(q, k, v, block_mask=theirs), **TOL)


def test_hand_made_torch_block_mask_has_torchs_kernel_semantics():
    """FULL tiles are live whatever mask_mod says, PARTIAL tiles apply it, unlisted tiles are dead.

    (torch's eager CPU math ignores the tile lists, so the expected mask is built from them here.)
    """
    BS, Q_LEN, KV_LEN = 32, 90, 80  # 3 x 3 tiles, ragged both ways
    partial_num = torch.tensor([[[1, 1, 1], [0, 2, 1]]], dtype=torch.int32)
    partial_idx = torch.tensor([[[[0, 0], [1, 0], [2, 0]], [[0, 0], [0, 2], [1, 0]]]], dtype=torch.int32)
    full_num = torch.tensor([[[1, 1, 0], [2, 0, 1]]], dtype=torch.int32)
    full_idx = torch.tensor([[[[2, 0], [0, 0], [0, 0]], [[1, 2], [0, 0], [0, 0]]]], dtype=torch.int32)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx
    q, k, v = (torch.randn(1, 2, n, 16) for n in (Q_LEN, KV_LEN, KV_LEN))
    for mask_mod in (causal, None):
        bm = torch_flex.BlockMask.from_kv_blocks(partial_num, partial_idx, full_num, full_idx, BLOCK_SIZE=BS,
                                                 mask_mod=mask_mod, seq_lengths=(Q_LEN, KV_LEN))
        qi, ki = torch.arange(Q_LEN)[:, None], torch.arange(KV_LEN)[None, :]
        live = torch.zeros(1, 2, Q_LEN, KV_LEN, dtype=torch.bool)
        for h in range(2):
            for r in range(3):
                rows = qi // BS == r
                for j in full_idx[0, h, r, :full_num[0, h, r]].tolist():
                    live[0, h] |= rows & (ki // BS == j)
                for j in partial_idx[0, h, r, :partial_num[0, h, r]].tolist():
                    live[0, h] |= rows & (ki // BS == j) & (qi >= ki if mask_mod else True)
        expected_bm = torch_flex.create_block_mask(lambda b, h, q_idx, kv_idx: live[b, h, q_idx, kv_idx],
                                                   1, 2, Q_LEN, KV_LEN, device="cpu", BLOCK_SIZE=BS)
        expected = torch_flex.flex_attention(q, k, v, block_mask=expected_bm, return_lse=True)
        assert_same(ac_flex.flex_attention(q, k, v, block_mask=bm, return_lse=True), expected)


def test_replaced_mask_mod_keeps_torch_semantics():
    bm = ac_flex.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 64, 64,
                                   device="cpu", BLOCK_SIZE=32)
    bm.mask_mod = lambda b, h, q_idx, kv_idx: (q_idx - kv_idx) % 2 == 0  # PARTIAL tiles only
    q, k, v = (torch.randn(1, 1, 64, 16) for _ in range(3))
    def expected_mask(b, h, q_idx, kv_idx):  # tile (1, 0) FULL; (0, 0), (1, 1) PARTIAL; (0, 1) dead
        return (q_idx // 32 > kv_idx // 32) | ((q_idx // 32 == kv_idx // 32) & ((q_idx - kv_idx) % 2 == 0))
    expected = torch_flex.create_block_mask(expected_mask, None, None, 64, 64, device="cpu")
    torch.testing.assert_close(ac_flex.flex_attention(q, k, v, block_mask=bm),
                               torch_flex.flex_attention(q, k, v, block_mask=expected), **TOL)


def test_return_aux_gives_lse():
    q, k, v, *_ = inputs(1, 2, 2, 40, 40, 16, 16)
    out, aux = ac_flex.flex_attention(q, k, v, return_aux=torch_flex.AuxRequest(lse=True))
    ref, lse = torch_flex.flex_attention(q, k, v, return_lse=True)
    assert_same((out, aux.lse), (ref, lse))
    with pytest.raises(NotImplementedError, match="max_scores"):
        ac_flex.flex_attention(q, k, v, return_aux=torch_flex.AuxRequest(max_scores=True))


# -- argument errors

def test_gqa_needs_enable_gqa():
    q, k, v, *_ = inputs(1, 4, 2, 32, 32, 16, 16)
    with pytest.raises(ValueError, match="enable_gqa"):
        ac_flex.flex_attention(q, k, v)


def test_kernel_options(monkeypatch):
    seen = {}
    monkeypatch.setattr(ac_flex, "attention", lambda *a, kernel_options, **kw: seen.update(kernel_options))
    q, k, v, *_ = inputs(1, 1, 1, 32, 32, 16, 16)
    ac_flex.flex_attention(q, k, v, kernel_options={
        "BLOCK_M": 32, "fwd_BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "fwd_num_stages": 2, "bwd_BLOCK_M1": 16,
        "BACKEND": "TRITON", "USE_TMA": False, "PRESCALE_QK": True, "ROWS_GUARANTEED_SAFE": True,
        "OUTPUT_LOGSUMEXP": True})
    assert seen == {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2, "backend": "triton", "tma": False}
    everything = {name: "AUTO" if name == "BACKEND" else 1 for name in torch_flex.FlexKernelOptions.__annotations__}
    ac_flex.flex_attention(q, k, v, kernel_options=everything)
    with pytest.raises(ValueError, match="'BLOCK_Q', 'bwd_TILES'"):
        ac_flex.flex_attention(q, k, v, kernel_options={"BLOCK_Q": 64, "bwd_TILES": 1, "BLOCK_M": 64})
    ac_flex.flex_attention(q, k, v, kernel_options={"BACKEND": "FLASH"})
    assert seen["backend"] == "fa4"  # FlashAttention-4's kernels with attncc's hooks
    with pytest.raises(ValueError, match="'CUTLASS'"):
        ac_flex.flex_attention(q, k, v, kernel_options={"BACKEND": "CUTLASS"})


def test_block_mask_of_other_lengths_is_refused():
    q, k, v, *_ = inputs(1, 1, 1, 64, 80, 16, 16)
    for create in (ac_flex.create_block_mask, torch_flex.create_block_mask):
        bm = create(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 64, 64, device="cpu")
        with pytest.raises(ValueError, match="Q_LEN=64, KV_LEN=64, but query has length 64 and key/value 80"):
            ac_flex.flex_attention(q, k, v, block_mask=bm)


def test_broadcast_of_a_batch_dependent_mask_is_refused():
    prefix = torch.tensor([10, 30])

    def prefix_lm(b, h, q_idx, kv_idx):
        return kv_idx < prefix[b]
    with pytest.raises(ValueError, match="B=None"):
        ac_flex.create_block_mask(prefix_lm, None, None, 64, 64, device="cpu")
    bm = ac_flex.create_block_mask(prefix_lm, 1, None, 64, 64, device="cpu")
    q, k, v, *_ = inputs(2, 1, 1, 64, 64, 16, 16)
    with pytest.raises(ValueError, match="built for B=1, but its mask_mod reads b"):
        ac_flex.flex_attention(q, k, v, block_mask=bm)


def test_gradients_flow_through_the_drop_in():
    q, k, v, *_ = inputs(1, 2, 2, 32, 32, 16, 16)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    bm = ac_flex.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 32, 32, device="cpu")
    softcap = lambda score, b, h, q_idx, kv_idx: 5.0 * torch.tanh(score / 5.0)  # noqa: E731
    ac_flex.flex_attention(q, k, v, score_mod=softcap, block_mask=bm).sum().backward()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ac.reference(qd, kd, vd, ac.patterns.softcap(5.0)).sum().backward()
    for a, b in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        assert ((a.double() - b).norm() / b.norm()) < 1e-4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        ac_flex.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 64, 64, device="cuda")


# -- the trace cache

def test_trace_cache_follows_closures_globals_and_tensors():
    global WINDOW
    window = 4

    def mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window) & (q_idx - kv_idx <= WINDOW)

    def make():
        return ac_flex.create_block_mask(mask, None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    first = make()
    assert make().pattern is first.pattern  # nothing changed: no re-trace
    window = 40
    wider = make()
    assert wider.pattern is not first.pattern and int(wider.to_dense().sum()) > int(first.to_dense().sum())
    WINDOW, old = 10, WINDOW
    try:
        assert int(make().to_dense().sum()) < int(wider.to_dense().sum())
    finally:
        WINDOW = old
    lengths = torch.tensor([8])

    def prefix(b, h, q_idx, kv_idx):
        return kv_idx < lengths[0]  # read at trace time: a constant in the pattern
    before = ac_flex.create_block_mask(prefix, None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    lengths.fill_(40)
    after = ac_flex.create_block_mask(prefix, None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    assert int(after.to_dense().sum()) == 3 * int(before.to_dense().sum())


def test_a_captured_scalar_made_learnable_after_a_first_call_gets_its_gradient():
    """The trace cache keys captured tensors by requires_grad too: a temperature traced as a
    constant (no grad) is traced again as a learnable scalar once it requires grad."""
    q, k, v, *_ = inputs(1, 1, 1, 12, 12, 16, 16)
    q.requires_grad_(True)
    temp = torch.tensor(1.5)

    def scaled(score, b, h, q_idx, kv_idx):
        return score * temp
    with torch.no_grad():
        ac_flex.flex_attention(q, k, v, score_mod=scaled)
    temp.requires_grad_(True)
    ac_flex.flex_attention(q, k, v, score_mod=scaled).sum().backward()
    ref = temp.detach().double().requires_grad_(True)
    s = (q.detach().double() @ k.double().transpose(-1, -2)) * 16 ** -0.5 * ref
    (torch.softmax(s, -1) @ v.double()).sum().backward()
    assert temp.grad is not None and abs(temp.grad.item() - ref.grad.item()) < 1e-4


def test_flex_attention_inside_torch_compile():
    """torch.compile around attncc.flex.flex_attention (as FlexAttention is used): Dynamo does not
    trace into it (torch.compiler.disable; it had failed tracing the mods), the call runs attncc's
    kernels with gradients, and a changed closure value is seen on the next call."""
    q, k, v, *_ = inputs(1, 2, 2, 32, 32, 16, 16)
    q.requires_grad_(True)
    bias = torch.randn(32, requires_grad=True)
    cap = 2.0

    def f(q, k, v):
        return ac_flex.flex_attention(q, k, v, score_mod=lambda s, b, h, qi, ki: cap * torch.tanh(s / cap) + bias[ki])
    want = f(q, k, v)
    want_grads = torch.autograd.grad(want.sum(), (q, bias))
    compiled = torch.compile(f)
    got = compiled(q, k, v)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got.sum(), (q, bias)), want_grads):
        torch.testing.assert_close(a, b)
    cap = 5.0
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))


def test_trace_cache_score_mod_scalar_change():
    q, k, v, *_ = inputs(1, 2, 2, 48, 48, 16, 16)
    for cap in (2.0, 5.0):
        def softcap(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)
        torch.testing.assert_close(ac_flex.flex_attention(q * 4, k, v, score_mod=softcap),
                                   torch_flex.flex_attention(q * 4, k, v, score_mod=softcap), **TOL)


def test_object_attributes_are_never_cached():
    cfg = types.SimpleNamespace(window=4)

    def mask(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() < cfg.window
    narrow = ac_flex.create_block_mask(mask, None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    cfg.window = 30
    wide = ac_flex.create_block_mask(mask, None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    assert int(wide.to_dense().sum()) > int(narrow.to_dense().sum())
