"""The structural and score families of the catalogue (tree, cross, relative_bias, per_head,
block_topk), each against a dense definition written here in plain Python, then the kernels
(interpreter) against the float64 oracle: forward, and backward for q, k, v and learnable tables."""
import math
import random

import pytest
import torch

import attncc as ac
from attncc import PatternError
from attncc.compiler import evaluate as ev
from attncc.patterns.block_topk import block_topk, block_topk_selection
from attncc.patterns.cross import cross
from attncc.patterns.per_head import per_head
from attncc.patterns.relative_bias import relative_bias
from attncc.patterns.tree import ancestor_table, tree
from attncc.testing import compare
from test_backward import check, qkv
from test_patterns import mask_of, pairs


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# tree

def random_parents(n: int, seed: int, roots: float = 0.1) -> list[int]:
    r = random.Random(seed)
    return [-1 if i == 0 or r.random() < roots else r.randrange(max(0, i - 6), i) for i in range(n)]


def ancestors(parents, i):
    out = {i}
    while parents[i] >= 0:
        i = parents[i]
        out.add(i)
    return out


TREES = {
    "medusa": [-1, 0, 0, 1, 1, 2, 3, 3, 5, 8, 0],
    "chain": [-1] + list(range(12)),            # depth N - 1: the table's worst case, N x N
    "forest": [-1, -1, 0, 1, -1, 2, 2, 4, 7],
    "random": random_parents(37, seed=1),
}


@pytest.mark.parametrize("name", sorted(TREES))
def test_tree_mask(name):
    parents = TREES[name]
    N = len(parents)
    depth, anc = ancestor_table(torch.tensor(parents))
    assert depth.tolist() == [len(ancestors(parents, i)) - 1 for i in range(N)]
    assert anc.shape == (N, max(depth.tolist()) + 1)  # O(N * depth), not N x N
    anc_of = [ancestors(parents, i) for i in range(N)]
    assert torch.equal(mask_of(tree(parents), N), pairs(N, N, lambda i, j: j in anc_of[i]))
    for P in (1, 6):  # a causal prefix of P tokens, seen by every tree token
        def full(i, j):
            if j < P:
                return j <= i
            return i >= P and (j - P) in anc_of[i - P]
        pat = tree(torch.tensor(parents), prefix_len=P)
        assert torch.equal(mask_of(pat, P + N), pairs(P + N, P + N, full))
        verify = tree(parents, prefix_len=P, queries="tree")  # queries: the tree tokens only
        assert torch.equal(mask_of(verify, N, P + N), pairs(N, P + N, lambda i, j: j < P or (j - P) in anc_of[i]))
    # P is a param: another prefix length, the same IR
    rebound = tree(parents, prefix_len=1).bind(P=4)
    assert rebound.mask is tree(parents, prefix_len=4).mask
    assert torch.equal(mask_of(rebound, 4 + N), mask_of(tree(parents, prefix_len=4), 4 + N))


def test_tree_refuses_bad_parents_and_lengths():
    for bad in ([0, -1], [-1, 1], [-1, 0, -2], [[-1, 0]], [-1.0, 0.0]):
        with pytest.raises(ValueError):
            tree(torch.tensor(bad))
    with pytest.raises(PatternError, match="outside|inside"):  # longer than the tree: refused
        ac.create_mask(tree([-1, 0, 1]), None, None, 4, 4)


def test_tree_kernels():
    parents = random_parents(70, seed=3, roots=0.05)
    pat = tree(parents, prefix_len=13)
    q, k, v = qkv(1, 2, 1, 83, 83, 16, seed=2)
    compare(pat, q, k, v)
    check(pat, q, k, v)
    compare(tree(parents, prefix_len=13, queries="tree"), *qkv(1, 2, 2, 70, 83, 16, seed=3))


# ----------------------------------------------------------------------------------------------
# cross

def test_cross_groups():
    # text tokens (queries) see the visual tokens of the image before them; none before the first
    is_image = torch.tensor([0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0])
    q_groups = torch.cumsum(is_image, 0) - 1
    kv_groups = torch.arange(4).repeat_interleave(torch.tensor([5, 3, 4, 7]))
    Q, KV = len(q_groups), len(kv_groups)
    qg, kg = q_groups.tolist(), kv_groups.tolist()
    expected = pairs(Q, KV, lambda i, j: qg[i] >= 0 and qg[i] == kg[j])
    assert torch.equal(mask_of(cross(q_groups, kv_groups), Q, KV), expected)
    assert not expected[:2].any()  # before the first image: nothing
    # per-sequence ids [B, len] (either side)
    qb = torch.stack([q_groups, q_groups.flip(0)])
    got = mask_of(cross(qb, kv_groups), Q, KV, B=2, H=1)
    assert torch.equal(got[0, 0], expected)
    flipped = qb[1].tolist()
    assert torch.equal(got[1, 0], pairs(Q, KV, lambda i, j: flipped[i] >= 0 and flipped[i] == kg[j]))
    with pytest.raises(ValueError):
        cross(torch.tensor([0.0, 1.0]), kv_groups)


