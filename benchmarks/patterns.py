"""The benchmark suite's patterns (shared/BENCHMARKS.md), each defined twice: as the attncc pattern
and as plain FlexAttention `mask_mod` / `score_mod` functions with the same semantics.

tests/test_bench_patterns.py checks that both definitions agree element by element. The FlexAttention
functions are also the suite's definition for counting live (q, kv) pairs (`count_live_pairs`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

import attncc as ac

NAMES = ("full", "causal", "swa1024", "prefixlm2048", "document", "natten2d", "natten3d", "dilated", "alibi",
         "softcap")
# beyond the suite (never in its default rows): patterns the cost model's fits have not seen,
# for benchmarks/costmodel.py's out-of-sample checks (and the suite, when named)
VALIDATION_NAMES = ("sinks", "chunked", "global_tokens", "strided_heads")


@dataclass(frozen=True)
class Shape:
    """A benchmark shape: q [B, Hq, N, D], k and v [B, Hkv, N, D]."""
    B: int
    Hq: int
    Hkv: int
    N: int
    D: int

    def label(self) -> str:
        heads = f"H{self.Hq}" if self.Hq == self.Hkv else f"Hq{self.Hq}/Hkv{self.Hkv}"
        return f"B{self.B} {heads} N{self.N} D{self.D}"


# BENCHMARKS.md's shapes (suite.py, costmodel.py), d256 (ours: the cost model's largest head dim
# class), and their tiny CPU versions
SHAPES = {"main": Shape(4, 16, 16, 8192, 128), "d64": Shape(4, 16, 16, 8192, 64),
          "gqa": Shape(4, 32, 8, 8192, 128), "long": Shape(1, 16, 16, 32768, 128),
          "odd": Shape(4, 16, 16, 8000, 128), "d256": Shape(2, 16, 16, 8192, 256),
          "video": Shape(2, 16, 16, 16384, 128)}
SMOKE_SHAPES = {"main": Shape(1, 2, 2, 256, 32), "d64": Shape(1, 2, 2, 256, 16),
                "gqa": Shape(1, 4, 2, 256, 32), "long": Shape(1, 2, 2, 512, 32),
                "odd": Shape(1, 2, 2, 250, 32), "d256": Shape(1, 2, 2, 128, 160),
                "video": Shape(1, 2, 2, 512, 32)}


@dataclass(frozen=True)
class Sizes:
    """The pattern family parameters. `BENCH` is BENCHMARKS.md; `SMOKE` scales them to tiny N."""
    window: int = 1024                                 # swa1024: q >= kv and q - kv <= window
    prefix: int = 2048                                 # prefixlm2048: kv < prefix or q >= kv
    doc_lengths: tuple[int, int] = (256, 3072)         # document: randint(low, high) lengths
    canvas: tuple[int, int, int] = (64, 128, 17)       # natten2d: rows, cols, window (rows*cols = N)
    video: tuple = ((32, 32), (5, 9, 9))               # natten3d: frame (rows, cols), kernel; N // (rows*cols) frames
    dilation: tuple[int, int] = (2048, 4)              # dilated: |q - kv| <= W and (q - kv) % d == 0
    cap: float = 30.0                                  # softcap: cap * tanh(score / cap)
    sinks: tuple[int, int] = (4, 1024)                 # sinks: q >= kv and (kv < S or q - kv <= W)
    chunk: int = 1024                                  # chunked: q // C == kv // C and q >= kv
    global_tokens: tuple[int, int] = (512, 256)        # every G-th token global, |q - kv| <= W
    shards: tuple[int, int] = (8, 256)                 # strided_heads: kv % S == h % S or q - kv <= W


BENCH = Sizes()
SMOKE = Sizes(window=32, prefix=64, doc_lengths=(16, 96), canvas=(16, 16, 5), video=((8, 8), (3, 3, 5)),
              dilation=(64, 4), sinks=(2, 24), chunk=48, global_tokens=(64, 8), shards=(4, 8))


@dataclass(frozen=True)
class BenchPattern:
    """One suite pattern at one size. `sdpa_causal` is None where SDPA has no equivalent."""
    name: str
    attncc: ac.Pattern
    mask_mod: Callable | None
    score_mod: Callable | None
    sdpa_causal: bool | None
    params: dict = field(default_factory=dict)


def document_lengths(n: int, low: int = 256, high: int = 3072, seed: int = 1) -> list[int]:
    """Lengths drawn one by one with `torch.Generator().manual_seed(seed)`, `randint(low, high)`,
    until they fill n tokens; the last one is cut so they sum to exactly n."""
    if n < 1 or not 1 <= low < high:
        raise ValueError(f"document_lengths needs n >= 1 and 1 <= low < high, got n={n}, low={low}, high={high}")
    gen = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    total = 0
    while total < n:
        length = min(int(torch.randint(low, high, (1,), generator=gen)), n - total)
        lengths.append(length)
        total += length
    return lengths


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def build(name: str, n: int, num_heads: int, device: torch.device | str = "cpu",
          sizes: Sizes = BENCH) -> BenchPattern:
    """The pattern `name` for sequences of n tokens and num_heads query heads, buffers on `device`."""
    if name == "full":
        return BenchPattern(name, ac.Pattern(name="full"), None, None, sdpa_causal=False)
    if name == "causal":
        return BenchPattern(name, ac.patterns.causal(), _causal, None, sdpa_causal=True)
    if name == "swa1024":
        w = sizes.window

        def swa(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx <= w)
        return BenchPattern(name, ac.patterns.sliding_window(w), swa, None, None, {"window": w})
    if name == "prefixlm2048":
        p = sizes.prefix

        def prefix_lm(b, h, q_idx, kv_idx):
            return (kv_idx < p) | (q_idx >= kv_idx)
        return BenchPattern(name, ac.patterns.prefix_lm(p), prefix_lm, None, None, {"prefix": p})
    if name == "document":
        lengths = document_lengths(n, *sizes.doc_lengths)
        doc = ac.patterns.lengths_to_ids(lengths, device=device)

        def document(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)
        return BenchPattern(name, ac.patterns.document(ids=doc), document, None, None, {"lengths": lengths})
    if name == "natten2d":
        rows, cols, kernel = sizes.canvas
        if rows * cols != n:
            raise ValueError(f"natten2d is defined on a {rows}x{cols} canvas, so N must be {rows * cols}, got {n}")
        r = kernel // 2

        def natten(b, h, q_idx, kv_idx):
            q_row = (q_idx // cols).clamp(r, rows - 1 - r)
            q_col = (q_idx % cols).clamp(r, cols - 1 - r)
            return ((q_row - kv_idx // cols).abs() <= r) & ((q_col - kv_idx % cols).abs() <= r)
        return BenchPattern(name, ac.patterns.natten2d(rows, cols, kernel), natten, None, None,
                            {"rows": rows, "cols": cols, "kernel": kernel})
    if name == "natten3d":
        (R, C), ks = sizes.video
        if n % (R * C) or n // (R * C) < ks[0]:
            raise ValueError(f"natten3d is defined on videos of {R}x{C} frames (at least {ks[0]}), so N must be a "
                             f"multiple of {R * C} (at least {ks[0] * R * C}), got {n}")
        F = n // (R * C)
        dims = (F, R, C)

        def natten3d(b, h, q_idx, kv_idx):  # clamped window centres per axis (NATTEN, odd kernels)
            live = None
            for x, y, size, k in ((q_idx // (R * C), kv_idx // (R * C), F, ks[0]),
                                  ((q_idx // C) % R, (kv_idx // C) % R, R, ks[1]),
                                  (q_idx % C, kv_idx % C, C, ks[2])):
                axis = (x.clamp(k // 2, size - 1 - k // 2) - y).abs() <= k // 2
                live = axis if live is None else live & axis
            return live
        return BenchPattern(name, ac.patterns.neighborhood(dims, ks), natten3d, None, None,
                            {"video": dims, "kernel": ks})
    if name == "dilated":
        w, d = sizes.dilation

        def dilated(b, h, q_idx, kv_idx):
            return ((q_idx - kv_idx).abs() <= w) & ((q_idx - kv_idx) % d == 0)
        return BenchPattern(name, ac.patterns.dilated(w, d, seq_len=n), dilated, None, None,
                            {"window": w, "dilation": d})
    if name == "alibi":
        slopes = torch.exp2(-8.0 * torch.arange(1, num_heads + 1, dtype=torch.float32, device=device) / num_heads)

        def alibi(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx - q_idx)
        return BenchPattern(name, ac.patterns.alibi(num_heads, device=device), _causal, alibi, None,
                            {"heads": num_heads})
    if name == "softcap":
        cap = sizes.cap

        def softcap(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)
        return BenchPattern(name, ac.patterns.softcap(cap), _causal, softcap, None, {"cap": cap})
    if name == "sinks":
        S, w = sizes.sinks

        def sinks(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & ((kv_idx < S) | (q_idx - kv_idx <= w))
        return BenchPattern(name, ac.patterns.sinks(S, w), sinks, None, None, {"sinks": S, "window": w})
    if name == "chunked":
        c = sizes.chunk

        def chunked(b, h, q_idx, kv_idx):
            return (q_idx // c == kv_idx // c) & (q_idx >= kv_idx)
        return BenchPattern(name, ac.patterns.chunked(c), chunked, None, None, {"chunk": c})
    if name == "global_tokens":
        every, w = sizes.global_tokens
        is_global = torch.arange(n, device=device) % every == 0

        def global_tokens(b, h, q_idx, kv_idx):
            return is_global[q_idx] | is_global[kv_idx] | ((q_idx - kv_idx).abs() <= w)
        return BenchPattern(name, ac.patterns.global_tokens(is_global, w), global_tokens, None, None,
                            {"every": every, "window": w})
    if name == "strided_heads":
        S, w = sizes.shards

        def strided_heads(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & ((kv_idx % S == h % S) | (q_idx - kv_idx <= w))
        return BenchPattern(name, ac.patterns.strided_heads(S, w), strided_heads, None, None,
                            {"shards": S, "window": w})
    raise ValueError(f"unknown pattern {name!r}; known: {', '.join(NAMES + VALIDATION_NAMES)}")


def count_live_pairs(mask_mod: Callable | None, B: int, H: int, Q: int, KV: int,
                     device: torch.device | str = "cpu", budget: int = 1 << 26) -> tuple[int, bool, bool]:
    """(live pairs summed over all B x H heads, mask reads b, mask reads h), counted exactly.

    Evaluates mask_mod densely on chunks of query rows: at most `budget` mask elements at once, so
    no [B, H, Q, KV] tensor is ever materialised. A mask that ignores b (or h) comes back with
    size 1 there and is counted once and multiplied.
    """
    if mask_mod is None:
        return B * H * Q * KV, False, False
    ar = lambda size: torch.arange(size, device=device, dtype=torch.int64)
    b, h, kv = ar(B).view(B, 1, 1, 1), ar(H).view(1, H, 1, 1), ar(KV).view(1, 1, 1, KV)
    rows = max(1, budget // (B * H * KV))
    total, per_b, per_h = 0, False, False
    for q0 in range(0, Q, rows):
        q = ar(min(Q, q0 + rows))[q0:].view(1, 1, -1, 1)
        live = torch.as_tensor(mask_mod(b, h, q, kv))
        live = live.reshape((1,) * (4 - live.dim()) + tuple(live.shape))
        live = live.expand(live.shape[0], live.shape[1], q.shape[2], KV)
        per_b, per_h = per_b or live.shape[0] == B > 1, per_h or live.shape[1] == H > 1
        total += int(live.sum()) * (B // live.shape[0]) * (H // live.shape[1])
    return total, per_b, per_h
