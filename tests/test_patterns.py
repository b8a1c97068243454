"""Attention-gym-style patterns (written here, independently) and the catalogue trace and evaluate
exactly: each against a dense torch computation built another way (tests/test_pattern_values.py
has Pattern's value semantics)."""
import pytest
import torch

import attncc as ac
from attncc import PatternError
from attncc.compiler import evaluate as ev
from test_reference import naive_attention


def pairs(n_q: int, n_kv: int, live) -> torch.Tensor:
    """bool [n_q, n_kv] from a plain-Python predicate live(i, j): the slow, obvious way."""
    return torch.tensor([[bool(live(i, j)) for j in range(n_kv)] for i in range(n_q)])


def mask_of(pattern, Q, KV=None, B=None, H=None) -> torch.Tensor:
    m = ac.create_mask(pattern, B, H, Q, KV or Q)
    return m[0, 0] if B is None and H is None else m


# ----------------------------------------------------------------------------------------------
# Masks

def test_causal():
    pat = ac.Pattern(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx)
    assert torch.equal(mask_of(pat, 9, 13), torch.ones(9, 13, dtype=torch.bool).tril())
    assert torch.equal(mask_of(ac.patterns.causal(), 9, 13), torch.ones(9, 13, dtype=torch.bool).tril())
    assert torch.equal(mask_of(ac.patterns.causal(offset=4), 9, 13), torch.ones(9, 13, dtype=torch.bool).tril(4))


@pytest.mark.parametrize("W", [1, 3, 8])
def test_sliding_window(W):
    def sliding(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return (d >= 0) & (d < W)

    band = torch.ones(20, 20, dtype=torch.bool).tril() & ~torch.ones(20, 20, dtype=torch.bool).tril(-W)
    assert torch.equal(mask_of(ac.Pattern(sliding), 20), band)
    cat = ac.patterns.sliding_window(W - 1)  # the catalogue's W counts the keys before the query
    assert torch.equal(mask_of(cat, 20), band)
    both_ways = ac.patterns.sliding_window(W, causal=False)
    assert torch.equal(mask_of(both_ways, 20), pairs(20, 20, lambda i, j: abs(i - j) <= W))


@pytest.mark.parametrize("P", [0, 4, 20])
def test_prefix_lm(P):
    prefix = ac.Pattern(lambda b, h, q_idx, kv_idx: (kv_idx < P) | (q_idx >= kv_idx))
    expected = torch.ones(16, 16, dtype=torch.bool).tril()
    expected[:, :P] = True
    assert torch.equal(mask_of(prefix, 16), expected)
    assert torch.equal(mask_of(ac.patterns.prefix_lm(P), 16), expected)


@pytest.mark.parametrize("causal", [True, False])
def test_document_ids(causal):
    lengths = [3, 1, 5, 2, 4]
    doc_ids = ac.patterns.lengths_to_ids(lengths)
    assert doc_ids.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2, 3, 3, 4, 4, 4, 4]

    def packed(b, h, q_idx, kv_idx):
        same = doc_ids[q_idx] == doc_ids[kv_idx]
        return same & (q_idx >= kv_idx) if causal else same

    blocks = [torch.ones(n, n, dtype=torch.bool) for n in lengths]
    expected = torch.block_diag(*[blk.tril() if causal else blk for blk in blocks])
    assert torch.equal(mask_of(ac.Pattern(packed), 15), expected)
    assert torch.equal(mask_of(ac.patterns.document(ids=doc_ids, causal=causal), 15), expected)


def test_document_mask_wrapping_an_inner_mask_on_logical_positions():
    """attention-gym's document wrapper: the inner mask sees positions within each document,
    read through nested buffers (offsets[doc_id[q]])."""
    lengths = [3, 5, 2, 4]
    doc_id = ac.patterns.lengths_to_ids(lengths)
    offsets = torch.tensor([0, 3, 8, 10])

    def inner(b, h, q_idx, kv_idx):  # logical: dilated band inside each document
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= 2) & ((q_idx + kv_idx) % 2 == 0)

    def document_wrapped(b, h, q_idx, kv_idx):
        same = doc_id[q_idx] == doc_id[kv_idx]
        return same & inner(b, h, q_idx - offsets[doc_id[q_idx]], kv_idx - offsets[doc_id[kv_idx]])

    blocks = [pairs(n, n, lambda i, j: 0 <= i - j <= 2 and (i + j) % 2 == 0) for n in lengths]
    pat = ac.Pattern(document_wrapped)
    assert "offsets[doc_id[q]]" in str(pat.mask)
    assert torch.equal(mask_of(pat, 14), torch.block_diag(*blocks))