def test_cross_kernels():
    g = torch.Generator().manual_seed(5)
    q_groups = torch.randint(-1, 5, (45,), generator=g).sort().values
    kv_groups = torch.randint(0, 5, (70,), generator=g).sort().values
    pat = cross(q_groups, kv_groups)
    compare(pat, *qkv(1, 2, 1, 45, 70, 16, seed=4))


# ----------------------------------------------------------------------------------------------
# relative_bias

def hf_relative_position_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """Hugging Face's T5Attention._relative_position_bucket, as written there."""
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    relative_position_if_large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    relative_position_if_large = torch.min(
        relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1)
    )
    relative_buckets += torch.where(is_small, relative_position, relative_position_if_large)
    return relative_buckets


def score_of(pattern, H, Q, KV):
    """The score mod at score 0 over [1, H, Q, KV] (float64)."""
    env = ev.index_env(1, H, Q, KV)
    env["score"] = torch.zeros((), dtype=torch.float64)
    return torch.broadcast_to(ev.evaluate(pattern.score, env, pattern.params, pattern.buffers), (1, H, Q, KV))[0]


@pytest.mark.parametrize("num_buckets,max_distance,bidirectional",
                         [(32, 128, True), (32, 128, False), (16, 40, True), (8, 9, False), (64, 300, True)])
def test_t5_buckets_are_hugging_faces(num_buckets, max_distance, bidirectional):
    H, Q, KV = 3, 301, 333
    ids = torch.arange(num_buckets, dtype=torch.float64)[:, None] * 10 + torch.arange(H)  # table[bucket, h]
    pat = relative_bias(ids.float(), num_buckets, max_distance, bidirectional)
    got = score_of(pat, H, Q, KV)
    memory_position, context_position = torch.arange(KV)[None, :], torch.arange(Q)[:, None]
    bucket = hf_relative_position_bucket(memory_position - context_position, bidirectional, num_buckets, max_distance)
    assert bucket.max() == num_buckets - 1
    for h in range(H):
        assert torch.equal(got[h], (bucket * 10 + h).double())
    shared = score_of(relative_bias(ids[:, 0].float(), num_buckets, max_distance, bidirectional), 1, Q, KV)
    assert torch.equal(shared[0], (bucket * 10).double())  # a [num_buckets] table serves every head


def test_relative_table_without_buckets():
    H, N = 3, 9
    table = rand(H, 2 * N - 1, seed=3)
    got = score_of(relative_bias(table), H, N, N)
    want = torch.tensor([[[table[h, i - j + N - 1].item() for j in range(N)] for i in range(N)] for h in range(H)],
                        dtype=torch.float64)
    assert torch.equal(got, want)
    shared = score_of(relative_bias(table[1]), 1, 5, N)
    assert torch.equal(shared[0], want[1, :5])
    q = k = v = rand(1, H, N + 1, 16)  # longer than the table covers: refused, never out of bounds
    with pytest.raises(PatternError, match="table"):
        ac.reference(q, k, v, relative_bias(table))
    for args in [(table[:, :-1],), (table, None, 128), (rand(32, H), 32, 8), (rand(31, H), 32)]:
        with pytest.raises(ValueError):
            relative_bias(*args)


def _table_gradient(pat, table, q, k, v, seed):
    w = rand(*q.shape[:3], v.shape[3], seed=seed)
    ours = torch.autograd.grad((ac.attention(q, k, v, pat) * w).sum(), (q, k, v, table))
    leaf = table.detach().double().requires_grad_()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = torch.autograd.grad((ac.reference(qd, kd, vd, pat.bind(table=leaf)) * w.double()).sum(), (qd, kd, vd, leaf))
    assert ours[3].shape == table.shape and ours[3].dtype == table.dtype
    for name, a, b in zip(("q", "k", "v", "table"), ours, ref):
        err = ((a.double() - b).norm() / b.norm()).item()
        assert err < 1e-4, f"d{name}: relative error {err:.2e}"


def test_relative_tables_learn():
    """A learnable table's gradient (and q, k, v's) against float64 autograd of ac.reference."""
    H, N = 4, 40
    table = (0.5 * rand(H, 2 * N - 1, seed=6)).requires_grad_()
    _table_gradient(relative_bias(table), table, *qkv(1, H, 2, N, N, 16, seed=7), seed=8)
    buckets = rand(16, H, seed=9).requires_grad_()  # T5: [num_buckets, H], max_distance 20 < N
    t5 = relative_bias(buckets, 16, 20) & ac.patterns.causal()
    _table_gradient(t5, buckets, *qkv(1, H, 2, 45, 45, 16, seed=10), seed=11)


