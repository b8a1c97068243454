"""The split-KV decode kernel on the GPU at serving sizes, bf16 (run with `pytest -m gpu`): paged
caches read in place and dense caches, each sequence checked against the float64 oracle on its
own keys (the pattern over the dense indices: sequences.paged_pattern, tested on CPU)."""
import pytest
import torch

import attncc as ac
from attncc.runtime.sequences import paged_pattern
from gpu_util import rel

pytestmark = pytest.mark.gpu
B, HQ, HKV, D = 16, 32, 8, 128


def patterns(longest: int) -> dict:
    ids = ac.patterns.lengths_to_ids([longest // 3, longest // 3, longest - 2 * (longest // 3)], device="cuda")
    return {
        "causal": ac.patterns.causal(),
        "sinks_window": ac.patterns.sinks(4, 1024),
        "document": ac.Pattern(lambda b, h, q, kv: (ids[q] == ids[kv]) & (q >= kv), name="document"),
        "alibi": ac.patterns.alibi(HQ, device="cuda"),
        "softcap": ac.patterns.softcap(30.0),
    }


def paged(lens, page_size, first_page=0, dtype=torch.bfloat16):
    """(k_cache, v_cache, page_table, kv_lens, k_seqs, v_seqs): the sequences' pages shuffled over
    pages first_page.. of the caches (the earlier ones left uninitialised: never read)."""
    g = torch.Generator(device="cuda").manual_seed(1)
    counts = [-(-n // page_size) for n in lens]
    num_pages = first_page + sum(counts)
    caches = [torch.empty(num_pages, page_size, HKV, D, device="cuda", dtype=dtype) for _ in range(2)]
    order = first_page + torch.randperm(sum(counts), device="cuda", generator=g)
    table = torch.full((len(lens), max(counts)), -1, dtype=torch.int32, device="cuda")
    seqs = ([], [])
    taken = 0
    for b, (n, c) in enumerate(zip(lens, counts)):
        pages = order[taken:taken + c]
        taken += c
        table[b, :c] = pages.int()
        for cache, out in zip(caches, seqs):
            x = torch.randn(HKV, c * page_size, D, device="cuda", dtype=dtype, generator=g)
            cache[pages] = x.transpose(0, 1).unflatten(0, (c, page_size))
            out.append(x[:, :n])
    return caches[0], caches[1], table, torch.tensor(lens, dtype=torch.int32, device="cuda"), *seqs


def check(out, lse, q, k_seqs, v_seqs, pattern, kv_lens):
    for b in range(q.shape[0]):
        n = int(kv_lens[b])
        pos = paged_pattern(pattern, kv_lens[b:b + 1], q.shape[2])
        ref, ref_lse = ac.reference(q[b:b + 1], k_seqs[b][None], v_seqs[b][None], pos, return_lse=True)
        live = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse[b:b + 1]), live), (b, n)
        assert rel(out[b:b + 1], ref) < 2e-2 and rel(lse[b:b + 1][live], ref_lse[live]) < 1e-2, (b, n)


@pytest.mark.parametrize("name", ["causal", "sinks_window", "document", "alibi", "softcap"])
@pytest.mark.parametrize("page_size, Q_LEN", [(16, 1), (256, 8)])
def test_paged_decode_at_serving_sizes(name, page_size, Q_LEN):
    g = torch.Generator().manual_seed(page_size)
    lens = torch.randint(8192, 32769, (B,), generator=g).tolist()
    lens[3] = 0  # an empty sequence
    kc, vc, table, kv_lens, k_seqs, v_seqs = paged(lens, page_size)
    q = torch.randn(B, HQ, Q_LEN, D, device="cuda", dtype=torch.bfloat16)
    pattern = patterns(max(lens))[name]
    kern = ac.compile(pattern, q, kc, vc, page_table=table, kv_lens=kv_lens)
    assert kern.config["kernel"] == "decode"
    out, lse = kern(q, kc, vc, page_table=table, kv_lens=kv_lens, return_lse=True)
    assert out.dtype == torch.bfloat16 and not out.isnan().any()
    assert (out[3] == 0).all() and (lse[3] == -torch.inf).all()
    keep = [b for b in range(B) if lens[b]]
    check(out[keep], lse[keep], q[keep], [k_seqs[b] for b in keep], [v_seqs[b] for b in keep], pattern,
          kv_lens[keep])
    one, one_lse = ac.attention(q, kc, vc, pattern, page_table=table, kv_lens=kv_lens, return_lse=True,
                                kernel_options={"kv_splits": 1})
    assert rel(one, out) < 1e-2


def test_caches_past_two_to_the_31_elements():
    # 8192 pages of 256 x 8 x 128 = 2**31 elements before the used ones: int64 addresses or garbage
    lens = [20000, 9001]
    kc, vc, table, kv_lens, k_seqs, v_seqs = paged(lens, 256, first_page=8192)
    q = torch.randn(2, HQ, 4, D, device="cuda", dtype=torch.bfloat16)
    pattern = ac.patterns.sinks(4, 1024)
    out, lse = ac.attention(q, kc, vc, pattern, page_table=table, kv_lens=kv_lens, return_lse=True)
    check(out, lse, q, k_seqs, v_seqs, pattern, kv_lens)


def test_dense_decode_at_serving_sizes():
    g = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(B, HQ, 8, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(B, HKV, 16384, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    pattern = ac.patterns.causal(offset=16384 - 8)
    kern = ac.compile(pattern, q, k, v)
    assert kern.config["kernel"] == "decode"
    out, lse = kern(q, k, v, return_lse=True)
    ref, ref_lse = ac.reference(q, k, v, pattern, return_lse=True)
    assert rel(out, ref) < 2e-2 and rel(lse, ref_lse) < 1e-2


def test_a_serving_loop_over_a_kv_cache(monkeypatch):
    """70 decode steps of B 16 sequences in an ac.KVCache (bf16, pages of 64): the tile lists of
    step 0 serve the next 63 (runtime/decode.DECODE_SPAN), then are rebuilt; every few steps each
    sequence against the oracle on its own keys."""
    from attncc.runtime import decode

    g = torch.Generator(device="cuda").manual_seed(3)
    lens = torch.randint(2000, 9000, (B,), generator=torch.Generator().manual_seed(3)).tolist()
    cache = ac.KVCache(num_pages=B * 160, page_size=64, heads=HKV, head_dim=D, batch=B, device="cuda")
    keys = [torch.randn(HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=g) for n in lens]
    values = [torch.randn(HKV, n, D, device="cuda", dtype=torch.bfloat16, generator=g) for n in lens]
    for b in range(B):
        cache.append(keys[b][None], values[b][None], seqs=[b])
    pattern = ac.patterns.sinks(4, 1024)
    builds = []
    real = decode.build_meta
    monkeypatch.setattr(decode, "build_meta", lambda *args, **kwargs: builds.append(1) or real(*args, **kwargs))
    for step in range(70):
        new_k, new_v = (torch.randn(B, HKV, 1, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        cache.append(new_k, new_v)
        keys = [torch.cat([keys[b], new_k[b]], 1) for b in range(B)]
        values = [torch.cat([values[b], new_v[b]], 1) for b in range(B)]
        q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
        out, lse = cache.attention(q, pattern, return_lse=True)
        if step % 9 == 0 or step in (63, 64):
            check(out, lse, q, keys, values, pattern, cache.kv_lens)
    assert len(builds) == 2  # steps 0-63, then 64-69


@pytest.mark.parametrize("make", [lambda: ac.patterns.sinks(4, 64), lambda: ac.patterns.alibi(4, device="cuda"),
                                  lambda: ac.patterns.neighborhood((8, 16), (3, 5), causal=(True, True))],
                         ids=["sinks", "alibi", "neighbourhood-in-a-layout"])
def test_check_pattern_serving_steps_on_the_gpu(make):
    """check_pattern's serving steps (paged and packed, the decode kernel) in bf16 on CUDA; a layout's
    pattern serves them in natural order."""
    report = ac.testing.check_pattern(make(), dtypes=[torch.bfloat16], max_examples=6, max_len=128, grad=False)
    steps = [r for r in report.rows if "decode" in r]
    assert len(steps) == 6 and {r["decode"] for r in steps} == {"paged", "packed"}


def test_compiled_serving_calls_on_the_gpu():
    """torch.compile(fullgraph=True) of a paged step and a dense decode step: the serving custom op,
    the eager call's results."""
    pattern = ac.patterns.sinks(4, 1024)
    k_cache, v_cache, table, kv_lens, _, _ = paged([3000, 77, 8192], 64)
    g = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(3, HQ, 8, D, device="cuda", dtype=torch.bfloat16, generator=g)
    step = torch.compile(lambda q, kc, vc, t, n: ac.attention(q, kc, vc, pattern, page_table=t, kv_lens=n),
                         fullgraph=True)
    assert torch.equal(step(q, k_cache, v_cache, table, kv_lens),
                       ac.attention(q, k_cache, v_cache, pattern, page_table=table, kv_lens=kv_lens))
    k, v = (torch.randn(2, HKV, 8192, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    dense = torch.compile(lambda q, k, v: ac.attention(q, k, v, pattern), fullgraph=True)
    assert torch.equal(dense(q[:2], k, v), ac.attention(q[:2], k, v, pattern))
