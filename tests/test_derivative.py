"""compiler/derivative.py: score-mod derivatives as IR, against torch's autograd in float64."""
import math
import os
import subprocess
import sys

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attncc as ac
from attncc.compiler import evaluate
from attncc.compiler.derivative import derivative
from attncc.dsl import ir, ops
from ir_terms import BUFFERS, FBUF, PARAMS, build, float_terms

SCORE = ir.Var("score")


def test_every_operator_has_a_derivative_rule():
    assert all(callable(row.derivative) for row in ops.ROWS)


def test_catalogue_derivatives_read_as_on_paper():
    assert str(derivative(ac.patterns.softcap(30.0).score, SCORE)) == "1.0 - tanh(score / cap) ** 2"
    alibi = ac.patterns.alibi(8).score
    slope = next(n for n in ir.walk(alibi) if isinstance(n, ir.Load))
    assert derivative(alibi, SCORE) is ir.const(1.0)
    assert str(derivative(alibi, slope)) == "1.0 * (kv - q)"
    assert derivative(ir.op("floor", SCORE), SCORE) is None                 # piecewise constant
    assert derivative(ac.Pattern().score, SCORE) is ir.const(1.0)


def _points(seed: int, n: int = 64):
    g = torch.Generator().manual_seed(seed)
    env = {"q": torch.randint(0, 40, (n,), generator=g), "kv": torch.randint(0, 40, (n,), generator=g),
           "h": torch.randint(0, 4, (n,), generator=g), "b": torch.randint(0, 2, (n,), generator=g)}
    env["score"] = (torch.randn(n, generator=g, dtype=torch.float64) * 2).requires_grad_()
    return env


