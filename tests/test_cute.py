"""The CuTe-DSL printer (compiler/cute.py): the FlashAttention-4 hooks it prints for every operator,
the catalogue and random patterns, run with plain numbers through tests/cute_shim.py against the
float64 evaluator; text-level checks of what FA4 sees. The real DSL runs in tests/test_fa4_gpu.py."""
from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attncc as ac
from attncc.compiler import cute, evaluate
from attncc.compiler.codegen import kernel_roots
from attncc.compiler.lowering import BufferSpec
from attncc.compiler.numerics import numeric_plan
from attncc.dsl import ir, ops
from attncc.runtime import fa4
from attncc.runtime.inputs import Shapes

import cute_shim
import fa4_emulator
import ir_terms
from test_ops import as_mask, sample

B, H, Q, KV = 2, 3, 37, 29
_SCORES = (-3.0, -0.5, 0.0, 0.25, 1.0, 2.5)


def hooks_of(pattern: ac.Pattern):
    """(namespace of the generated hooks under the shim, source, aux_tensors (None), aux_scalars)."""
    roots = kernel_roots(pattern, "backward")
    buffers = {n: t for n, t in pattern.buffers.items()}
    plan = numeric_plan(roots, pattern.params, buffers, B, H, Q, KV)
    specs = {n: BufferSpec.of(n, t) for n, t in buffers.items()}
    source = cute.generate(pattern, roots, specs, plan, "test")
    ns = cute_shim.load(source)
    inputs = cute.hook_inputs(pattern, roots, specs, plan)
    scalars, _ = fa4.aux_scalars(fa4_emulator.namespace(), inputs, pattern.params, buffers,
                                 Shapes(B, H, H, Q, KV, 16, 16))
    return ns, source, None, scalars or None


