"""Radial Attention (Li et al., "Radial Attention: O(n log n) Sparse Attention with Energy Decay
for Long Video Generation", 2025): a static video mask whose spatial window halves each time the
frame distance doubles.

Tokens: `frames` frames of `tokens_per_frame` = s tokens each, frame by frame; token i is at
frame i // s, spatial position i % s (the flattened within-frame index: the paper's spatial
distance is |k - l| between these positions). For a query at (frame f_q, position k) and a key at
(f_k, l), with t = |f_q - f_k|, band r = floor(log2(max(t, 1))), P = 2^r and width w (`window`,
default s, the paper's choice), the pair attends iff

    P * (|k - l| + 1) <= w                        (spatial window: |k - l| < w / 2^r)
    or  k == l and t % ceil(P / w) == 0           (past the last band wide enough for one token,
                                                   only the diagonal of every ceil(P/w)-th frame)

which is the paper's mask (Sec. 4.1) with s replaced by w. With w = s, frames at distance 0 and
1 attend fully, distances 2-3 see |k - l| < s/2, 4-7 |k - l| < s/4, and so on. A query also
attends its whole own frame (t = 0) whatever w, and with `sink=True` every query attends all of
frame 0 (the attention sink the official implementation always adds). P is a chain of integer
`where`s over the frame distance (no buffer).

Text: with text_len > 0 the sequence is the frames * s video tokens, then the text; every query
attends the first text_len text keys and text queries attend every video key and those text keys
(text_len is a param; keys past them, padding, are attended by nothing), as in
`sliding_tile`. With text_len = 0 Q_LEN = KV_LEN = frames * s (not checked: a Pattern carries
no length). The official code rounds windows to its 128-token blocks; this is the token-level
mask of the paper's definition. It takes no token layout: its spatial distance is the flattened
within-frame index, so the natural frame-major order already keeps each band's keys in one run of
tokens per frame (a brick layout, as `neighborhood` picks, would only scatter them).
"""
from __future__ import annotations

import torch

from ..dsl.pattern import Pattern
from ..dsl.trace import param


def _power_of_two_floor(t, largest: int):
    """2^floor(log2(max(t, 1))) for traced 0 <= t <= largest, as a chain of integer `where`s."""
    p, m = 1, 2
    while m <= largest:
        p = torch.where(t >= m, m, p)
        m *= 2
    return p


def radial(frames: int, tokens_per_frame: int, window: int | None = None, sink: bool = False,
           text_len: int = 0) -> Pattern:
    """Radial attention over `frames` frames of `tokens_per_frame` tokens (rule in the module
    docstring); window: the band-0 width w (default tokens_per_frame); sink: frame 0 attended by
    every query; text_len: text tokens after the video (a param when > 0)."""
    for what, v, low in (("frames", frames, 1), ("tokens_per_frame", tokens_per_frame, 1),
                         ("text_len", text_len, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{what} must be an int >= {low}, got {v!r}")
    s = tokens_per_frame
    w = s if window is None else window
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if not isinstance(sink, bool):
        raise ValueError(f"sink must be a bool, got {sink!r}")
    largest = 1 << max(frames - 1, 1).bit_length() - 1  # the largest P: 2^floor(log2(frames - 1))
    video = frames * s

    def video_mask(q, kv):
        fq, fk = q // s, kv // s
        t = abs(fq - fk)
        dp = abs(q % s - kv % s)
        p = _power_of_two_floor(t, frames - 1)
        live = p * (dp + 1) <= w
        if largest > w:  # some band is narrower than one token: its sub-sampled diagonals
            live = live | ((dp == 0) & (t % ((p + w - 1) // w) == 0))
        if w < s:  # band 0 does not cover the own frame
            live = live | (fq == fk)
        if sink:
            live = live | (kv < s)
        return live

    if text_len == 0:
        return Pattern(lambda b, h, q, kv: video_mask(q, kv), name="radial")
    T = param("text_len", text_len)

    def mask(b, h, q, kv):
        return ((kv < video) & video_mask(q, kv)) | (((q >= video) | (kv >= video)) & (kv < video + T))

    return Pattern(mask, name="radial")