@pytest.mark.parametrize("W,d", [(6, 2), (9, 3), (4, 1)])
def test_dilated(W, d):
    def dilated(b, h, q_idx, kv_idx):
        gap = torch.abs(q_idx - kv_idx)
        return (gap <= W) & (gap % d == 0)

    expected = pairs(17, 17, lambda i, j: j in range(i - W, i + W + 1, d))
    assert torch.equal(mask_of(ac.Pattern(dilated), 17), expected)
    assert torch.equal(mask_of(ac.patterns.dilated(W, d), 17), expected)


def _window_start(centre: int, k: int, size: int) -> int:
    """NATTEN's window: k cells around `centre`, shifted inward at the borders."""
    return min(max(centre - k // 2, 0), size - k)


@pytest.mark.parametrize("rows,cols,kh,kw", [(5, 6, 3, 3), (6, 4, 5, 3), (4, 4, 1, 3)])
def test_natten_2d_clamped_centres(rows, cols, kh, kw):
    def natten(b, h, q_idx, kv_idx):
        q_r, q_c = q_idx // cols, q_idx % cols
        k_r, k_c = kv_idx // cols, kv_idx % cols
        c_r = torch.clamp(q_r, kh // 2, rows - 1 - kh // 2)
        c_c = q_c.clamp(min=kw // 2).clamp(max=cols - 1 - kw // 2)
        return (torch.abs(c_r - k_r) <= kh // 2) & ((c_c - k_c).abs() <= kw // 2)

    def live(i, j):
        r0, c0 = _window_start(i // cols, kh, rows), _window_start(i % cols, kw, cols)
        return r0 <= j // cols < r0 + kh and c0 <= j % cols < c0 + kw

    n = rows * cols
    expected = pairs(n, n, live)
    got = mask_of(ac.Pattern(natten), n)
    assert torch.equal(got, expected)
    assert (got.sum(1) == kh * kw).all()  # every window is full size
    assert torch.equal(mask_of(ac.patterns.natten2d(rows, cols, (kh, kw)), n), expected)


@pytest.mark.parametrize("tiles,tile,kernel", [((4, 5), 2, (3, 3)), ((3, 3), 3, (1, 3))])
def test_sliding_tile_attention_2d(tiles, tile, kernel):
    """STA: tokens stored tile by tile (each tile `tile x tile` pixels); a query tile attends to the
    kernel of tiles around it, centre clamped inward."""
    th, tw = tiles
    kh, kw = kernel
    per_tile = tile * tile

    def sta(b, h, q_idx, kv_idx):
        qt, kt = q_idx // per_tile, kv_idx // per_tile
        c_r = (qt // tw).clamp(kh // 2, th - 1 - kh // 2)
        c_c = (qt % tw).clamp(kw // 2, tw - 1 - kw // 2)
        return (abs(c_r - kt // tw) <= kh // 2) & (abs(c_c - kt % tw) <= kw // 2)

    def tile_live(a, c):
        r0, c0 = _window_start(a // tw, kh, th), _window_start(a % tw, kw, tw)
        return r0 <= c // tw < r0 + kh and c0 <= c % tw < c0 + kw

    n_tiles = th * tw
    expected = torch.kron(pairs(n_tiles, n_tiles, tile_live).int(), torch.ones(per_tile, per_tile, dtype=torch.int))
    assert torch.equal(mask_of(ac.Pattern(sta), n_tiles * per_tile), expected.bool())


@pytest.mark.parametrize("n,bs", [(12, 4), (9, 3), (8, 1)])
def test_block_diffusion(n, bs):
    """BD3-LM over [x_t ; x_0] (2n tokens): x_t attends within its block (bidirectional) and to the
    clean blocks strictly before it; x_0 is block-causal over x_0."""
    def bd3(b, h, q_idx, kv_idx):
        q_clean, kv_clean = q_idx >= n, kv_idx >= n
        qb = (q_idx - q_clean * n) // bs
        kb = torch.where(kv_clean, kv_idx - n, kv_idx) // bs
        diagonal = (qb == kb) & (q_clean == kv_clean)
        offset_causal = (qb > kb) & kv_clean & ~q_clean
        block_causal = (qb >= kb) & kv_clean & q_clean
        return diagonal | offset_causal | block_causal

    nb = n // bs
    ones = torch.ones(bs, bs, dtype=torch.int)
    eye = torch.eye(nb, dtype=torch.int)
    strict, lower = torch.ones(nb, nb).tril(-1).int(), torch.ones(nb, nb).tril().int()
    top = torch.cat([torch.kron(eye, ones), torch.kron(strict, ones)], 1)
    bottom = torch.cat([torch.zeros(n, n, dtype=torch.int), torch.kron(lower, ones)], 1)
    assert torch.equal(mask_of(ac.Pattern(bd3), 2 * n), torch.cat([top, bottom]).bool())


def test_longformer_global_tokens():
    N, W = 24, 2
    is_global = torch.zeros(N, dtype=torch.bool)
    is_global[[0, 7, 8, 20]] = True

    def longformer(b, h, q_idx, kv_idx):
        return (torch.abs(q_idx - kv_idx) <= W) | is_global[q_idx] | is_global[kv_idx]

    glob = {0, 7, 8, 20}
    expected = pairs(N, N, lambda i, j: abs(i - j) <= W or i in glob or j in glob)
    pat = ac.Pattern(longformer)
    assert list(pat.buffers) == ["is_global"] and torch.equal(mask_of(pat, N), expected)
    # the same with the first G tokens global, no buffer
    G = 3
    first = ac.Pattern(lambda b, h, q, kv: (abs(q - kv) <= W) | (q < G) | (kv < G))
    assert torch.equal(mask_of(first, N), pairs(N, N, lambda i, j: abs(i - j) <= W or i < G or j < G))


def test_tree_ancestor_matrix():
    """Tree attention (speculative decoding): a token attends to itself and its ancestors."""
    parent = [-1, 0, 0, 1, 1, 2, 3, 3, 5, 8, 0]
    N = len(parent)
    edge = torch.zeros(N, N, dtype=torch.bool)
    for i, p in enumerate(parent):
        edge[i, i] = True
        if p >= 0:
            edge[i, p] = True
    anc = edge.clone()
    for _ in range(N):  # transitive closure by repeated boolean products
        anc = (anc.int() @ anc.int()) > 0

    def tree(b, h, q_idx, kv_idx):
        return anc[q_idx, kv_idx]

    def ancestors(i):
        out = {i}
        while parent[i] >= 0:
            i = parent[i]
            out.add(i)
        return out

    pat = ac.Pattern(tree)
    assert str(pat.mask) == "anc[q, kv]"
    assert torch.equal(mask_of(pat, N), pairs(N, N, lambda i, j: j in ancestors(i)))


def test_mask_reading_batch_and_head():
    docs = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 2, 2, 2]])
    window = torch.tensor([0, 1, 5])

    def per_sequence(b, h, q_idx, kv_idx):
        return (docs[b, q_idx] == docs[b, kv_idx]) & (q_idx - kv_idx <= window[h]) & (q_idx >= kv_idx)

    got = mask_of(ac.Pattern(per_sequence), 6, B=2, H=3)
    for b in range(2):
        for h in range(3):
            d, w = docs[b].tolist(), window[h].item()
            assert torch.equal(got[b, h], pairs(6, 6, lambda i, j: d[i] == d[j] and 0 <= i - j <= w))


# ----------------------------------------------------------------------------------------------
# Score mods: the IR evaluated on a dense score grid, and ac.reference against hand-written attention

def score_grid(B, H, Q, KV, seed=0):
    s = torch.randn(B, H, Q, KV, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 40
    ar = torch.arange
    return {"score": s, "b": ar(B).view(B, 1, 1, 1), "h": ar(H).view(1, H, 1, 1),
            "q": ar(Q).view(1, 1, Q, 1), "kv": ar(KV).view(1, 1, 1, KV)}


def assert_score(pattern, expected_fn, H=4, Q=6, KV=9, score_fn=None):
    env = score_grid(2, H, Q, KV)
    got = ev.evaluate(pattern.score, env, pattern.params, pattern.buffers)
    expected = expected_fn(env["score"], env["h"], env["q"], env["kv"])
    torch.testing.assert_close(torch.broadcast_to(got, expected.shape), expected, rtol=1e-14, atol=1e-14)
    if score_fn is not None:
        q, k, v = (torch.randn(2, H, n, 16, generator=torch.Generator().manual_seed(1)) for n in (Q, KV, KV))
        out = ac.reference(q, k, v, pattern)
        want, _ = naive_attention(q, k, v, ac.create_mask(pattern, 2, H, Q, KV), score_fn)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_alibi_per_head_slopes():
    H = 4
    slopes = torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)])

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx)

    pat = ac.Pattern(lambda b, h, q, kv: q >= kv, alibi)
    s64 = slopes.double()
    assert_score(pat, lambda s, h, q, kv: s - s64[h] * (q - kv).double(),
                 score_fn=lambda s, b, h, qi, ki: s - s64[h] * (qi - ki))
    assert torch.equal(ac.patterns.alibi_slopes(H), slopes)
    cat = ac.patterns.alibi(H)
    assert_score(cat, lambda s, h, q, kv: s + s64[h] * (kv - q).double(),
                 score_fn=lambda s, b, h, qi, ki: s + s64[h] * (ki - qi))


@pytest.mark.parametrize("cap", [1.0, 20.0, 50.0])
def test_soft_capping(cap):
    def softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    ref = lambda s, *idx: cap * torch.tanh(s / cap)  # noqa: E731
    assert_score(ac.Pattern(score_mod=softcap), ref, score_fn=lambda s, b, h, qi, ki: ref(s))
    cat = ac.patterns.softcap(cap, causal=False)
    assert_score(cat, ref)
    env = score_grid(1, 1, 4, 4)
    assert ev.evaluate(cat.score, env, cat.params, cat.buffers).abs().max() <= cap


def test_relative_bias_table():
    H, N = 3, 7
    bias = torch.randn(H, 2 * N - 1, generator=torch.Generator().manual_seed(3))

    def rel_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx - kv_idx + N - 1]

    pat = ac.Pattern(score_mod=rel_bias)
    assert str(pat.score) == "score + bias[h, q - kv + 7 - 1]"
    table = torch.tensor([[[bias[h, i - j + N - 1].item() for j in range(N)] for i in range(N)] for h in range(H)],
                         dtype=torch.float64)
    assert_score(pat, lambda s, h, q, kv: s + table[None], H=H, Q=N, KV=N,
                 score_fn=lambda s, b, h, qi, ki: s + table[h])
    # a KV longer than the table's range is caught, never read out of bounds
    q = k = v = torch.randn(1, H, N + 1, 16)
    with pytest.raises(PatternError, match="bias"):
        ac.reference(q, k, v, pat)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_flex_mods_compute_the_same_pattern():
    """as_flex_mods gives FlexAttention callables for the same mask (block predicate folded in)
    and score: torch's create_mask and eager flex_attention agree with ours."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    doc = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3])
    slopes = torch.tensor([0.5, 0.25])
    pat = (ac.patterns.document(ids=doc) & ac.Pattern(score_mod=lambda s, b, h, q, kv: s + slopes[h] * (kv - q))
           & ac.Pattern(block_mask_mod=lambda b, h, qb, kb: qb + 1 >= kb * 2, block_size=4))
    mask_mod, score_mod = ev.as_flex_mods(pat)
    assert torch.equal(flex.create_mask(mask_mod, 1, 2, 12, 12, device="cpu"), ac.create_mask(pat, 1, 2, 12, 12))
    q, k, v = (torch.randn(1, 2, 12, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    block_mask = flex.create_block_mask(mask_mod, 1, 2, 12, 12, device="cpu", BLOCK_SIZE=4)
    out = flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
    torch.testing.assert_close(out.double(), ac.reference(q, k, v, pat), rtol=1e-5, atol=1e-5)
    assert ev.as_flex_mods(ac.patterns.causal())[1] is None