def points(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [(rng.randrange(B), rng.randrange(H), rng.randrange(Q), rng.randrange(KV), rng.choice(_SCORES))
            for _ in range(n)]


def want(node: ir.Node, pattern: ac.Pattern, pts) -> list:
    env = {"b": torch.tensor([p[0] for p in pts]), "h": torch.tensor([p[1] for p in pts]),
           "q": torch.tensor([p[2] for p in pts]), "kv": torch.tensor([p[3] for p in pts]),
           "score": torch.tensor([p[4] for p in pts], dtype=torch.float64)}
    out = evaluate.evaluate(node, env, pattern.params, pattern.buffers)
    return out.expand(len(pts)).tolist()


def run_hook(ns, name: str, tensors, scalars, pts, grad: float = 1.5) -> list:
    """The hook at each point, two lanes per call (FA4 passes SSA vectors of 1, 2 or 4 lanes)."""
    I32, F32 = cute_shim._Type("i32"), cute_shim._Type("f32")
    out = []
    for i in range(0, len(pts), 2):
        chunk = pts[i:i + 2]
        b, h, q, kv = (cute_shim.SSA([p[j] for p in chunk], I32) for j in range(4))
        score = cute_shim.SSA([p[4] for p in chunk], F32)
        if name == "mask_mod":
            res = ns["mask_mod"](b, h, q, kv, None, tensors, scalars)
        elif name == "score_mod":
            res = ns["score_mod"](score, b, h, q_idx=q, kv_idx=kv, seqlen_info=None, aux_tensors=tensors,
                                  aux_scalars=scalars)
        else:
            g = cute_shim.SSA([grad] * len(chunk), F32)
            res = ns["score_mod_bwd"](g, score, b, h, q_idx=q, kv_idx=kv, seqlen_info=None,
                                      aux_tensors=tensors, aux_scalars=scalars)
        assert len(res) == len(chunk)
        out += [r.v for r in res]
    return out


def close(got: float, expected: float) -> bool:
    if math.isnan(expected) or math.isinf(expected):
        return got == expected or (math.isnan(got) and math.isnan(expected))
    return abs(got - expected) <= 2e-5 * (1.0 + abs(expected))


def check(pattern: ac.Pattern, n: int = 24, seed: int = 0) -> str:
    """Every hook of `pattern` against the evaluator; returns the source for text checks."""
    ns, source, tensors, scalars = hooks_of(pattern)
    pts = points(n, seed)
    roots = kernel_roots(pattern, "backward")
    hooks = cute.hook_roots(pattern, roots)
    for name, root in hooks.items():
        got = run_hook(ns, name, tensors, scalars, pts)
        expected = want(root, pattern, pts)
        if name == "score_mod_bwd":
            expected = [1.5 * e for e in expected]
        if name == "mask_mod":
            assert got == [bool(e) for e in expected], (name, str(root))
        else:
            bad = [(p, g, e) for p, g, e in zip(pts, got, expected) if not close(g, e)]
            assert not bad, (name, str(root), bad[:3])
    return source


@pytest.mark.parametrize("name", sorted(ops.TABLE))
def test_every_operator_prints_and_evaluates(name):
    node = sample(name)
    if ir.kind_of(node) == "bool":
        pattern = ac.Pattern.from_ir(mask=ir.op("or", as_mask(node), ir.op("eq", ir.Var("q"), ir.Var("kv"))))
    else:
        pattern = ac.Pattern.from_ir(score=ir.op("add", ir.Var("score"), ir.op("mul", ir.const(0.1), node)))
    check(pattern, n=40)


@pytest.mark.parametrize("name", ["causal", "sliding_window", "document", "alibi", "softcap", "prefix_lm",
                                  "dilated", "relative_bias", "t5", "tree", "vertical_slash", "natten"])
def test_catalogue_patterns(name):
    g = torch.Generator().manual_seed(1)
    make = {
        "causal": lambda: ac.patterns.causal(),
        "sliding_window": lambda: ac.patterns.sliding_window(5),
        "document": lambda: ac.patterns.document(lengths=[10, 7, 20]),
        "alibi": lambda: ac.patterns.alibi(H),
        "softcap": lambda: ac.patterns.softcap(20.0),
        "prefix_lm": lambda: ac.patterns.prefix_lm(6),
        "dilated": lambda: ac.patterns.dilated(4, 2),
        "relative_bias": lambda: ac.patterns.relative_bias(torch.randn(H, 2 * Q - 1, generator=g)),
        "t5": lambda: ac.patterns.relative_bias(torch.randn(32, H, generator=g), num_buckets=32),
        "tree": lambda: ac.patterns.tree(torch.tensor([-1] + [i // 2 for i in range(Q - 1)])),
        "vertical_slash": lambda: ac.patterns.vertical_slash(torch.tensor([[0, 3]] * H), torch.tensor([[0, 5]] * H), Q),
        "natten": lambda: ac.patterns.natten2d(5, 8, 3),
    }[name]
    try:
        pattern = make()
    except TypeError as exc:  # a catalogue signature this test guessed wrong is the test's bug
        pytest.fail(f"{name}: {exc}")
    check(pattern.kernel_pattern, n=60)


def test_params_are_runtime_scalars():
    pattern = ac.parse("param W = 4\nmask = q - kv <= W and kv <= q")
    ns, source, tensors, scalars = hooks_of(pattern)
    assert "p_W = aux_scalars[0]" in source and "4" not in source.split('"""')[-1]
    assert [type(s).__name__ for s in scalars] == ["Num"] and scalars[0].v == 4
    pts = points(40)
    assert run_hook(ns, "mask_mod", tensors, scalars, pts) == [(0 <= p[2] - p[3] <= 4) for p in pts]
    wider = cute_shim._Type("i32")(9),
    assert run_hook(ns, "mask_mod", tensors, wider, pts) == [(0 <= p[2] - p[3] <= 9) for p in pts]


def test_text_of_the_hooks():
    pattern = ac.patterns.softcap(30.0) & ac.patterns.causal()
    source = check(pattern)
    assert "def mask_mod(batch_idx, head_idx, q_idx, kv_idx, seqlen_info, aux_tensors, aux_scalars=None):" in source
    assert "def score_mod(score_ssa, batch_idx, head_idx, q_idx, kv_idx, seqlen_info, aux_tensors" in source
    assert "def score_mod_bwd(grad_ssa, score_ssa," in source
    assert "cute.math.tanh(" in source and "approx=True" in source
    compile(source, "<hooks>", "exec")  # plain Python syntax: the DSL's preprocessor reads it as Python
    plain = cute.generate(ac.Pattern(name="full"), (ir.TRUE, ir.Var("score"), ir.const(0.0)), {},
                          numeric_plan((ir.TRUE, ir.Var("score")), {}, {}, 1, 1, 8, 8), "test")
    assert "def mask_mod" not in plain and "def score_mod" not in plain


def test_signed_floor_mod_does_not_rely_on_the_dsl_percent():
    pattern = ac.Pattern.from_ir(mask=ir.op("eq", ir.op("mod", ir.op("sub", ir.Var("q"), ir.Var("kv")), ir.const(3)),
                                            ir.const(1)))
    source = check(pattern, n=80)
    assert "floormod_i(" in source  # q - kv may be negative: the shim's % truncates, as the DSL's may
    nonneg = check(ac.Pattern.from_ir(mask=ir.op("eq", ir.op("mod", ir.Var("q"), ir.const(3)), ir.const(1))))
    assert "floormod_i(" not in nonneg


def test_wide_buffers_are_refused_with_a_reason():
    class Huge:  # a 2**31-element buffer without allocating it
        pass
    node = ir.load("t", (ir.Var("kv"),))
    plan = numeric_plan((node,), {}, {"t": torch.zeros(8)}, 1, 1, 8, 8)
    plan.offsets[node] = "i64"
    with pytest.raises(ir.IRError, match="2\\*\\*31"):
        cute.CuteLowering({"t": BufferSpec("t", torch.float32, 1)}, plan).lower(node)


_TERMS = ir_terms.BUFFERS


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(mask=ir_terms.bool_terms(3, score=False), score=ir_terms.arith_float_terms(2), seed=st.integers(0, 99))
def test_random_terms(mask, score, seed):
    mask_ir, score_ir = ir_terms.build(mask), ir_terms.build(score)
    if ir.kind_of(mask_ir) != "bool" or ir.kind_of(score_ir) != "float":
        return
    params = {k: v for k, v in ir_terms.PARAMS.items() if any(n.name == k for n in ir.walk(mask_ir) if isinstance(n, ir.Param))
              or any(n.name == k for n in ir.walk(score_ir) if isinstance(n, ir.Param))}
    bufs = {k: v for k, v in _TERMS.items() if any(isinstance(n, ir.Load) and n.buffer == k
                                                    for e in (mask_ir, score_ir) for n in ir.walk(e))}
    try:
        pattern = ac.Pattern.from_ir(mask=mask_ir, score=score_ir, params=params, buffers=bufs)
        roots = kernel_roots(pattern, "backward")
        numeric_plan(roots, pattern.params, pattern.buffers, B, H, Q, KV)
    except ac.PatternError:
        return  # an expression the numeric plan refuses (beyond int64) is not the printer's concern
    check(pattern, n=16, seed=seed)


def test_buffers_travel_as_addresses_and_reads_stay_in_range_on_padded_positions():
    """Buffers reach the hooks as addresses and strides among aux_scalars (no aux tensors, so FA4
    skips its per-element index wrap); a hook that reads a buffer at an index of q (kv) clamps q
    (kv) to Q - 1 (KV - 1), so on the padded rows and columns of a ragged tile, which FA4 also
    evaluates and then discards, it reads inside the buffer. Every dtype a buffer may have reads
    back its values."""
    pattern = ac.patterns.alibi(H)
    alibi = check(pattern)
    roots = kernel_roots(pattern, "backward")
    specs = {n: BufferSpec.of(n, t) for n, t in pattern.buffers.items()}
    plan = numeric_plan(roots, pattern.params, pattern.buffers, B, H, Q, KV)
    inputs = cute.hook_inputs(pattern, roots, specs, plan)
    assert inputs.pointers == (("slope", 1),) and inputs.bounds == ()  # read at h only: no clamp
    assert inputs.scalar_slots() == [("address", "slope", 0), ("stride", "slope", 0)]
    assert "cute.make_ptr(cutlass.Float32, aux_scalars[0], cute.AddressSpace.gmem, assumed_align=4)" in alibi
    assert "aux_tensors[" not in alibi and "_last" not in alibi
    g = torch.Generator().manual_seed(2)
    padded = [(b, h, q, kv, s) for b, h, q, kv, s in points(24, seed=5)
              for q, kv in ((q + Q, kv), (q, kv + KV), (Q + 90, KV + 90))]
    for dtype in (torch.bool, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.float16,
                  torch.bfloat16, torch.float32, torch.float64):
        table = (torch.randn(B, H, generator=g) * 3).to(dtype)
        shift = torch.randint(0, 5, (KV,), generator=g, dtype=torch.int32)
        bias = torch.randn(Q, generator=g)
        both = ac.Pattern(lambda b, h, q, kv: (q - kv + shift[kv] >= 0) & (q + shift[b] >= kv),
                          lambda s, b, h, q, kv: s + table[b, h] * 0.5 + bias[q])
        source = check(both, n=40, seed=int(dtype.itemsize))
        assert "ptr_table" in source and "ptr_shift" in source and "aux_tensors[" not in source, dtype
        ns, _, _, scalars = hooks_of(both)
        roots = kernel_roots(both, "backward")
        for name in cute.hook_roots(both, roots):
            clamped = [(b, h, min(q, Q - 1), min(kv, KV - 1), s) for b, h, q, kv, s in padded]
            assert run_hook(ns, name, None, scalars, padded) == run_hook(ns, name, None, scalars, clamped), name
    per_head = ac.patterns.per_head({0: ac.patterns.causal(), 1: ac.patterns.sliding_window(4),
                                     2: ac.patterns.causal()})
    assert "ptr_head_group" in check(per_head, n=40)