def test_relative_bias_kernels():
    compare(relative_bias(rand(32, 2, seed=12), 32, 40), *qkv(1, 2, 1, 96, 96, 16, seed=13))
    compare(relative_bias(rand(2, 2 * 96 - 1, seed=14)), *qkv(1, 2, 2, 61, 96, 16, seed=15))


# ----------------------------------------------------------------------------------------------
# per_head

def _heads_case():
    doc = ac.patterns.lengths_to_ids([7, 12, 3, 9, 14])
    window = ac.patterns.sliding_window(6)                    # a param W
    document = ac.patterns.document(ids=doc)                      # a buffer doc
    alibi = ac.patterns.alibi(5)                              # a buffer slope, a score mod
    return [window, document, alibi, window, document], doc.tolist()


def per_head_dense(h, i, j, doc):
    if h in (0, 3):
        return 0 <= i - j <= 6
    if h in (1, 4):
        return doc[i] == doc[j] and i >= j
    return i >= j


def test_per_head_masks_and_scores():
    pats, doc = _heads_case()
    N, H = len(doc), len(pats)
    mixed = per_head(pats)
    assert set(mixed.params) == {"W"} and set(mixed.buffers) == {"doc", "slope", "head_group"}
    assert mixed.buffers["head_group"].tolist() == [0, 1, 2, 0, 1]
    # the three ways of saying it are one pattern
    assert per_head(dict(enumerate(pats))) == mixed
    assert per_head([(pats[0], [0, 3]), (pats[1], range(1, 5, 3)), (pats[2], 2)]) == mixed
    got = mask_of(mixed, N, B=1, H=H)[0]
    for h in range(H):
        assert torch.equal(got[h], pairs(N, N, lambda i, j: per_head_dense(h, i, j, doc))), h
    # scores: head h's are its own pattern's (alibi's slope[h] at head 2, none elsewhere)
    q, k, v = qkv(1, H, 1, N, N, 16, seed=1)
    out = ac.reference(q, k, v, mixed)
    for h, p in enumerate(pats):
        assert torch.equal(out[:, h], ac.reference(q, k, v, p)[:, h]), h
    # reassigning heads is a bind (no new IR)
    swapped = mixed.bind(head_group=torch.tensor([2, 1, 0, 0, 1], dtype=torch.int32))
    assert swapped.mask is mixed.mask
    assert torch.equal(mask_of(swapped, N, B=1, H=H)[0, 0], got[2])
    with pytest.raises(PatternError, match="head_group"):  # more heads than patterns
        ac.create_mask(mixed, 1, H + 1, N, N)


def test_per_head_block_mask_is_exact_per_head():
    pats, doc = _heads_case()
    N = len(doc)
    mixed = ac.create_block_mask(per_head(pats), 1, 5, N, N, block_size=8).to_dense()[0]
    for h, p in enumerate(pats):
        own = ac.create_block_mask(p, 1, 5, N, N, block_size=8).to_dense()[0]
        assert torch.equal(mixed[h], own[min(h, own.shape[0] - 1)]), h


def test_per_head_params_and_block_predicates():
    w4, w9 = ac.patterns.sliding_window(4), ac.patterns.sliding_window(9)
    with pytest.raises(PatternError, match="W = 4.*W = 9.*rename=True"):
        per_head([w4, w9])
    d1, d2 = ac.patterns.document(ids=torch.tensor([0, 0, 1, 1, 1])), ac.patterns.document(ids=torch.tensor([0, 1, 1, 1, 1]))
    with pytest.raises(PatternError, match="doc"):
        per_head([d1, d2])
    both = per_head([w4, w9, d1, d2], rename=True)
    assert set(both.params) == {"W_h0", "W_h1"} and set(both.buffers) == {"doc_h2", "doc_h3", "head_group"}
    m = mask_of(both, 5, B=1, H=4)[0]
    for h, p in enumerate([w4, w9, d1, d2]):
        assert torch.equal(m[h], mask_of(p, 5))
    assert torch.equal(mask_of(both.bind(W_h1=0), 5, B=1, H=4)[0, 1], torch.eye(5, dtype=torch.bool))
    # block predicates: one block size kept as a predicate, two folded into the masks
    blk = lambda bs: ac.Pattern(block_mask_mod=lambda b, h, qb, kb: qb >= kb + 1, block_size=bs)  # noqa: E731
    for pats in ([blk(4), ac.patterns.causal(), blk(4)], [blk(4), blk(3)]):
        p = per_head(pats)
        m = mask_of(p, 13, B=1, H=len(pats))[0]
        for h, sub in enumerate(pats):
            assert torch.equal(m[h], mask_of(sub, 13)), h
    assert per_head([blk(4), ac.patterns.causal()]).has_block_mask
    for bad in ([], {0: w4, 2: w9}, [(w4, [0, 1]), (w9, [1])], w4):
        with pytest.raises(ValueError):
            per_head(bad)