@settings(max_examples=150, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(term=float_terms(3), seed=st.integers(0, 1000))
def test_random_score_mods_match_autograd(term, seed):
    """d/d(score) and d/d(each buffer read) of random float expressions (all operators, buffer
    reads, where, min/max ties), evaluated where both sides are finite."""
    node = build(term)
    if ir.kind_of(node) != "float":
        node = ir.op("mul", ir.const(1.0), node)
    env = _points(seed)
    fbuf = FBUF.clone().requires_grad_()
    buffers = {**BUFFERS, "fbuf": fbuf}
    out = evaluate.evaluate(node, env, PARAMS, buffers).expand(env["score"].shape)
    if out.requires_grad:
        d_score, d_buf = torch.autograd.grad(out.sum(), [env["score"], fbuf], allow_unused=True)
    else:  # a constant of score and buffers
        d_score = d_buf = None
    detached = {k: v.detach() for k, v in env.items()}
    plain = {**BUFFERS, "fbuf": FBUF}
    finite = torch.isfinite(out.detach())

    def value(expr):
        if expr is None:
            return torch.zeros_like(detached["score"])
        return evaluate.evaluate(expr, detached, PARAMS, plain).double().expand(detached["score"].shape)

    ours = value(derivative(node, SCORE))
    theirs = torch.zeros_like(ours) if d_score is None else d_score
    ok = finite & torch.isfinite(ours) & torch.isfinite(theirs)
    assert torch.allclose(ours[ok], theirs[ok], rtol=1e-9, atol=1e-12), (str(node), ours[ok], theirs[ok])
    # a buffer's gradient: each read's derivative, scattered to the element it read
    grad = torch.zeros_like(FBUF)
    for load in {n for n in ir.walk(node) if isinstance(n, ir.Load) and n.buffer == "fbuf"}:
        index = evaluate.evaluate(load.index[0], detached, PARAMS, plain).expand(detached["score"].shape)
        contrib = value(derivative(node, load))
        if not bool(torch.isfinite(contrib[finite]).all()):
            return  # an infinite slope somewhere: nothing to compare element-wise
        grad.index_add_(0, index[finite].long(), contrib[finite])
    if d_buf is not None and bool(torch.isfinite(d_buf).all()) and bool(finite.all()):
        assert torch.allclose(grad, d_buf, rtol=1e-9, atol=1e-12), (str(node), grad, d_buf)


def test_t5_bucket_bias_gradient_is_one_per_element():
    from test_trace import _t5_bucket

    bias = torch.randn(2, 32)
    pat = ac.Pattern(score_mod=lambda s, b, h, q, kv: s + bias[h, _t5_bucket(kv - q)])
    load = next(n for n in ir.walk(pat.score) if isinstance(n, ir.Load))
    assert derivative(pat.score, SCORE) is ir.const(1.0) and derivative(pat.score, load) is ir.const(1.0)


def test_derivatives_of_powers_and_divisions():
    s = SCORE
    cases = {ir.op("pow", s, ir.const(3)): lambda x: 3 * x ** 2,
             ir.op("truediv", ir.const(1.0), s): lambda x: -1 / x ** 2,
             ir.op("sqrt", ir.op("mul", s, s)): lambda x: x / abs(x),
             ir.op("exp2", ir.op("neg", s)): lambda x: -math.log(2) * 2 ** -x}
    for expr, expected in cases.items():
        d = derivative(expr, s)
        for x in (-1.5, 0.3, 2.0):
            got = float(evaluate.evaluate(d, {"score": torch.tensor(x, dtype=torch.float64)}, {}, {}))
            assert math.isclose(got, expected(x), rel_tol=1e-12), (str(expr), str(d), x)


FIRST_CALLS = """
import sys, torch, attncc as ac
q, k, v = (torch.empty(2, 4, 4096, 128, device="meta", dtype=torch.bfloat16) for _ in range(3))
for pattern in (ac.patterns.sliding_window(512), ac.patterns.alibi(4)):
    for backend in ("fa4", "triton"):
        ac.compile(pattern, q, k, v, target="h200", kernel_options={"backend": backend}).source
assert "sympy" not in sys.modules, "an additive score mod imported sympy"
kern = ac.compile(ac.patterns.softcap(20.0), q, k, v, target="h200", kernel_options={"backend": "fa4"})
assert "1.0 - " in kern.source  # the simplified derivative, 1 - tanh(score / cap) ** 2
print("sympy" in sys.modules)  # tanh's derivative is simplified: by sympy, or from the disk cache
"""


def test_additive_score_mods_compile_without_importing_sympy(tmp_path):
    """d(score + bias)/d(score) is the constant 1: its simplification imports nothing (sympy's
    import is 0.2-0.3 s of a first call in a new process); softcap's derivative imports sympy in
    the first process only: the next reads its simplification from the disk cache."""
    env = {**os.environ, "ATTNCC_CACHE_DIR": str(tmp_path)}
    for imported in ("True", "False"):
        done = subprocess.run([sys.executable, "-c", FIRST_CALLS], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip().splitlines()[-1] == imported


def test_simplifications_are_memoised_by_shape(tmp_path, monkeypatch):
    """A simplification is kept (memory, then disk) by the expression's shape: another score mod
    of the same shape over other leaves gets its own leaves back, and a process that forgot its
    memo reads the same result from disk."""
    from attncc.compiler import derivative as module

    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(module, "_SIMPLIFIED", {})
    cap, width = ir.Param("cap", "float"), ir.Param("width", "float")
    softcap = lambda c: ir.op("mul", c, ir.op("tanh", ir.op("truediv", SCORE, c)))  # noqa: E731
    first = derivative(softcap(cap), SCORE)
    assert str(first) == "1.0 - tanh(score / cap) ** 2" and len(list(tmp_path.rglob("*.txt"))) == 1
    assert str(derivative(softcap(width), SCORE)) == "1.0 - tanh(score / width) ** 2"
    monkeypatch.setattr(module, "_SIMPLIFIED", {})
    assert derivative(softcap(cap), SCORE) == first  # from disk: the same nodes
    kept = ir.op("where", ir.op("gt", SCORE, ir.const(0.0)), SCORE, ir.op("mul", SCORE, SCORE))
    assert "where" in str(derivative(kept, SCORE))  # outside sympy's operators: kept, nothing stored
    assert len(list(tmp_path.rglob("*.txt"))) == 1


def test_a_constant_sympy_folds_past_float_range_keeps_the_expression(tmp_path, monkeypatch):
    """1e300 * 1e300 folds to a float that overflows: the simplification is refused (the forward-mode
    derivative stays), never raised."""
    from attncc.compiler import derivative as module

    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(module, "_SIMPLIFIED", {})
    big = ir.const(1e300)
    expr = ir.op("mul", ir.op("mul", SCORE, big), ir.op("mul", big, ir.op("exp", SCORE)))
    assert "exp(score)" in str(derivative(expr, SCORE))
