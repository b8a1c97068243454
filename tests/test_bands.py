"""compiler/bands.py: masks as exact unions of bands (and segments), checked pair by pair against
create_mask, and the FA4 windows each band maps to, checked against FA4's bottom-right convention."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attncc as ac
import fa4_emulator
from attncc.compiler import bands
from attncc.patterns import document

P = ac.patterns


def live_pairs(b: bands.Band) -> int:
    """The pairs in a band without a dense mask: the per-row count is piecewise linear in q,
    summed exactly piece by piece (for bands too large to draw)."""
    lo = b.lo if b.lo is not None else -(1 << 62)
    hi = b.hi if b.hi is not None else 1 << 62
    count = lambda q: max(0, min(b.k1 - 1, q + hi) - max(b.k0, q + lo) + 1)  # noqa: E731
    kinks = (b.k0 - hi, b.k1 - lo, b.k1 - 1 - hi, b.k0 - lo)
    cuts = sorted({b.q0, b.q1, *(c for c in kinks if b.q0 < c < b.q1)})
    return sum((count(x) + count(z - 1)) * (z - x) // 2 for x, z in zip(cuts, cuts[1:]))


def band_mask(found, Q, KV):
    """The union of `found` as a dense [Q, KV] mask, asserting the bands are disjoint."""
    m = torch.zeros(Q, KV, dtype=torch.bool)
    d = torch.arange(KV)[None] - torch.arange(Q)[:, None]
    for b in found:
        inside = torch.zeros(Q, KV, dtype=torch.bool)
        inside[b.q0:b.q1, b.k0:b.k1] = True
        if b.lo is not None:
            inside &= d >= b.lo
        if b.hi is not None:
            inside &= d <= b.hi
        assert not (m & inside).any(), "bands overlap"
        assert inside.sum() == live_pairs(b), (b, int(inside.sum()), live_pairs(b))
        m |= inside
    return m


def fa4_window_mask(b: bands.Band, Q, KV):
    """What FA4 computes for one band: its local window (the emulator's, FA4's bottom-right
    convention) on q[q0:q1] x kv[k0:k1]."""
    m = torch.zeros(Q, KV, dtype=torch.bool)
    m[b.q0:b.q1, b.k0:b.k1] = fa4_emulator.window_mask(b.q1 - b.q0, b.k1 - b.k0, *b.window())
    return m


def check(pattern, Q, KV):
    found = bands.bands(pattern.mask, pattern.params, Q, KV)
    if found is not None:
        want = ac.create_mask(pattern, None, None, Q, KV).reshape(Q, KV)
        assert torch.equal(band_mask(found, Q, KV), want)
        for b in found:
            if all(w is None or w >= 0 for w in b.window()):
                assert torch.equal(fa4_window_mask(b, Q, KV), band_mask([b], Q, KV)), b
    return found


CATALOGUE = {
    "causal": (P.causal(), 1), "causal_offset": (P.causal(offset=5), 1), "swa": (P.sliding_window(9), 1),
    "swa_symmetric": (P.sliding_window(7, causal=False), 1), "prefix_lm": (P.prefix_lm(13), 2),
    "sinks": (P.sinks(3, 9), 2), "full": (ac.Pattern(), 1),
    "band_off_diagonal": (ac.Pattern(lambda b, h, q, kv: (q - kv >= 4) & (q - kv < 11)), 1),
}


@pytest.mark.parametrize("name", sorted(CATALOGUE))
@pytest.mark.parametrize("Q, KV", [(41, 41), (23, 41), (41, 23), (1, 1)])
def test_catalogue_masks_are_exact_unions_of_bands(name, Q, KV):
    pattern, count = CATALOGUE[name]
    found = check(pattern, Q, KV)
    assert found is not None and len(found) <= count


def test_the_suite_bands_and_their_windows():
    (swa,) = bands.bands(P.sliding_window(1024).mask, {"W": 1024}, 8192, 8192)
    assert (swa.lo, swa.hi, swa.window()) == (-1024, 0, (1024, 0))
    dense, rest = bands.bands(P.prefix_lm(2048).mask, {"P": 2048}, 8192, 8192)
    assert (dense.k1, dense.window()) == (2048, (None, None))
    assert (rest.q0, rest.k0, rest.k1, rest.window()) == (2048, 2048, 8192, (None, 0))  # FA4's causal
    assert live_pairs(dense) + live_pairs(rest) == 8192 * 2048 + 6144 * 6145 // 2


@pytest.mark.parametrize("pattern", [P.dilated(8, 2), P.natten2d(8, 8, 3), P.alibi(2),
                                     ac.Pattern(lambda b, h, q, kv: (q >= kv) & (h == 0)),
                                     ac.Pattern(lambda b, h, q, kv: 2 * q >= kv)])
def test_what_is_not_a_union_of_bands(pattern):
    """Moduli, 2-D neighbourhoods, head-dependent masks, slopes other than 1: None (alibi's mask is
    causal, which is a band, so only those without one fail)."""
    found = bands.bands(pattern.mask, pattern.params, 37, 37)
    assert found is None or pattern.name == "alibi"


def test_too_many_pieces_is_none():
    stripes = ac.Pattern(lambda b, h, q, kv: ((kv < 4) | ((kv >= 8) & (kv < 12)) | ((kv >= 16) & (kv < 20))
                                              | ((kv >= 24) & (kv < 28)) | (kv >= 32)) & (q >= kv))
    assert bands.bands(stripes.mask, {}, 40, 40) is None
    assert check(ac.Pattern(lambda b, h, q, kv: (kv < 4) | (kv >= 30)), 40, 40) is not None


def test_an_empty_mask_has_no_bands():
    assert bands.bands(ac.Pattern(lambda b, h, q, kv: q - kv > 50).mask, {}, 30, 30) == ()


ATOMS = st.sampled_from(["q - kv", "kv - q", "kv", "q", "abs(q - kv)", "q + 3 - kv", "2 * (kv - q)"])
COMPARES = st.sampled_from(["<", "<=", ">", ">=", "==", "!="])


@st.composite
def masks(draw, depth=2):
    if depth == 0 or draw(st.booleans()):
        return f"({draw(ATOMS)} {draw(COMPARES)} {draw(st.integers(-20, 40))})"
    op = draw(st.sampled_from(["and", "or", "not"]))
    if op == "not":
        return f"(not {draw(masks(depth=depth - 1))})"
    return f"({draw(masks(depth=depth - 1))} {op} {draw(masks(depth=depth - 1))})"


@settings(max_examples=400, deadline=None)
@given(masks(), st.integers(1, 45), st.integers(1, 45))
def test_random_formulas_are_exact_whenever_found(text, Q, KV):
    check(ac.parse(f"mask = {text}"), Q, KV)


def test_segments_of_documents_and_chunks():
    doc = document(lengths=[5, 17, 1, 30])
    seg = bands.segments(doc.mask, doc.params, doc.buffers, 53, 53)
    assert seg.offsets.tolist() == [0, 5, 22, 23, 53] and (seg.lo, seg.hi) == (None, 0)
    both = document(offsets=[0, 7, 7, 20], causal=False)  # an empty document: no run of its own
    seg = bands.segments(both.mask, both.params, both.buffers, 20, 20)
    assert seg.offsets.tolist() == [0, 7, 20] and (seg.lo, seg.hi) == (None, None)
    chunk = P.chunked(16)
    seg = bands.segments(chunk.mask, chunk.params, chunk.buffers, 40, 40)
    assert seg.offsets.tolist() == [0, 16, 32, 40] and seg.longest == 16
    local = doc & ac.Pattern(lambda b, h, q, kv: q - kv <= 3)
    seg = bands.segments(local.mask, local.params, local.buffers, 53, 53)
    assert (seg.lo, seg.hi) == (-3, 0)


def test_what_is_not_segments():
    scattered = document(ids=torch.tensor([0, 0, 1, 1, 0, 2]))  # document 0 in two runs
    assert bands.segments(scattered.mask, {}, scattered.buffers, 6, 6) is None
    doc = document(lengths=[5, 17])
    assert bands.segments(doc.mask, {}, doc.buffers, 22, 20) is None  # Q != KV
    absolute = doc & ac.Pattern(lambda b, h, q, kv: kv >= 3)  # a bound on kv itself, not within segments
    assert bands.segments(absolute.mask, absolute.params, absolute.buffers, 22, 22) is None
    assert bands.segments(P.causal().mask, {}, {}, 9, 9) is None
