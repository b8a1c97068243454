"""The 2-D/3-D vision families of the catalogue (neighborhood, natten2d, sliding_tile, radial),
each against a dense definition written here with plain Python loops over coordinates, then
block classification soundness, a forward check in the interpreter and a backward check."""
import math

import pytest
import torch

import attncc as ac
from attncc.patterns.natten import natten2d
from attncc.patterns.neighborhood import neighborhood
from attncc.patterns.radial import radial
from attncc.patterns.sliding_tile import sliding_tile
from test_backward import check as check_grads, qkv
from test_blockmask import tile_truth
from test_patterns import _window_start, mask_of, pairs


def unravel(i: int, dims) -> tuple:
    """Row-major coordinates of token i on a canvas of `dims`."""
    out = []
    for n in reversed(dims):
        i, c = divmod(i, n)
        out.append(c)
    return tuple(reversed(out))


def natten_keys(x: int, n: int, k: int, d: int, s: int, causal: bool) -> set:
    """The key coordinates NATTEN gives query coordinate x on an axis of n cells: the query's
    dilation sub-grid listed explicitly, its stride group's leader, the window start shifted
    inward (non-causal) or the k positions ending at the leader, cut at the query (causal)."""
    sub = list(range(x % d, n, d))
    L, j = len(sub), sub.index(x)
    if causal:
        leader = min((j // s) * s + s - 1, L - 1)
        window = [i for i in range(L) if i <= j and leader - i < k]
    else:
        leader = min((j // s) * s + s // 2, L - 1)
        start = min(max(leader - k // 2, 0), L - k)
        window = list(range(start, start + k))
    return {sub[i] for i in window}


def dense_neighborhood(dims, kernel, dilation, stride, causal) -> torch.Tensor:
    nd = len(dims)
    per = lambda v: (v,) * nd if isinstance(v, (int, bool)) else tuple(v)  # noqa: E731
    ks, ds, ss, cs = per(kernel), per(dilation), per(stride), per(causal)
    n = math.prod(dims)
    keys = {}
    for a in range(nd):
        for x in range(dims[a]):
            keys[a, x] = natten_keys(x, dims[a], ks[a], ds[a], ss[a], cs[a])
    coords = [unravel(i, dims) for i in range(n)]
    return pairs(n, n, lambda i, j: all(coords[j][a] in keys[a, coords[i][a]] for a in range(nd)))


NEIGHBORHOODS = [
    # 1-D: plain, even kernel, dilation (dividing and not), whole axis, stride, causal
    ((11,), 3, 1, 1, False), ((10,), 4, 1, 1, False), ((12,), 3, 2, 1, False), ((13,), 3, 3, 1, False),
    ((9,), 9, 1, 1, False), ((10,), 5, 1, 2, False), ((11,), 4, 2, 3, False), ((10,), 3, 1, 1, True),
    ((11,), 4, 2, 2, True), ((9,), 3, 3, 3, True), ((14,), 6, 2, 4, False),
    # 2-D
    ((5, 7), (3, 5), 1, 1, False), ((6, 5), (3, 2), (2, 1), 1, False), ((7, 6), 3, 1, (2, 3), False),
    ((5, 6), (2, 3), 1, 1, (True, False)), ((6, 7), 3, 2, (1, 2), (False, True)), ((4, 5), (4, 5), 1, 1, False),
    ((7, 9), (3, 4), (2, 2), (3, 2), (True, True)), ((5, 8), (5, 3), 1, (5, 1), False),
    # 3-D
    ((3, 4, 5), 3, 1, 1, False), ((4, 5, 6), (2, 3, 3), (1, 1, 2), (2, 1, 3), (True, False, False)),
    ((3, 6, 5), (1, 2, 5), (1, 3, 1), 1, False), ((4, 3, 7), (3, 3, 2), (1, 1, 3), (3, 2, 1), (False, True, True)),
]


@pytest.mark.parametrize("dims,kernel,dilation,stride,causal", NEIGHBORHOODS)
def test_neighborhood_matches_natten(dims, kernel, dilation, stride, causal):
    canvas = dims[0] if len(dims) == 1 else dims
    pat = neighborhood(canvas, kernel, dilation=dilation, stride=stride, causal=causal)
    expected = dense_neighborhood(dims, kernel, dilation, stride, causal)
    got = mask_of(pat, math.prod(dims))
    assert torch.equal(got, expected)
    assert not pat.params and not pat.buffers
    if not any(causal if isinstance(causal, tuple) else (causal,)):
        ks = kernel if isinstance(kernel, tuple) else (kernel,) * len(dims)
        assert (got.sum(1) == math.prod(ks)).all()  # every window is full size
    assert ac.parse(str(pat)) == pat


def test_neighborhood_stride_groups_share_windows():
    """GNA: queries of one stride group attend the same keys (non-causal)."""
    m = mask_of(neighborhood((6, 9), (3, 5), stride=(3, 3)), 54)
    for i in range(54):
        leader = (i // 9 // 3 * 3 + 1) * 9 + i % 9 // 3 * 3 + 1
        assert torch.equal(m[i], m[leader])


def test_causal_window_is_truncated_not_shifted():
    m = mask_of(neighborhood(8, 3, causal=True), 8)
    assert m.sum(1).tolist() == [1, 2, 3, 3, 3, 3, 3, 3]
    assert torch.equal(m, pairs(8, 8, lambda i, j: 0 <= i - j <= 2))


def old_natten2d(rows, cols, kernel):
    """natten2d as it was before it became an alias."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    rh, rw = kh // 2, kw // 2

    def mask(b, h, q, kv):
        qr = (q // cols).clamp(rh, rows - 1 - rh)
        qc = (q % cols).clamp(rw, cols - 1 - rw)
        return (abs(qr - kv // cols) <= rh) & (abs(qc - kv % cols) <= rw)

    return ac.Pattern(mask)


@pytest.mark.parametrize("rows,cols,kernel", [(5, 6, 3), (6, 4, (5, 3)), (4, 4, (1, 3)), (7, 11, 3), (9, 9, 7)])
def test_natten2d_is_the_old_mask(rows, cols, kernel):
    new, old = natten2d(rows, cols, kernel), old_natten2d(rows, cols, kernel)
    assert new.mask is old.mask  # the same IR, node for node
    assert new == neighborhood((rows, cols), kernel) and new.name == "natten2d"
    assert torch.equal(mask_of(new, rows * cols), dense_neighborhood((rows, cols), kernel, 1, 1, False))


@pytest.mark.parametrize("args,kw,match", [
    (((5, 6), (7, 3)), {}, "must fit"), (((5, 6), 3), {"dilation": (2, 2)}, "must fit"),
    ((9, 3), {"stride": 4}, "must not exceed"), ((9, 0), {}, ">= 1"), ((9, 3), {"dilation": 0}, ">= 1"),
    (((5, 6), (3, 3, 3)), {}, "tuple of 2"), (((5, 6), 3), {"causal": (True,)}, "tuple of 2"),
    (((5, 6), 3), {"causal": 1}, "bool"), (((2, 3, 4, 5), 1), {}, "1 to 3 dims"), ((9, True), {}, "int"),
    (((5, 6.0), 3), {}, "ints"), ((9, 3), {"stride": 0}, ">= 1"),
])
def test_neighborhood_bad_arguments(args, kw, match):
    with pytest.raises(ValueError, match=match):
        neighborhood(*args, **kw)


# ----------------------------------------------------------------------------------------------
# Sliding tile attention

def dense_sta(dims, kernel, tile, text_len, n_total=None) -> torch.Tensor:
    """STA on row-major tokens: tile windows per axis (start shifted inward), text at the end."""
    nd = len(dims)
    per = lambda v: (v,) * nd if isinstance(v, int) else tuple(v)  # noqa: E731
    ks, ts = per(kernel), per(tile)
    grid = [n // t for n, t in zip(dims, ts)]
    video = math.prod(dims)
    n = n_total or video + text_len
    tile_of = [tuple(c // t for c, t in zip(unravel(i, dims), ts)) for i in range(video)]

    def live(i, j):
        if i >= video or j >= video:  # text (or padding) on either side
            return j < video + text_len
        a, c = tile_of[i], tile_of[j]
        return all(_window_start(a[x], ks[x], grid[x]) <= c[x] < _window_start(a[x], ks[x], grid[x]) + ks[x]
                   for x in range(nd))

    return pairs(n, n, live)


@pytest.mark.parametrize("dims,kernel,tile,text_len", [
    ((8, 10), (3, 3), (2, 2), 0), ((9, 9), (1, 3), (3, 3), 0), ((6, 8), (3, 2), (2, 4), 5),
    ((8, 2, 6), (3, 1, 1), (2, 1, 2), 0), ((4, 6, 4), (3, 1, 2), (1, 2, 2), 0), ((4, 6, 4), (3, 1, 2), (1, 2, 2), 7),
    ((8, 2, 6), (3, 1, 1), (2, 1, 2), 4),
])
def test_sliding_tile(dims, kernel, tile, text_len):
    pat = sliding_tile(dims, kernel, tile, text_len)
    n = math.prod(dims) + text_len
    assert torch.equal(mask_of(pat, n), dense_sta(dims, kernel, tile, text_len))
    assert ac.parse(str(pat)) == pat
    if text_len:  # text_len is a param: a shorter valid text in the same padded length
        short = pat.bind(text_len=text_len - 3)
        assert torch.equal(mask_of(short, n), dense_sta(dims, kernel, tile, text_len - 3, n_total=n))
    else:
        assert not pat.params


@pytest.mark.parametrize("tiles,tile,kernel", [((4, 5), 2, (3, 3)), ((3, 3), 3, (1, 3))])
def test_sliding_tile_is_tile_major_sta_permuted(tiles, tile, kernel):
    """tests/test_patterns.py::test_sliding_tile_attention_2d stores tokens tile by tile; this
    pattern is row-major over the canvas: the same mask up to that permutation of tokens."""
    th, tw = tiles
    kh, kw = kernel
    per_tile = tile * tile

    def tile_live(a, c):
        r0, c0 = _window_start(a // tw, kh, th), _window_start(a % tw, kw, tw)
        return r0 <= c // tw < r0 + kh and c0 <= c % tw < c0 + kw

    tile_major = torch.kron(pairs(th * tw, th * tw, tile_live).int(), torch.ones(per_tile, per_tile, dtype=torch.int))
    rows, cols = th * tile, tw * tile
    # row-major index of the token at position m of the tile-major order
    perm = torch.tensor([((m // per_tile) // tw * tile + m % per_tile // tile) * cols
                         + (m // per_tile) % tw * tile + m % per_tile % tile for m in range(rows * cols)])
    row_major = mask_of(sliding_tile((rows, cols), kernel, tile), rows * cols)
    assert torch.equal(row_major[perm][:, perm], tile_major.bool())


@pytest.mark.parametrize("args,match", [
    (((8, 10), 3, (3, 2)), "multiple"), (((8, 10), (5, 3), 2), "must fit"), (((8, 10), (2, 3), 2), "even"),
    ((8, 3, 2), "2-D"), (((8, 10), 3, 2, -1), "text_len"),
])
def test_sliding_tile_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        sliding_tile(*args)


# ----------------------------------------------------------------------------------------------
# Radial attention

def dense_radial(frames, s, window=None, sink=False, text_len=0, n_total=None) -> torch.Tensor:
    """The paper's mask, literally: band r = floor(log2(max(t, 1))), window |k - l| + 1 <= w / 2^r,
    past it the diagonal of every ceil(2^r / w)-th frame; the own frame; the sink; text at the end."""
    w = window or s
    video = frames * s
    n = n_total or video + text_len

    def live(i, j):
        if i >= video or j >= video:
            return j < video + text_len
        (fi, k), (fj, l) = divmod(i, s), divmod(j, s)
        t = abs(fi - fj)
        r = 0
        while 2 ** (r + 1) <= max(t, 1):
            r += 1
        return (t == 0 or (sink and fj == 0) or abs(k - l) + 1 <= w / 2 ** r
                or (k == l and t % math.ceil(2 ** r / w) == 0))

    return pairs(n, n, live)


@pytest.mark.parametrize("frames,s,window,sink,text_len", [
    (6, 8, None, False, 0), (9, 4, None, False, 0), (17, 4, None, True, 0), (12, 5, 3, False, 0),
    (10, 6, 12, True, 0), (2, 16, None, False, 0), (1, 9, None, False, 0), (9, 3, 2, True, 6),
])
def test_radial(frames, s, window, sink, text_len):
    pat = radial(frames, s, window=window, sink=sink, text_len=text_len)
    n = frames * s + text_len
    assert torch.equal(mask_of(pat, n), dense_radial(frames, s, window, sink, text_len))
    assert not pat.buffers and ac.parse(str(pat)) == pat
    if text_len:
        assert torch.equal(mask_of(pat.bind(text_len=2), n), dense_radial(frames, s, window, sink, 2, n_total=n))


def test_radial_windows_halve_with_frame_distance():
    s = 16
    m = mask_of(radial(9, s), 9 * s)
    row = 4 * s + 8  # frame 4, position 8: keys per frame at distances 0..4
    per_frame = [int(m[row, f * s:(f + 1) * s].sum()) for f in range(9)]
    # |k - l| < 16 / 2^r around position 8: 16, 16 (t=1), 15 (t=2,3: |d| <= 7), 7 (t=4: |d| <= 3)
    assert per_frame == [7, 15, 15, 16, 16, 16, 15, 15, 7]


@pytest.mark.parametrize("kw", [{"frames": 0}, {"tokens_per_frame": 2.5}, {"window": 0}, {"sink": 1},
                                {"text_len": -2}])
def test_radial_bad_arguments(kw):
    args = {"frames": 4, "tokens_per_frame": 8, **kw}
    with pytest.raises(ValueError):
        radial(**args)


# ----------------------------------------------------------------------------------------------
# Block classification, forward and backward

CLASSIFIED = [
    (neighborhood((12, 10), (5, 3)), 120),
    (neighborhood((4, 5, 6), (2, 3, 3), dilation=(1, 1, 2), stride=(2, 1, 3), causal=(True, False, False)), 120),
    (neighborhood(100, 7, dilation=3, stride=2, causal=True), 100),
    (neighborhood((9, 13), (3, 4), dilation=(3, 2), stride=(3, 2)), 117),
    (sliding_tile((8, 10), (3, 3), (2, 2)), 80),
    (sliding_tile((4, 6, 4), (3, 1, 2), (1, 2, 2), text_len=7), 103),
    (radial(9, 12), 108),
    (radial(12, 8, window=3, sink=True, text_len=5), 101),
]


@pytest.mark.parametrize("pattern,n", CLASSIFIED, ids=lambda x: getattr(x, "name", str(x)))
def test_block_classes_are_sound(pattern, n):
    """create_block_mask's FULL tiles are fully live and its EMPTY tiles fully dead."""
    truth = tile_truth(pattern, 1, 1, n, n, 16, 16)
    got = ac.create_block_mask(pattern, None, None, n, n, block_size=(16, 16)).to_dense()
    assert bool(((got != 2) | (truth == 2)).all()), "a FULL tile has a dead pair"
    assert bool(((got != 0) | (truth == 0)).all()), "an EMPTY tile has a live pair"
    assert torch.equal(got, truth)  # and exact: the builder refines what intervals leave open


@pytest.mark.parametrize("pattern,n", [
    (neighborhood((4, 5, 6), (2, 3, 3), dilation=(1, 1, 2), stride=(2, 1, 3), causal=(True, False, False)), 120),
    (sliding_tile((4, 6, 4), (3, 1, 2), (1, 2, 2), text_len=7), 103),
    (radial(12, 8, window=3, sink=True, text_len=5), 101),
], ids=["neighborhood3d", "sliding_tile3d", "radial"])
def test_forward_in_the_interpreter(pattern, n):
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for _ in range(3))
    ac.testing.compare(pattern, q, k, v)


def test_backward_against_float64_autograd():
    pat = neighborhood((9, 11), (3, 4), dilation=(2, 1), stride=(1, 2), causal=(False, True))
    check_grads(pat, *qkv(1, 2, 1, 99, 99, 16))


def test_per_head_keeps_a_shared_token_layout():
    nb = ac.patterns.neighborhood((16, 16), 5)
    assert ac.patterns.per_head([nb, nb]).layout == nb.layout
    assert ac.patterns.per_head([nb, nb & ac.patterns.softcap(3.0, causal=False)]).layout == nb.layout
    assert ac.patterns.per_head([nb, ac.patterns.causal()]).layout is None  # natural order for both
