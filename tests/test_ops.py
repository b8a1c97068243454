"""The operator table (attncc/dsl/ops.py): every operator has an entry in every interpreter.

Each row is exercised through each interpreter on a sample node (not only looked up), so a
missing printer method or interval rule fails here, next to its cause, rather than in a kernel.
"""
import math

import pytest
import torch

import attncc as ac
from attncc.compiler import evaluate
from attncc.compiler.blockmask import classify
from attncc.dsl import ir, ops
from attncc.testing import compare

q, kv, score = ir.Var("q"), ir.Var("kv"), ir.Var("score")
F = ir.op("mul", ir.op("add", q, ir.const(1)), ir.const(0.037))  # a positive float of q
G = ir.op("mul", ir.op("add", kv, ir.const(2)), ir.const(0.05))
BOOL_A, BOOL_B = ir.op("ge", q, kv), ir.op("lt", ir.op("mod", q, ir.const(3)), ir.const(2))


def sample(name: str) -> ir.Node:
    """A well-typed node applying operator `name` (score-free, so every interpreter takes it)."""
    row = ops.TABLE[name]
    if row.operands == "bool":
        return ir.op(name, *[BOOL_A, BOOL_B][:row.arity])
    if row.operands == "where":
        return ir.op(name, BOOL_B, F, G)
    if name == "pow":
        return ir.op(name, F, ir.const(2.5))
    if name in ("floordiv", "mod"):
        return ir.op(name, ir.op("sub", q, kv), ir.op("add", kv, ir.const(1)))
    return ir.op(name, *[F, G][:row.arity])


def as_mask(n: ir.Node) -> ir.Node:
    return n if ir.kind_of(n) == "bool" else ir.op("gt", n, ir.const(1))


def test_every_row_is_complete():
    for row in ops.ROWS:
        assert row.arity >= 1 and row.kind and row.operands and row.spelling and row.form in ("infix", "prefix", "call")
        assert callable(row.fold) and callable(row.torch) and callable(row.interval)
        assert isinstance(row.triton, str) or callable(row.triton)
        assert hasattr(row, "derivative")  # None for piecewise-constant and boolean operators
        assert isinstance(row.cute, str) or callable(row.cute)  # the FA4 hooks' printer
        if row.form == "call":
            assert row.spelling in ac.dsl.parse.FUNCTIONS and row.spelling in ac.dsl.trace.RESERVED_NAMES
        if row.mirror:
            assert ops.TABLE[row.mirror].mirror == row.name


@pytest.mark.parametrize("name", sorted(ops.TABLE))
def test_every_interpreter_runs_every_operator(name):
    node = sample(name)
    assert isinstance(node, ir.Op) and node.op == name, f"{name}: the sample folded away"
    # printer and parser: the DSL text reads back to the same node
    assert ac.parse(f"mask = {as_mask(node)}").mask is as_mask(node)
    # torch (the reference) against the constant folder at a few points
    for qi, ki in [(0, 0), (5, 3), (2, 7)]:
        env = {"q": torch.tensor(qi), "kv": torch.tensor(ki)}
        got = evaluate.evaluate(node, env, {}, {})
        folded = ir.substitute(node, lambda n: ir.const(qi) if n is q else ir.const(ki) if n is kv else None)
        if isinstance(folded, ir.Const):
            assert math.isclose(float(got), float(folded.value), rel_tol=1e-12), (name, qi, ki)
    # intervals (the block classifier): sound against dense evaluation
    pat = ac.Pattern.from_ir(mask=as_mask(node))
    dense = ac.create_mask(pat, 1, 1, 40, 40)[0, 0]
    classes = classify(pat, 1, 1, 40, 40, 8, 8, refine=False).dense()[0, 0]
    tiles = dense.view(5, 8, 5, 8).permute(0, 2, 1, 3).reshape(5, 5, 64)
    assert not ((classes == 2) & ~tiles.all(-1)).any() and not ((classes == 0) & tiles.any(-1)).any()
    # Triton: a generated kernel using the operator (in the interpreter) against the oracle
    if ir.kind_of(node) == "bool":
        kernel_pat = ac.Pattern.from_ir(mask=ir.op("or", node, ir.op("eq", q, kv)))
    else:
        kernel_pat = ac.Pattern.from_ir(score=ir.op("add", score, ir.op("mul", ir.const(0.1), node)))
    g = torch.Generator().manual_seed(0)
    compare(kernel_pat, *(torch.randn(1, 2, 37, 16, generator=g) for _ in range(3)))


def test_the_table_names_the_operators_the_ir_knows():
    assert set(ir.OPS) == set(ops.TABLE)
    assert set(ops.COMPARE) == {"eq", "ne", "lt", "le", "gt", "ge"}
    assert {"floor", "ceil", "round", "int"} <= set(ops.TABLE)


def test_min_max_are_commutative_on_signed_zeros_and_propagate_nan():
    # torch.maximum's vectorised CPU path returns -0.0 for (0.0, -0.0); the reference must not
    # depend on the operands' order (the simplifier sorts commutative operands)
    zero, negzero = torch.zeros(40, dtype=torch.float64), -torch.zeros(40, dtype=torch.float64)
    for name, sign in (("max", 1.0), ("min", -1.0)):
        row = ops.TABLE[name]
        for a, b in ((zero, negzero), (negzero, zero)):
            assert (torch.copysign(torch.ones(40, dtype=torch.float64), row.torch(a, b)) == sign).all()
            assert math.copysign(1.0, row.fold(float(a[0]), float(b[0]))) == sign
        assert row.fold(0, -0.0) == 0.0 and math.copysign(1.0, row.fold(-0.0, 0)) == sign
        assert math.isnan(row.fold(math.nan, 1.0)) and row.torch(torch.tensor([math.nan]), torch.tensor([1.0])).isnan().all()
        assert "propagate_nan=tl.PropagateNan.ALL" in row.triton  # minnum / maxnum would drop a NaN on the GPU
