"""Exact numbers: integer widths, float masks, NaN, division by zero, deep expressions, threads.

Every case here once gave a silently wrong answer or a crash (issue 8); each now matches the
float64 oracle or is refused with a clear error, in Triton's interpreter on CPU (and at real sizes
on the GPU in test_kernels_gpu.py).
"""
import inspect
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attncc as ac
from attncc import PatternError
from attncc.compiler.numerics import numeric_plan
from attncc.dsl import ir
from attncc.testing import TOLERANCE, compare
from threads import run_in_threads


def qkv(B, Hq, Hkv, Q, KV, D=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Q, D, generator=g).to(dtype), torch.randn(B, Hkv, KV, D, generator=g).to(dtype),
            torch.randn(B, Hkv, KV, D, generator=g).to(dtype))


SETTINGS = settings(max_examples=12, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


# ----------------------------------------------------------------------------------------------
# Integers: int32 where it fits, int64 where it does not, refused past int64

def test_hash_style_mask_needs_int64_and_gets_it():
    pat = ac.Pattern(lambda b, h, q, kv: (q * kv * 100000) % 7 == 0)   # q * kv * 1e5 passes 2**31
    compare(pat, *qkv(1, 2, 1, 150, 170))
    assert "tl.int64" in ac.compile(pat, *qkv(1, 2, 1, 150, 170)).source


def test_an_index_through_huge_intermediates_reads_the_right_element():
    buf = torch.arange(200) % 13
    pat = ac.Pattern(lambda b, h, q, kv: buf[((q * 65536 * 32768) // 65536) // 32768] >= kv % 13)
    compare(pat, *qkv(1, 1, 1, 200, 90))


def test_params_near_int32_limits():
    W = ac.param("W", 2 ** 31 - 10)
    pat = ac.Pattern(lambda b, h, q, kv: q + W > kv + W)
    compare(pat, *qkv(1, 1, 1, 80, 80))
    compare(pat.bind(W=-(2 ** 40)), *qkv(1, 1, 1, 80, 80))


def test_int64_overflow_is_refused():
    pat = ac.Pattern(lambda b, h, q, kv: (q * kv * 2 ** 52) % 7 == 0)
    with pytest.raises(PatternError, match="beyond what int64 holds"):
        ac.attention(*qkv(1, 1, 1, 64, 64), pat)
    q, k, v = qkv(1, 1, 1, 8, 8)
    for text in ("mask = q ** 40 >= kv", "mask = q * 4611686018427387904 * 4 >= kv"):  # a coefficient past int64
        pat = ac.parse(text)
        for run in (lambda: ac.attention(q, k, v, pat), lambda: ac.reference(q, k, v, pat),  # the dense paths
                    lambda: ac.create_mask(pat, 1, 1, 8, 8), lambda: ac.create_block_mask(pat, 1, 1, 64, 64)):
            with pytest.raises(PatternError, match="beyond what int64 holds"):  # wrapped, or OverflowError
                run()


def test_narrow_buffers_are_widened_before_arithmetic():
    small = torch.full((100,), 120, dtype=torch.int8)   # int8 arithmetic would wrap at 127
    pat = ac.Pattern(lambda b, h, q, kv: small[q] + small[kv] + q > kv + 200)
    compare(pat, *qkv(1, 1, 1, 100, 100))


@SETTINGS
@given(a=st.integers(-2 ** 33, 2 ** 33), c=st.integers(-2 ** 33, 2 ** 33), W=st.integers(-2 ** 32, 2 ** 32),
       m=st.integers(2, 9), Q=st.integers(1, 70), KV=st.integers(1, 70))
def test_random_large_integer_masks_agree(a, c, W, m, Q, KV):
    """Large coefficients and params around 2**31: kernel, reference and block classifier agree."""
    P = ac.param("P", W)
    pat = ac.Pattern(lambda b, h, q, kv: ((q * a + kv * c + P) % m < m // 2) | (q * a + P > kv * c))
    q, k, v = qkv(1, 1, 1, Q, KV)
    compare(pat, q, k, v)
    dense = ac.create_mask(pat, 1, 1, Q, KV)[0, 0]
    bm = ac.create_block_mask(pat, 1, 1, Q, KV, block_size=16).to_dense()[0, 0]
    tiles = torch.nn.functional.pad(dense, (0, -KV % 16, 0, -Q % 16)).view(-(-Q // 16), 16, -(-KV // 16), 16)
    assert torch.equal(bm == 0, ~tiles.any(3).any(1)) or bool(((bm == 0) <= ~tiles.any(3).any(1)).all())


@pytest.mark.parametrize("c", [0, 3 * 2 ** 24 - 1, 3 * 2 ** 24, 2 ** 30 - 1, 2 ** 30])
def test_abs_bounds_as_unsigned_compares_agree_near_int32_limits(c):
    """|e| <= c prints as one add and an unsigned compare (e + c as uint32 <= 2c) for 0 <= c < 2**30;
    e here spans +-1.6e9, so e + c wraps past 2**31 for large c: every form agrees with the oracle."""
    e = lambda q, kv: (q - kv) * 2 ** 24  # noqa: E731  (int32: |e| < 2**31)
    forms = {"le": lambda b, h, q, kv: abs(e(q, kv)) <= c, "lt": lambda b, h, q, kv: abs(e(q, kv)) < c,
             "ge": lambda b, h, q, kv: c >= abs(e(q, kv)), "gt": lambda b, h, q, kv: c > abs(e(q, kv))}
    for name, fn in forms.items():
        pat = ac.Pattern(fn)
        q, k, v = qkv(1, 1, 1, 97, 101)
        compare(pat, q, k, v)
        rewritten = 0 <= (c - 1 if name in ("lt", "gt") else c) < 2 ** 30
        assert ("tl.uint32, bitcast=True" in ac.compile(pat, q, k, v).source) == rewritten, name


def test_plan_types():
    q, kv = ir.Var("q"), ir.Var("kv")
    big = ir.op("mul", ir.op("mul", q, kv), ir.const(100000))
    root = ir.op("eq", ir.op("mod", big, ir.const(7)), ir.const(0))
    plan = numeric_plan((root,), {}, {}, 1, 1, 1000, 1000)
    assert plan.types[q] == "i32" and plan.types[ir.op("mul", q, kv)] == "i32" and plan.types[big] == "i64"
    assert plan.types[ir.op("mod", big, ir.const(7))] == "i32"   # computed in int64, fits int32
    assert numeric_plan((root,), {}, {}, 1, 1, 100, 100).types[big] == "i32"


# ----------------------------------------------------------------------------------------------
# Floats: masks evaluated in float64 everywhere

@pytest.mark.parametrize("Q, KV", [(97, 131), (131, 97), (64, 200), (75, 75), (33, 100)])
def test_proportional_alignment_mask_agrees(Q, KV):
    r = ac.param("r", KV / Q)
    pat = ac.Pattern(lambda b, h, q, kv: kv <= q * r)
    compare(pat, *qkv(1, 1, 1, Q, KV))
    src = ac.compile(pat, *qkv(1, 1, 1, Q, KV)).source
    assert "tl.float64" in src
    dense = ac.create_mask(pat, 1, 1, Q, KV)[0, 0]
    qi, ki = torch.arange(Q).view(-1, 1).double(), torch.arange(KV).view(1, -1).double()
    assert torch.equal(dense, ki <= qi * (KV / Q))


@SETTINGS
@given(num=st.integers(1, 50), den=st.integers(1, 50), shift=st.floats(-20, 20, allow_nan=False),
       Q=st.integers(1, 90), KV=st.integers(1, 90))
def test_random_float_masks_agree(num, den, shift, Q, KV):
    pat = ac.Pattern(lambda b, h, q, kv: (kv * (num / den) + shift <= q.float().sqrt() * 3.0)
                     | (torch.floor(q / 3.7) == torch.round(kv * 0.25)))
    compare(pat, *qkv(1, 1, 1, Q, KV))


# ----------------------------------------------------------------------------------------------
# NaN: like SDPA at live positions, nothing from masked-out ones

def test_reference_propagates_nan_at_live_positions():
    q, k, v = qkv(1, 1, 1, 20, 20)
    q[0, 0, 5, 3] = math.nan       # row 5 sees it everywhere it is live
    out, lse = ac.reference(q, k, v, ac.patterns.causal(), return_lse=True)
    assert out[0, 0, 5].isnan().all() and lse[0, 0, 5].isnan()
    assert not out[0, 0, :5].isnan().any() and not out[0, 0, 6:].isnan().any()
    compare(ac.patterns.causal(), q, k, v)


def test_sqrt_of_negative_scores_is_nan_in_both():
    pat = ac.Pattern(score_mod=lambda s, b, h, q, kv: torch.sqrt(s))
    q, k, v = qkv(1, 2, 1, 30, 30)
    out = ac.reference(q, k, v, pat)
    assert out.isnan().all()           # every row has a negative score somewhere
    compare(pat, q, k, v)


def test_nan_in_a_masked_out_value_changes_nothing():
    q, k, v = qkv(1, 1, 1, 70, 70)
    v[0, 0, 40, :] = math.nan          # key 40 is masked out for rows < 40
    k[0, 0, 50, :] = math.inf
    pat = ac.patterns.causal()
    out = ac.attention(q, k, v, pat)
    assert not out[0, 0, :40].isnan().any() and out[0, 0, 40:].isnan().all()
    compare(pat, q, k, v)
    k[0, 0, 50, :] = 0.0
    v2 = v.clone()
    v2[0, 0, 40, :] = 0.0
    v2[0, 0, 40, 3] = math.inf         # one entry: NaN in that output column only
    out = ac.attention(q, k, v2, ac.patterns.sliding_window(8))
    assert out[0, 0, 40:49, 3].isnan().all() and not out[0, 0, 40:49, :3].isnan().any()
    assert not out[0, 0, :40].isnan().any() and not out[0, 0, 49:].isnan().any()
    compare(ac.patterns.sliding_window(8), q, k, v2)


def test_exact_kernel_recomputes_exactly_the_listed_tiles(monkeypatch):
    """attention_forward lists the tiles whose accumulator met a NaN (bh * QB + tile);
    attention_forward_exact computes them again. Without it a NaN value masked out for some
    rows of a tile leaks into them (0 * NaN in the dot)."""
    q, k, v = qkv(1, 2, 2, 70, 70)
    pat = ac.patterns.causal()
    kern = ac.compile(pat, q, k, v, kernel_options={"BLOCK_M": 16, "BLOCK_N": 16})  # QB = 5
    exact = kern.module.attention_forward_exact
    listed, run_exact = [], [True]

    class Spy:  # reads the worklist attention_forward left, then runs (or skips) the exact kernel
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                arg = dict(zip(inspect.signature(exact.fn).parameters, args))
                items = arg["Work"][:arg["Count"].item()].tolist()
                listed.append(sorted(divmod(i, 5) for i in items))  # (bh, tile)
                if run_exact[0]:
                    exact[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(kern.module, "attention_forward_exact", Spy())
    kern(q, k, v)
    assert listed == [[]]              # all finite: nothing listed
    v[0, 1, 40, :] = math.nan          # kv tile 2, masked out for rows < 40 (q tile 2 is 32..47)
    out = kern(q, k, v)
    assert listed[1] == [(1, 2), (1, 3), (1, 4)]
    ref = ac.reference(q, k, v, pat)
    assert torch.equal(out.isnan(), ref.isnan()) and not out[0, 1, :40].isnan().any()
    finite = ~ref.isnan()
    assert (out.double()[finite] - ref[finite]).norm() <= TOLERANCE[torch.float32] * ref[finite].norm()
    run_exact[0] = False
    leaky = kern(q, k, v)
    assert leaky[0, 1, 32:40].isnan().all()   # the fast kernel's own result for tile 2
    assert torch.equal(leaky[0, 0], out[0, 0]) and torch.equal(leaky[0, 1, :32], out[0, 1, :32])


def test_nan_constants_compile():
    for pat in (ac.Pattern(score_mod=lambda s, b, h, q, kv: torch.where(q >= kv, s, float("nan"))),
                ac.parse("mask = q >= kv or kv < 3\nscore = where(kv > q + 5, score + nan, score)")):
        compare(pat, *qkv(1, 1, 1, 40, 40))


def test_non_finite_scale_and_params_are_refused():
    q, k, v = qkv(1, 1, 1, 20, 20)
    for scale in (math.inf, math.nan):
        with pytest.raises(ValueError, match="scale must be finite"):
            ac.attention(q, k, v, scale=scale)
        with pytest.raises(ValueError, match="scale must be finite"):
            ac.reference(q, k, v, scale=scale)
    with pytest.raises(PatternError, match="must be finite"):
        ac.patterns.softcap().bind(cap=math.nan)
    with pytest.raises(ac.DSLError, match="must be finite"):
        ac.parse("param W = inf\nmask = q - kv < W")


# ----------------------------------------------------------------------------------------------
# Division by zero and undefined values: refused at build or call time, the same on every device

def test_division_by_zero_is_refused():
    q, k, v = qkv(1, 1, 1, 20, 20)
    with pytest.raises(PatternError, match="division by zero"):
        ac.Pattern(score_mod=lambda s, b, h, q, kv: s / 0)
    with pytest.raises(PatternError, match="the divisor cap of score / cap must not be zero"):
        ac.attention(q, k, v, ac.patterns.softcap().bind(cap=0.0))
    with pytest.raises(PatternError, match="divisor kv - 5 .* fails at b=0, h=0, q=0, kv=5"):
        ac.attention(q, k, v, ac.Pattern(lambda b, h, q, kv: q // (kv - 5) >= 0))
    with pytest.raises(PatternError, match="divisor kv - 5 .* fails"):
        ac.reference(q, k, v, ac.Pattern(lambda b, h, q, kv: q // (kv - 5) >= 0))
    guarded = ac.Pattern(lambda b, h, q, kv: torch.where(kv != 5, q // (kv - 5), 0) >= 0)
    compare(guarded, q, k, v)


def test_undefined_functions_of_indices_are_refused():
    q, k, v = qkv(1, 1, 1, 20, 20)
    with pytest.raises(PatternError, match=r"argument 1.0 \* \(q - kv\) of sqrt must not be negative"):
        ac.attention(q, k, v, ac.Pattern(score_mod=lambda s, b, h, q, kv: s + torch.sqrt((q - kv) * 1.0)))
    ok = ac.Pattern(score_mod=lambda s, b, h, q, kv: s + torch.sqrt(torch.abs(q - kv) * 1.0))
    compare(ok, q, k, v)


def test_t5_log_buckets_run_in_the_kernel():
    from test_trace import _t5_bucket

    bias = torch.randn(2, 32)
    pat = ac.Pattern(score_mod=lambda s, b, h, q, kv: s + bias[h, _t5_bucket(kv - q)])
    compare(pat, *qkv(1, 2, 1, 150, 150))


# ----------------------------------------------------------------------------------------------
# Code generation that scales

def test_long_or_chains_and_deep_sums_compile():
    cols = list(range(3, 1000 * 3, 3))[:199]
    def minference(b, h, q, kv):
        m = q == kv
        for c in cols:
            m = m | (kv == c)
        return m
    compare(ac.Pattern(minference), *qkv(1, 1, 1, 50, 700))
    def deep(b, h, q, kv):
        x = q
        for _ in range(300):
            x = x + 1
        return x >= kv + 300
    compare(ac.Pattern(deep), *qkv(1, 1, 1, 40, 40))
    text = "mask = " + " or ".join(f"kv == {3 * i}" for i in range(1000)) + " or q == kv"
    kern = ac.compile(ac.parse(text), *qkv(1, 1, 1, 32, 64))
    assert max(len(line) - len(line.lstrip("(")) for line in kern.source.splitlines()) < 100
    compare(ac.parse(text), *qkv(1, 1, 1, 32, 64))


def test_mirrored_forms_share_one_kernel():
    q, k, v = qkv(1, 1, 1, 40, 40)
    a = ac.compile(ac.Pattern(lambda b, h, q, kv: kv <= q), q, k, v)
    b = ac.compile(ac.parse("mask = q >= kv"), q, k, v)
    assert a.module is b.module


# ----------------------------------------------------------------------------------------------
# Threads

def test_attention_from_eight_threads_on_cpu():
    pats = [ac.patterns.sliding_window(5 + i) for i in range(8)]
    inputs = [qkv(1, 2, 1, 40, 40, seed=i) for i in range(8)]
    results = run_in_threads(lambda i: ac.attention(*inputs[i], pats[i]), 8)
    for i in range(8):
        ref = ac.reference(*inputs[i], pats[i])
        assert (results[i].double() - ref).norm() / ref.norm() < 1e-5
