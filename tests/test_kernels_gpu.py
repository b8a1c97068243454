"""The generated forward kernels on the GPU at real sizes, bf16 (run with `pytest -m gpu`)."""
import pytest
import torch

import attncc as ac
from attncc.compiler.codegen import TileConfig
from attncc.runtime.api import attention, compile
from attncc.runtime.inputs import check_qkv
from gpu_util import checked_grads, grads, qkv, rel

pytestmark = pytest.mark.gpu
OURS = {"backend": "triton"}


PATTERNS = {
    "full": lambda N, H: ac.Pattern(),
    "causal": lambda N, H: ac.patterns.causal(),
    "swa": lambda N, H: ac.patterns.sliding_window(300),
    "document": lambda N, H: ac.patterns.document(
        [N // 3, N // 4, N - N // 3 - N // 4], device="cuda"),
    "softcap": lambda N, H: ac.patterns.softcap(30.0),
    "alibi": lambda N, H: ac.patterns.alibi(H, device="cuda"),
    "dilated": lambda N, H: ac.patterns.dilated(500, 3),
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("shape", [(2, 8, 8, 2048, 128), (1, 8, 2, 1999, 96)])
def test_bf16_real_sizes_match_reference(name, shape):
    B, Hq, Hkv, N, D = shape
    q, k, v = qkv(B, Hq, Hkv, N, D)
    pat = PATTERNS[name](N, Hq)
    out, lse = attention(q, k, v, pat, return_lse=True, kernel_options=OURS)
    ref, ref_lse = ac.reference(q, k, v, pat, return_lse=True)
    live = torch.isfinite(ref_lse)
    assert rel(out, ref) < 2e-2 and rel(lse[live], ref_lse[live]) < 1e-2
    assert torch.equal(torch.isfinite(lse), live)


def test_cross_lengths_fp16_and_fp32():
    for dtype, tol in ((torch.float16, 1e-2), (torch.float32, 1e-4)):
        q, k, v = qkv(1, 4, 4, 1000, 64, dtype=dtype, KV=3001)
        pat = ac.patterns.causal(offset=2001)
        assert rel(attention(q, k, v, pat, kernel_options=OURS), ac.reference(q, k, v, pat)) < tol


def test_param_rebinding_never_recompiles():
    q, k, v = qkv(1, 4, 4, 4096, 64)
    pat = ac.patterns.sliding_window(1024)
    fn = compile(pat, q, k, v, kernel_options=OURS).module.attention_forward
    attention(q, k, v, pat, kernel_options=OURS)
    entries = sum(len(c[0]) for c in fn.device_caches.values())
    for W in (1023, 700, 2000):  # same tile structure (contiguity flags are constexpr)
        out = attention(q, k, v, pat.bind(W=W), kernel_options=OURS)
        assert rel(out, ac.reference(q, k, v, pat.bind(W=W))) < 2e-2
    assert sum(len(c[0]) for c in fn.device_caches.values()) == entries


@pytest.mark.parametrize("Hkv", [4, 2])
def test_sdpa_dispatch_for_plain_causal(Hkv):
    q, k, v = qkv(2, 4, Hkv, 1024, 64)
    from attncc.runtime import fa4

    from attncc.runtime.calibrate import profile_for
    from attncc.runtime.choices import cost_choice

    s, cudnn = check_qkv(q, k, v), torch.backends.cudnn.is_available()
    rules = "fa4" if fa4.refusal(ac.patterns.causal(), s, q) is None else "sdpa-cudnn" if cudnn else "triton"
    picked = cost_choice(ac.patterns.causal(), s, q.dtype, q.device, {}, rules, profile_for(q.device), cudnn=cudnn)
    expected = rules if picked is None else picked[0]  # the cost model's pick where the GPU's profile prices them
    assert compile(ac.patterns.causal(), q, k, v).config["backend"] == expected
    assert compile(ac.patterns.causal(), q, k, v, kernel_options=OURS).config["backend"] == "triton"
    if torch.backends.cudnn.is_available():
        kern = compile(ac.patterns.causal(), q, k, v, kernel_options={"backend": "sdpa-cudnn"})
        assert kern.config["backend"] == "sdpa-cudnn"
        assert rel(kern(q, k, v), ac.reference(q, k, v, ac.patterns.causal())) < 2e-2


@pytest.mark.parametrize("D, dtype", [(192, torch.bfloat16), (256, torch.bfloat16), (256, torch.float16),
                                      (128, torch.float32), (40, torch.bfloat16)])
def test_head_dims_and_dtypes_compile_and_match(D, dtype):
    q, k, v = qkv(1, 4, 2, 1500, D, dtype=dtype)
    pat = ac.patterns.causal() & ac.patterns.softcap(20.0, causal=False)
    out = attention(q, k, v, pat, kernel_options=OURS)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert rel(out, ac.reference(q, k, v, pat)) < tol


def test_autotune_picks_one_of_the_simulators_best_and_is_exact():
    from attncc.runtime.calibrate import profile_for
    from attncc.runtime.choices import AUTOTUNE_TOP, ranked_candidates

    q, k, v = qkv(2, 4, 4, 4096, 128)
    pattern = ac.patterns.sliding_window(512)
    kern = compile(pattern, q, k, v, kernel_options={"backend": "triton", "autotune": True})
    ranked = ranked_candidates(kern.pattern, check_qkv(q, k, v), q.dtype, q.device, {}, "triton", profile_for(q.device))
    assert ranked and ("triton", kern.tiles) in ranked[:AUTOTUNE_TOP]
    assert rel(kern(q, k, v), ac.reference(q, k, v, pattern)) < 2e-2


def test_the_cost_model_picks_the_tiles():
    from attncc.runtime.calibrate import profile_for
    from attncc.runtime.choices import cost_choice

    q, k, v = qkv(1, 2, 2, 8192, 128)
    swa = compile(ac.patterns.sliding_window(1024), q, k, v, kernel_options=OURS)
    picked = cost_choice(swa.pattern, check_qkv(q, k, v), q.dtype, q.device, {}, "triton", profile_for(q.device))
    if "H200" in torch.cuda.get_device_name():
        assert picked == ("triton", TileConfig(64, 64, 4, 3))  # short rows: small tiles (measured fastest)
    assert picked is None or (swa.config["BLOCK_M"], swa.config["BLOCK_N"]) == (picked[1].BLOCK_M, picked[1].BLOCK_N)
    assert rel(swa(q, k, v), ac.reference(q, k, v, ac.patterns.sliding_window(1024))) < 2e-2


def test_a_kernel_too_large_for_shared_memory_runs_with_fewer_stages(monkeypatch):
    """global_tokens' 64x128/4/3 forward needed 240 KiB of the H200's 227 (2026-12-01): chosen
    automatically it runs at 2 stages; forced by kernel_options it is an error naming them."""
    from attncc.runtime import choices

    N = 8192
    q, k, v = qkv(1, 4, 4, N, 128)
    pattern = ac.patterns.global_tokens(torch.arange(N, device="cuda") % 512 == 0, 256)
    tiles = TileConfig(64, 128, 4, 3)
    with pytest.raises(ValueError, match="kernel_options set.*shared memory"):
        compile(pattern, q, k, v, kernel_options={"backend": "triton", "BLOCK_M": 64, "BLOCK_N": 128,
                                                  "num_warps": 4, "num_stages": 3})(q, k, v)
    monkeypatch.setattr(choices, "ranked_candidates", lambda *args, **kwargs: [("triton", tiles)])
    kern = compile(pattern, q, k, v, kernel_options=OURS)
    out = kern(q, k, v)
    assert kern.config["num_stages"] < 3 and (kern.config["BLOCK_M"], kern.config["BLOCK_N"]) == (64, 128)
    assert rel(out, ac.reference(q, k, v, pattern)) < 2e-2


# ----------------------------------------------------------------------------------------------
# Exact numbers at real sizes (tests/test_numerics.py on CPU)

def _compare(pat, q, k, v):
    from attncc.testing import compare

    return compare(pat, q, k, v)


@pytest.mark.parametrize("make", [
    lambda N: ac.Pattern(lambda b, h, q, kv: (q * kv * 100000) % 7 == 0),
    lambda N: ac.Pattern(lambda b, h, q, kv: ((q * 65536 * 32768) // 65536) // 32768 >= kv),
    lambda N: ac.Pattern(lambda b, h, q, kv: q + ac.param("W", 2 ** 31 - 10) > kv + ac.param("W", 2 ** 31 - 10)),
    lambda N: ac.Pattern(lambda b, h, q, kv: kv <= q * ac.param("r", 1.3333333333333333)),
], ids=["hash", "huge-intermediate", "param-near-int32", "float-ratio"])
def test_integer_and_float_masks_are_exact(make):
    q, k, v = qkv(1, 4, 4, 3000, 64, dtype=torch.float32, KV=4000)
    _compare(make(3000), q, k, v)


def test_masked_out_nan_values_change_nothing_in_bf16():
    q, k, v = qkv(1, 4, 2, 2048, 128)
    v[:, :, 1500] = float("nan")
    pat = ac.patterns.sliding_window(300)
    out = attention(q, k, v, pat, kernel_options=OURS)
    assert not out[:, :, :1500].isnan().any() and out[:, :, 1500:1801].isnan().all()
    assert not out[:, :, 1801:].isnan().any()


def test_long_in_head_offsets():
    """q a strided view whose in-head offsets pass 2**31 (rows 2**17 elements apart)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(1, 1, 16400, 2 ** 17, device="cuda", dtype=torch.bfloat16, generator=g)
    q = base[..., :64]
    k, v = (torch.randn(1, 1, 16400, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    pat = ac.patterns.sliding_window(256)
    from attncc.runtime.kernel import META_CACHE

    assert META_CACHE.get(pat, ac.runtime.inputs.check_qkv(q, k, v), compile(pat, q, k, v, kernel_options=OURS).tiles, q.device)
    assert "long_offsets" in compile(pat, q, k, v, kernel_options=OURS).source
    out = attention(q, k, v, pat, kernel_options=OURS)
    assert rel(out, ac.reference(q, k, v, pat)) < 2e-2


def test_t5_buckets_and_long_or_chains():
    import math

    def bucket(rel_pos, num_buckets=32, max_distance=128):
        num_buckets //= 2
        buckets = (rel_pos > 0).to(torch.long) * num_buckets
        rel_pos = torch.abs(rel_pos)
        exact = num_buckets // 2
        large = exact + (torch.log(rel_pos.float() / exact) / math.log(max_distance / exact)
                         * (num_buckets - exact)).to(torch.long)
        return buckets + torch.where(rel_pos < exact, rel_pos, torch.minimum(large, torch.full_like(large, num_buckets - 1)))

    bias = torch.randn(4, 32, device="cuda")
    t5 = ac.Pattern(score_mod=lambda s, b, h, q, kv: s + bias[h, bucket(kv - q)])
    q, k, v = qkv(1, 4, 4, 2048, 64)
    out = attention(q, k, v, t5, kernel_options=OURS)
    assert rel(out, ac.reference(q, k, v, t5)) < 2e-2
    text = "mask = " + " or ".join(f"kv == {7 * i}" for i in range(1000)) + " or q == kv"
    assert rel(attention(q, k, v, ac.parse(text), kernel_options=OURS), ac.reference(q, k, v, ac.parse(text))) < 2e-2


def test_threads_on_the_gpu():
    from threads import run_in_threads

    q, k, v = qkv(1, 4, 4, 1024, 64)
    pats = [ac.patterns.sliding_window(100 + 10 * i) for i in range(8)]
    out = run_in_threads(lambda i: attention(q, k, v, pats[i], kernel_options=OURS), 8)
    torch.cuda.synchronize()
    assert all(rel(out[i], ac.reference(q, k, v, pats[i])) < 2e-2 for i in range(8))


# ----------------------------------------------------------------------------------------------
# The backward at real sizes (tests/test_backward.py on CPU)

@pytest.mark.parametrize("name", ["causal", "swa", "document", "softcap", "alibi", "dilated"])
@pytest.mark.parametrize("shape", [(2, 8, 8, 2048, 128), (1, 8, 2, 1999, 64), (1, 4, 4, 1024, 256)])
def test_backward_bf16_real_sizes_match_reference(name, shape):
    B, Hq, Hkv, N, D = shape
    q, k, v = qkv(B, Hq, Hkv, N, D)
    pat = PATTERNS[name](N, Hq)
    w = torch.randn(B, Hq, N, D, device="cuda")
    ours = checked_grads(pat, q, k, v, w, OURS)
    again = grads(lambda q, k, v: attention(q, k, v, pat, kernel_options=OURS), q, k, v, w)
    assert all(torch.equal(a, b) for a, b in zip(ours, again))  # deterministic


def test_backward_under_torch_compile_with_inductor():
    pat = ac.patterns.sliding_window(256) & ac.patterns.softcap(30.0, causal=False)
    q, k, v = qkv(1, 4, 4, 2048, 64)
    w = torch.randn(1, 4, 2048, 64, device="cuda")
    fn = lambda q, k, v: attention(q, k, v, pat, kernel_options=OURS)  # noqa: E731
    eager = grads(fn, q, k, v, w)
    compiled = grads(torch.compile(fn, fullgraph=True), q, k, v, w)
    diffs = [(a.float() - b.float()).abs().max().item() for a, b in zip(eager, compiled)]
    assert diffs == [0.0, 0.0, 0.0], diffs


def test_buffer_gradients_at_real_sizes():
    N, H = 2048, 8
    slopes = torch.rand(H, device="cuda").requires_grad_()
    table = torch.randn(2 * N - 1, device="cuda").requires_grad_()
    pat = ac.Pattern(lambda b, h, q, kv: (q >= kv) & (q - kv < 700),
                     lambda s, b, h, q, kv: s + slopes[h] * (kv - q) / 256 + table[q - kv + N - 1])
    q, k, v = qkv(2, H, 4, N, 128)
    w = torch.randn(2, H, N, 128, device="cuda")
    ours = torch.autograd.grad((attention(q, k, v, pat, kernel_options=OURS).float() * w).sum(), (slopes, table))
    leaves = [t.detach().double().requires_grad_() for t in (slopes, table)]
    ref_pat = pat.bind(slopes=leaves[0], table=leaves[1])
    ref = torch.autograd.grad((ac.reference(q.double(), k.double(), v.double(), ref_pat) * w.double()).sum(), leaves)
    for a, b in zip(ours, ref):
        assert rel(a, b) < 3e-2, rel(a, b)
    again = torch.autograd.grad((attention(q, k, v, pat, kernel_options=OURS).float() * w).sum(), (slopes, table))
    assert all(torch.equal(a, b) for a, b in zip(ours, again))


@pytest.mark.parametrize("make", [
    lambda: ac.patterns.natten2d(64, 128, 17),                       # 16x8 bricks
    lambda: ac.patterns.neighborhood((8, 32, 32), (3, 9, 9)),        # a 3-D video neighbourhood
    lambda: ac.patterns.dilated(1024, 4, seq_len=8192),              # residue layout
    lambda: ac.patterns.dilated(1024, 4),                            # no layout: the residue fold (runtime/fold.py)
    lambda: ac.patterns.sliding_tile((16, 16, 32), 3, (4, 4, 8)),    # tiles as bricks
], ids=["natten2d", "natten3d", "dilated", "dilated-folded", "sta"])
def test_layouts_at_real_sizes(make):
    pat = make()
    q, k, v = qkv(1, 8, 8, 8192, 128)
    w = torch.randn(1, 8, 8192, 128, device="cuda")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    config = ac.compile(pat, q, k, v, kernel_options=OURS).config  # on Triton a layout stays: no fold
    assert ("fold" in config) == (pat.layout is None), config
    out = attention(q, k, v, pat, kernel_options=OURS)
    grads = torch.autograd.grad((out.float() * w).sum(), (q, k, v))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = ac.reference(qd, kd, vd, pat)
    ref_grads = torch.autograd.grad((ref * w.double()).sum(), (qd, kd, vd))
    assert rel(out, ref) < 2e-2
    assert all(rel(a, b) < 3e-2 for a, b in zip(grads, ref_grads))


@pytest.mark.parametrize("make", [lambda: ac.patterns.natten2d(64, 128, 17),
                                  lambda: ac.patterns.neighborhood((8, 32, 32), (5, 9, 9))], ids=["natten2d", "natten3d"])
def test_register_capped_launches_give_the_first_launchs_numbers(make):
    """The forward's first launch decides a register cap for the next ones (64x32 tiles at 4 warps
    are register-bound below what shared memory allows): the capped kernel computes the same
    numbers bit for bit, and they match the reference."""
    pat = make()
    q, k, v = qkv(1, 8, 8, 8192, 128)
    kern = ac.compile(pat, q, k, v, kernel_options={**OURS, "BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4,
                                                     "num_stages": 2})
    first, second = kern(q, k, v), kern(q, k, v)
    caps = [c for key, c in kern.module.REGISTER_CAPS.items() if key[0] == q.device]
    assert caps and all(c is None or 128 <= c < 255 for c in caps), caps
    assert torch.equal(first, second)
    assert rel(first, ac.reference(q.double(), k.double(), v.double(), pat)) < 2e-2


@pytest.mark.parametrize("name", ["dilated", "natten2d"])
def test_head_dim_256_with_a_layout_runs_where_ptxas_refuses_registers(name):
    """On the H100 (2026-12-06) ptxas failed register allocation for dilated's D=256 forward at
    64x64/4/2 and 128x64/8/2: chosen tiles retry with more warps, then fewer keys; exact."""
    from benchmarks.patterns import build

    pat = build(name, 8192, 4, "cuda").attncc
    q, k, v = (t.requires_grad_() for t in qkv(1, 4, 4, 8192, 256))
    w = torch.randn(1, 4, 8192, 256, device="cuda")
    out = attention(q, k, v, pat)
    grads = torch.autograd.grad((out.float() * w).sum(), (q, k, v))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = ac.reference(qd, kd, vd, pat)
    ref_grads = torch.autograd.grad((ref * w.double()).sum(), (qd, kd, vd))
    assert rel(out, ref) < 2e-2 and all(rel(a, b) < 3e-2 for a, b in zip(grads, ref_grads))


@pytest.mark.parametrize("splits", [1, 8])
def test_paged_and_varlen_calls_at_real_sizes(splits):
    from test_sequences import oracle

    lens = [8191, 64, 3000, 0]
    cache = ac.KVCache(num_pages=256, page_size=64, heads=8, head_dim=128, batch=4, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    chunks = []
    for b, n in enumerate(lens):
        if n:
            k, v = torch.randn(2, 1, 8, n, 128, device="cuda", generator=g).bfloat16()
            cache.append(k, v, seqs=[b])
            chunks.append((k[0], v[0]))
        else:
            chunks.append(None)
    q = torch.randn(4, 32, 4, 128, device="cuda", generator=g).bfloat16()
    pattern = ac.patterns.sinks(4, 1024)
    out = cache.attention(q, pattern, kernel_options={"kv_splits": splits})
    for b, kv in enumerate(chunks):
        if kv is None:
            assert (out[b] == 0).all()
            continue
        want, _ = oracle(q[b], kv[0], kv[1], pattern)
        assert rel(out[b], want) < 2e-2
    # the same sequences packed, read in place by the decode kernel: one new token each for the
    # non-empty ones, then 1, 4 and 2 (the queries padded to 4 per sequence)
    live = [b for b, kv in enumerate(chunks) if kv is not None]
    kp = torch.cat([chunks[b][0] for b in live], 1)[None]
    vp = torch.cat([chunks[b][1] for b in live], 1)[None]
    cu = lambda lengths: torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,  # noqa: E731
                                      device="cuda")
    for counts in ([1] * len(live), [1, 4, 2]):
        qp = torch.cat([q[b, :, -n:] for b, n in zip(live, counts)], 1)[None]
        packed = ac.attention(qp, kp, vp, pattern, cu_seqlens_q=cu(counts), cu_seqlens_k=cu([lens[b] for b in live]),
                              kernel_options={"kv_splits": splits})
        row = 0
        for b, n in zip(live, counts):
            want, _ = oracle(q[b, :, -n:], chunks[b][0], chunks[b][1], pattern)
            assert rel(packed[0, :, row:row + n], want) < 2e-2
            row += n


def test_forward_and_backward_replay_in_a_cuda_graph():
    """Captured in a CUDA graph after a warm-up call (which compiles the kernels and decides the
    register cap), attncc's forward and backward replay on new inputs copied into the captured
    ones and give eager calls' numbers: a small call's host time (about 0.1 ms) is then gone."""
    pat = ac.patterns.sliding_window(256)
    q, k, v = qkv(2, 8, 2, 2048, 128)
    kern = compile(pat, q, k, v, kernel_options=OURS)
    static = [t.clone().requires_grad_() for t in (q, k, v)]
    dout = torch.randn_like(q)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            torch.autograd.grad(kern(*static), static, dout)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kern(*static)
        grads = torch.autograd.grad(out, static, dout)
    for seed in (1, 2):
        fresh = [torch.randn(t.shape, device="cuda", dtype=t.dtype, generator=torch.Generator("cuda").manual_seed(
            seed * 3 + i)) for i, t in enumerate(static)]
        for t, f in zip(static, fresh):
            t.detach().copy_(f)
        graph.replay()
        eager = [t.clone().requires_grad_() for t in fresh]
        eager_out = kern(*eager)
        assert torch.equal(out, eager_out)
        for g, e in zip(grads, torch.autograd.grad(eager_out, eager, dout)):
            assert torch.equal(g, e)