def test_per_head_kernels():
    doc = ac.patterns.lengths_to_ids([20, 31, 29])
    pats = [ac.patterns.sliding_window(9), ac.patterns.document(ids=doc) & ac.patterns.softcap(5.0, causal=False),
            ac.patterns.alibi(4), ac.patterns.sliding_window(9)]
    pat = per_head(pats)
    q, k, v = qkv(1, 4, 2, 80, 80, 16, seed=6)
    compare(pat, q, k, v)
    check(pat, q, k, v)


# ----------------------------------------------------------------------------------------------
# block_topk

def direct_selection(q, k, bs, topk, causal):
    """The top-k blocks, written out: pooled means, per query block a sort by (-gate, block)."""
    B, H, Q, _ = q.shape
    group = H // k.shape[1]
    QB, KB = -(-Q // bs), -(-k.shape[2] // bs)
    sel = torch.zeros(B, H, QB, KB, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            qp = [q[b, h, i * bs:(i + 1) * bs].double().mean(0) for i in range(QB)]
            kp = [k[b, h // group, j * bs:(j + 1) * bs].double().mean(0) for j in range(KB)]
            for i in range(QB):
                cands = [j for j in range(KB) if not causal or j <= i]
                ranked = sorted(cands, key=lambda j: (j != i, -float(qp[i] @ kp[j]), j))
                for j in ranked[:topk]:
                    sel[b, h, i, j] = True
    return sel


@pytest.mark.parametrize("Q,KV,bs,topk,causal", [(45, 45, 8, 3, True), (45, 45, 8, 1, True), (37, 37, 5, 20, True),
                                                 (29, 50, 6, 4, False), (64, 64, 16, 2, True)])
def test_block_topk_selection(Q, KV, bs, topk, causal):
    q, k = rand(2, 4, Q, 16, seed=Q), rand(2, 2, KV, 16, seed=KV + 1)
    sel = block_topk_selection(q, k, bs, topk, causal)
    assert torch.equal(sel, direct_selection(q, k, bs, topk, causal))
    QB, KB = sel.shape[-2:]
    i = torch.arange(QB)
    assert sel[..., i[i < KB], i[i < KB]].all()  # the diagonal block, always
    if causal:
        assert not sel.triu(1).any()  # no future block
        assert torch.equal(sel.sum(-1), torch.clamp(i + 1, max=topk).expand(2, 4, QB))
    else:
        assert (sel.sum(-1) == min(topk, KB)).all()
    pat = block_topk(q, k, bs, topk, causal)
    assert torch.equal(pat.buffers["sel"], sel)
    got = mask_of(pat, Q, KV, B=2, H=4)
    for b in range(2):
        for h in range(4):
            s = sel[b, h].tolist()
            assert torch.equal(got[b, h], pairs(Q, KV, lambda a, c: s[a // bs][c // bs] and (c <= a or not causal)))


def test_block_topk_ties_and_given_selection():
    q, k = rand(1, 2, 40, 16), torch.zeros(1, 2, 40, 16)  # every gate 0: the lowest blocks win
    sel = block_topk_selection(q, k, 8, 3)
    want = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 0, 0, 1]]).bool()
    assert torch.equal(sel[0, 0], want) and torch.equal(sel[0, 1], want)
    given = torch.randint(0, 3, (1, 2, 5, 5), generator=torch.Generator().manual_seed(0))  # int, nonzero = on
    pat = block_topk(selected=given, block_size=8, causal=False)
    g = given[0, 1].tolist()
    assert torch.equal(mask_of(pat, 40, B=1, H=2)[0, 1], pairs(40, 40, lambda a, c: g[a // 8][c // 8] != 0))
    for bad in (dict(selected=given.float(), block_size=8), dict(selected=given, block_size=8, topk=2),
                dict(q=q, k=k, block_size=8), dict(q=q, k=k, block_size=0, topk=1)):
        with pytest.raises(ValueError):
            block_topk(**bad)


def test_block_topk_kernels():
    q, k, v = qkv(1, 4, 2, 96, 96, 16, seed=9)
    pat = block_topk(q, k, 16, 2)
    compare(pat, q, k, v)
    check(pat, q, k, v)
    bm = ac.create_block_mask(pat, 1, 4, 96, 96, block_size=16)
    assert torch.equal(bm.to_dense() > 0, pat.buffers["sel"])  # the unselected tiles are skipped
