"""Tree attention (speculative decoding: SpecInfer, Miao et al. 2024; Medusa, Cai et al. 2024).

The candidate continuations form a token tree: `parents[i]` is the parent of tree token i (-1 for
a root, `parents[i] < i`, so the tokens are in topological order). A tree token attends to itself
and to its ancestors, and to every token of an ordinary causal prefix (the prompt / KV cache) of
`prefix_len` tokens placed before the tree:

    mask(q, kv) = is_ancestor_or_self(kv, q)                      (no prefix)
    mask(q, kv) = q >= kv and (kv < P or is_ancestor_or_self(kv - P, q - P))   (prefix of P)

Positions are in the concatenated sequence [prefix; tree] (Q_LEN = KV_LEN = P + N), prefix tokens
being plainly causal among themselves. With `queries="tree"` the queries are the N tree tokens
only (Q_LEN = N, KV_LEN = P + N: verifying a tree against a KV cache): query i is tree token i.

Ancestry is exact, in O(N * (depth + 1)) memory, not a dense N x N table: `depth` int32 [N]
(roots 0) and `anc` int32 [N, max depth + 1], anc[i, d] = the ancestor of i at depth d for
d <= depth[i] (anc[i, depth[i]] = i), -1 for deeper d. Token j is an ancestor of i, or i itself,
iff anc[i, depth[j]] == j: one load and a compare per score. P is a param (rebinding the prefix
length never recompiles); the tables are buffers.
"""
import torch

from ..dsl.pattern import Pattern
from ..dsl.trace import param


def ancestor_table(parents) -> tuple[torch.Tensor, torch.Tensor]:
    """(depth int32 [N], anc int32 [N, max depth + 1]) of a parent array (see the module docstring).

    O(N * depth) time and memory, vectorised over tokens (one pass per tree level)."""
    parents = torch.as_tensor(parents)
    if parents.dim() != 1 or parents.numel() == 0:
        raise ValueError(f"parents must be a non-empty 1-D tensor, got shape {tuple(parents.shape)}")
    if parents.is_floating_point() or parents.dtype == torch.bool:
        raise ValueError(f"parents must hold integers, got {parents.dtype}")
    parents = parents.long()
    n = parents.numel()
    idx = torch.arange(n, device=parents.device)
    bad = (parents < -1) | (parents >= idx)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"parents[{i}] = {int(parents[i])}: each parent must be -1 (a root) or an "
                         f"earlier token (parents[i] < i)")
    depth = torch.zeros(n, dtype=torch.long, device=parents.device)
    up = parents.clone()
    while bool((up >= 0).any()):  # one step up the tree per pass: depth passes
        live = up >= 0
        depth += live
        up = torch.where(live, parents[up.clamp(min=0)], -1)
    max_depth = int(depth.max())
    anc = torch.full((n, max_depth + 1), -1, dtype=torch.int32, device=parents.device)
    cur, level = idx.clone(), depth.clone()
    for _ in range(max_depth + 1):  # anc[i, depth of i's k-th ancestor] = that ancestor
        live = cur >= 0
        anc[idx[live], level[live]] = cur[live].int()
        cur = torch.where(live, parents[cur.clamp(min=0)], -1)
        level = level - 1
    return depth.int(), anc


def tree(parents, prefix_len: int = 0, queries: str = "all") -> Pattern:
    """mask = anc[q', depth[kv']] == kv' (tree positions q', kv'), with a causal prefix of P tokens.

    parents: int [N], -1 for roots, parents[i] < i. prefix_len: P causal context tokens before the
    tree, seen by every tree token (a param when > 0). queries: "all" (q and kv index the whole
    sequence of P + N tokens) or "tree" (q indexes the N tree tokens only)."""
    if queries not in ("all", "tree"):
        raise ValueError(f"queries must be 'all' or 'tree', got {queries!r}")
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or prefix_len < 0:
        raise ValueError(f"prefix_len must be a non-negative int, got {prefix_len!r}")
    depth, anc = ancestor_table(parents)

    if prefix_len == 0:
        def tree_mask(b, h, q, kv):
            return anc[q, depth[kv]] == kv
        return Pattern(tree_mask, name="tree")

    P = param("P", prefix_len)
    if queries == "tree":
        def tree_mask(b, h, q, kv):
            t = (kv - P).clamp(min=0)  # the tree position of a key (clamped: prefix keys read row 0)
            return (kv < P) | (anc[q, depth[t]] == t)
        return Pattern(tree_mask, name="tree")

    def tree_mask(b, h, q, kv):
        i, j = (q - P).clamp(min=0), (kv - P).clamp(min=0)
        return (q >= kv) & ((kv < P) | (anc[i, depth[j]] == j))
    return Pattern(tree_mask, name="tree")
