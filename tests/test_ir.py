"""The IR: evaluation against plain Python, value-preserving simplification, interning, type rules,
and a printer whose text means the same expression."""
import ast
import copy
import math
import pickle
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from attncc import PatternError
from attncc.compiler import evaluate as ev
from attncc.dsl import ir
from ir_terms import BUFFERS, PARAMS, PY, SCORES, TERMS, build, build_raw, py_eval

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Every combination of these values is one evaluation point; variables are flat [N] tensors.
POINTS = [dict(b=b, h=h, q=q, kv=kv, score=s)
          for b in (0, 1) for h in (0, 2) for q in (0, 1, 3, 6) for kv in (0, 2, 5, 7) for s in SCORES]
ENV = {k: torch.tensor([p[k] for p in POINTS], dtype=torch.float64 if k == "score" else torch.int64)
       for k in POINTS[0]}
q, kv, score = ir.Var("q"), ir.Var("kv"), ir.Var("score")


def evaluate(node: ir.Node) -> torch.Tensor:
    return torch.broadcast_to(ev.evaluate(node, ENV, PARAMS, BUFFERS), (len(POINTS),))


def python_values(term, points=POINTS) -> torch.Tensor:
    return torch.tensor([float(py_eval(term, p)) for p in points], dtype=torch.float64)


def assert_values(actual: torch.Tensor, expected: torch.Tensor, kind: str) -> None:
    if kind == "bool":
        assert actual.dtype == torch.bool
    elif kind == "int":
        assert actual.dtype == torch.int64
    torch.testing.assert_close(actual.double(), expected, rtol=1e-9, atol=1e-9, equal_nan=True)


@pytest.mark.parametrize("kind", ["int", "float", "bool"])
@PROPERTY
@given(data=st.data())
def test_evaluate_simplified_and_raw_match_python(kind, data):
    """evaluate(ir.op-built IR) == evaluate(ir.Op-built, unsimplified IR) == plain Python, everywhere."""
    term = data.draw(TERMS[kind]())
    expected = python_values(term)
    simplified, raw = build(term), build_raw(term)
    for node in (raw, simplified):
        assert_values(evaluate(node), expected, "float" if kind == "float" else ir.kind_of(node))


@pytest.mark.parametrize("kind", ["int", "float", "bool"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_printed_text_reads_back_as_the_same_expression(kind, data):
    """to_text is Python-like: evaluating the printed text as Python gives the term's values,
    so precedence and parentheses are right (the parser's round trip relies on it)."""
    term = data.draw(TERMS[kind]())
    text = ir.to_text(build(term))
    names = {**PY, **PARAMS, "true": True, "false": False, "inf": math.inf, "nan": math.nan,
             **{k: t.tolist() for k, t in BUFFERS.items()}}
    code = compile(ast.fix_missing_locations(_PowAsCall().visit(ast.parse(text, mode="eval"))), "<text>", "eval")
    for p in POINTS[::37]:
        got, want = eval(code, {"__builtins__": {}}, {**names, **p}), py_eval(term, p)  # noqa: S307
        assert got == want or (math.isnan(got) and math.isnan(want)) or math.isclose(got, want, rel_tol=1e-9), text


class _PowAsCall(ast.NodeTransformer):
    """a ** b -> pow(a, b): Python's own ** raises on 0.0 ** -1 where torch gives inf."""

    def visit_BinOp(self, node):
        self.generic_visit(node)
        if isinstance(node.op, ast.Pow):
            return ast.Call(ast.Name("pow", ast.Load()), [node.left, node.right], [])
        return node


@PROPERTY
@given(term=st.one_of(TERMS["int"](), TERMS["float"](), TERMS["bool"]()))
def test_interning(term):
    """The same expression built twice is the same object; copies and pickles keep identity."""
    a, b = build(term), build(term)
    assert a is b and hash(a) == hash(b) and str(a) == str(b)
    assert build_raw(term) is build_raw(term)
    assert copy.copy(a) is a and copy.deepcopy(a) is a
    pair = copy.deepcopy([a, build_raw(term)])
    assert pair[0] is a and pair[1] is build_raw(term)
    assert pickle.loads(pickle.dumps(a)) is a
    assert pickle.loads(pickle.dumps((a, build_raw(term)))) == (a, build_raw(term))


def test_constants_are_distinct_by_type_and_sign():
    assert len({id(ir.const(1)), id(ir.const(True)), id(ir.const(1.0))}) == 3
    assert ir.const(0.0) is not ir.const(-0.0)
    assert ir.to_text(ir.op("neg", ir.const(0.0))) == "-0.0"
    assert ir.const(math.nan) is ir.const(math.nan)
    assert ir.kind_of(ir.const(True)) == "bool" and ir.kind_of(ir.const(2)) == "int"


one, zero = ir.const(1), ir.const(0)
x = ir.op("add", q, kv)
c = ir.op("lt", q, kv)
SIMPLIFICATIONS = [
    (ir.op("sub", x, x), zero), (ir.op("add", x, zero), x), (ir.op("add", zero, x), x),
    (ir.op("sub", x, zero), x), (ir.op("mul", x, one), x), (ir.op("mul", one, x), x),
    (ir.op("mul", x, zero), zero), (ir.op("floordiv", x, one), x),
    (ir.op("mod", x, one), zero), (ir.op("mod", x, ir.const(-1)), zero), (ir.op("add", q, ir.op("mod", q, one)), q),
    (ir.op("neg", ir.op("neg", x)), x), (ir.op("not", ir.op("not", c)), c),
    (ir.op("and", c, ir.TRUE), c), (ir.op("and", ir.TRUE, c), c), (ir.op("and", c, ir.FALSE), ir.FALSE),
    (ir.op("or", c, ir.FALSE), c), (ir.op("or", ir.TRUE, c), ir.TRUE), (ir.op("and", c, c), c),
    (ir.op("eq", x, x), ir.TRUE), (ir.op("lt", x, x), ir.FALSE), (ir.op("ge", x, x), ir.TRUE),
    (ir.op("min", x, x), x), (ir.op("where", ir.TRUE, x, q), x), (ir.op("where", ir.FALSE, x, q), q),
    (ir.op("where", c, x, x), x),
    (ir.op("floordiv", ir.const(-7), ir.const(2)), ir.const(-4)),
    (ir.op("mod", ir.const(-7), ir.const(2)), ir.const(1)),
    (ir.op("mod", ir.const(7), ir.const(-2)), ir.const(-1)),
    (ir.op("truediv", ir.const(1), ir.const(2)), ir.const(0.5)),
    (ir.op("add", ir.const(1), ir.const(2.0)), ir.const(3.0)),
    (ir.op("pow", ir.const(2), ir.const(-1)), ir.const(0.5)),
    (ir.op("and", c, ir.op("gt", q, one)), ir.Op("and", (c, ir.Op("gt", (q, one))))),  # nothing to do
]


@pytest.mark.parametrize("built,expected", SIMPLIFICATIONS, ids=[str(e[0]) for e in SIMPLIFICATIONS])
def test_simplification_rules(built, expected):
    assert built is expected


def test_a_constant_where_keeps_its_kind():
    """where(False, score, ibuf[q]) is the load promoted to float, as torch computes it (an int
    load ** -1 would raise); beside an integer or another load the dtype is unknown: it stays."""
    score, load = ir.Var("score"), ir.load("ibuf", (q,))
    picked = ir.op("where", ir.FALSE, score, load)
    assert picked is ir.op("mul", load, ir.const(1.0))
    for other in (q, ir.load("fbuf", (q,))):
        assert isinstance(ir.op("where", ir.FALSE, other, load), ir.Op)
        assert ir.op("where", ir.FALSE, other, load).op == "where"
    env = {"q": torch.arange(4), "score": torch.zeros(4)}
    buffers = {"ibuf": torch.tensor([1, 2, -4, 5]), "fbuf": torch.tensor([0.5, 1.0, 2.0, 4.0])}
    recip = ev.evaluate(ir.op("pow", picked, ir.const(-1)), env, {}, buffers)
    assert recip.is_floating_point() and recip.tolist() == [1.0, 0.5, -0.25, 0.2]
    kept = ev.evaluate(ir.op("where", ir.FALSE, ir.load("fbuf", (q,)), load), env, {}, buffers)
    assert kept.is_floating_point() and kept.tolist() == [1.0, 2.0, -4.0, 5.0]


def test_float_zeros_fold_only_where_ieee_keeps_every_value():
    """x + 0.0 is +0.0 at x = -0.0 (so 1 / (0.0 + -score) at score 0 is +inf, not -inf): only
    x - 0.0, x + -0.0 and -0.0 + x fold (hypothesis found pow(0.0 + (-0.0 - score), -1))."""
    pos, neg = ir.const(0.0), ir.const(-0.0)
    for kept in (ir.op("add", score, pos), ir.op("add", pos, score), ir.op("sub", score, neg)):
        assert kept is not score
    for folded in (ir.op("sub", score, pos), ir.op("add", score, neg), ir.op("add", neg, score)):
        assert folded is score
    node = ir.op("pow", ir.op("add", pos, ir.op("sub", neg, score)), ir.const(-1))
    at_zero = ev.evaluate(node, {"score": torch.tensor([0.0, -0.0], dtype=torch.float64)}, {}, {})
    assert at_zero.tolist() == [math.inf, math.inf]


@pytest.mark.parametrize("name,torch_fn", [
    ("mul", lambda s: s * 0.0),   # inf * 0 is nan, not 0
    ("sub", lambda s: s - s),     # inf - inf is nan
    ("eq", lambda s: s == s),     # nan != nan
    ("truediv", lambda s: s / s),
])
def test_no_float_simplification_that_changes_inf_or_nan(name, torch_fn):
    node = ir.op(name, score, ir.const(0.0) if name == "mul" else score)
    assert isinstance(node, ir.Op)
    s = torch.tensor([math.inf, math.nan, 2.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(ev.evaluate(node, {"score": s}, {}, {}), torch_fn(s), equal_nan=True)


_IREAD = ("load", "ibuf", ("op", "mod", (("var", "q"), ("const", 8))))  # values 3, -2, 0, 7, ...


@pytest.mark.parametrize("term", [
    ("op", "eq", (("op", "and", (("const", True), _IREAD)), ("const", True))),
    ("op", "eq", (("op", "or", (_IREAD, ("const", False))), ("const", True))),
    ("op", "eq", (("op", "and", (_IREAD, _IREAD)), ("const", True))),
    ("op", "ne", (("op", "not", (("op", "not", (_IREAD,)),)), ("const", False))),
], ids=["and_true", "or_false", "and_self", "not_not"])
def test_logic_on_integer_buffer_reads_keeps_truth_values(term):
    """`true and ibuf[q]` is a truth value; simplifying it to the integer read changes `== true`."""
    expected = python_values(term)
    assert_values(evaluate(build_raw(term)), expected, "bool")
    assert_values(evaluate(build(term)), expected, "bool")


def test_left_associated_logic_chains():
    a, b, d = ir.op("lt", q, kv), ir.op("gt", q, one), ir.op("ne", kv, zero)
    assert ir.op("and", a, ir.op("and", b, d)) is ir.op("and", ir.op("and", a, b), d)


def test_canonical_forms_share_one_node():
    """Mirrored comparisons and commuted operands build the same node (and so one kernel)."""
    W = ir.Param("W", "int")
    assert ir.op("le", kv, q) is ir.op("ge", q, kv)
    assert ir.op("lt", kv, ir.op("add", q, W)) is ir.op("gt", ir.op("add", W, q), kv)
    assert ir.op("add", ir.const(1), q) is ir.op("add", q, ir.const(1))
    assert ir.op("mul", q, ir.const(2)) is ir.op("mul", ir.const(2), q)
    assert ir.op("eq", ir.const(0), ir.op("mod", q, ir.const(3))) is ir.op("eq", ir.op("mod", q, ir.const(3)), ir.const(0))
    assert ir.op("min", kv, q) is ir.op("min", q, kv)
    assert ir.op("sub", kv, q) is not ir.op("sub", q, kv)  # not commutative
    assert str(ir.op("le", kv, q)) == "q >= kv"


def test_a_boolean_compared_with_zero_or_one_is_the_boolean():
    c = ir.op("gt", q, kv)
    assert ir.op("eq", c, ir.const(1)) is c and ir.op("ne", c, ir.const(0)) is c
    assert ir.op("eq", c, ir.const(0)) is ir.op("not", c) and ir.op("ne", ir.const(1), c) is ir.op("not", c)
    two = ir.op("eq", c, ir.const(2))  # never true, but well-typed: the boolean reads as 0 / 1
    assert not ev.evaluate(two, ENV, {}, {}).any()


def test_division_by_a_zero_constant_is_refused_when_built():
    for name in ("floordiv", "mod", "truediv"):
        with pytest.raises(ir.IRError, match="division by zero"):
            ir.op(name, q, ir.const(0))
    with pytest.raises(ir.IRError, match="division by zero"):
        ir.op("mod", q, ir.op("sub", kv, kv))  # kv - kv is 0 by construction
    with pytest.raises(ir.IRError, match="division by zero"):
        ir.op("truediv", ir.Var("score"), ir.const(0.0))
    assert torch.isneginf(ev.evaluate(ir.op("log", ir.const(0.0)), ENV, {}, {}))


def test_evaluation_names_what_is_missing():
    with pytest.raises(PatternError, match="variable 'kv'"):
        ev.evaluate(ir.op("lt", q, kv), {"q": torch.arange(3)}, {}, {})
    with pytest.raises(PatternError, match="param 'W'"):
        ev.evaluate(ir.op("lt", q, ir.Param("W", "int")), {"q": torch.arange(3)}, {}, {})
    with pytest.raises(PatternError, match="buffer 'doc'"):
        ev.evaluate(ir.load("doc", (q,)), {"q": torch.arange(3)}, {}, {})


def test_pow_with_negative_exponent_is_float():
    val = ev.evaluate(ir.op("pow", q, ir.const(-1)), {"q": torch.tensor([1, 2, 4])}, {}, {})
    assert ir.kind_of(ir.op("pow", q, ir.const(-1))) == "float"
    torch.testing.assert_close(val, torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64))
    assert ir.kind_of(ir.op("pow", q, ir.const(2))) == "int"
    assert torch.equal(ev.evaluate(ir.op("pow", q, ir.const(2)), {"q": torch.tensor([-3, 2])}, {}, {}),
                       torch.tensor([9, 4]))


@pytest.mark.parametrize("build_bad,match", [
    (lambda: ir.op("and", q, kv), "booleans"),
    (lambda: ir.op("add", ir.TRUE, q), "numbers"),
    (lambda: ir.op("lt", c, q), "numbers"),
    (lambda: ir.op("where", q, q, kv), "condition"),
    (lambda: ir.op("where", c, c, q), "branches"),
    (lambda: ir.op("add", q), "argument"),
    (lambda: ir.op("not", c, c), "argument"),
    (lambda: ir.op("frobnicate", q), "unknown operator"),
    (lambda: ir.load("doc", (ir.op("truediv", q, ir.const(2)),)), "integer"),
    (lambda: ir.Var("z"), "unknown variable"),
    (lambda: ir.const("1"), "constants"),
])
def test_type_errors(build_bad, match):
    with pytest.raises(ir.IRError, match=match):
        build_bad()


def test_kinds():
    assert ir.kind_of(ir.op("truediv", q, kv)) == "float"
    assert ir.kind_of(ir.op("add", q, score)) == "float"
    assert ir.kind_of(ir.op("floordiv", q, kv)) == "int"
    assert ir.kind_of(ir.load("doc", (q,))) == "any"
    assert ir.kind_of(ir.op("add", ir.load("doc", (q,)), one)) == "any"
    assert ir.kind_of(ir.op("exp", q)) == "float"


def test_walk_substitute_and_queries():
    w = ir.Param("W", "int")
    shared = ir.op("sub", q, kv)
    e = ir.op("and", ir.op("lt", shared, w), ir.op("eq", ir.load("doc", (q,)), ir.load("doc", (shared,))))
    order = list(ir.walk(e))
    assert len(order) == len(set(map(id, order))) and order[-1] is e
    assert all(order.index(ch) < order.index(n) for n in order for ch in n.children())
    assert ir.free_vars(e) == {"q", "kv"} and set(ir.params_of(e)) == {"W"} and ir.buffers_of(e) == {"doc"}
    swapped = ir.substitute(e, lambda n: kv if n is q else q if n is kv else None)
    assert swapped is ir.op("and", ir.op("lt", ir.op("sub", kv, q), w),
                            ir.op("eq", ir.load("doc", (kv,)), ir.load("doc", (ir.op("sub", kv, q),))))
    assert ir.buffers_of(ir.rename_buffers(e, {"doc": "doc2"})) == {"doc2"}
    # substitution re-simplifies: q := kv makes q - kv vanish
    assert ir.substitute(shared, lambda n: kv if n is q else None) is zero
    # score := -score in -score is -(-score) = score, not substituted a second time
    minus = ir.op("neg", score)
    assert ir.substitute(minus, lambda n: minus if n is score else None) is score


@pytest.mark.parametrize("node,text", [
    (ir.op("sub", q, ir.op("sub", kv, one)), "q - (kv - 1)"),
    (ir.op("sub", ir.op("sub", q, kv), one), "q - kv - 1"),
    (ir.op("mul", ir.op("add", q, kv), ir.const(2)), "2 * (q + kv)"),
    (ir.op("floordiv", ir.op("neg", q), ir.const(2)), "-q // 2"),
    (ir.op("neg", ir.op("floordiv", q, ir.const(2))), "-(q // 2)"),
    (ir.op("not", ir.op("and", c, ir.op("gt", kv, one))), "not (q < kv and kv > 1)"),
    (ir.op("or", ir.op("and", c, c), ir.op("not", c)), "q < kv or not q < kv"),
    (ir.op("where", c, ir.op("min", q, kv), ir.op("abs", kv)), "where(q < kv, min(q, kv), abs(kv))"),
    (ir.op("eq", ir.op("lt", q, kv), ir.op("gt", q, one)), "(q < kv) == (q > 1)"),
    (ir.op("mul", ir.const(30.0), ir.op("tanh", ir.op("truediv", score, ir.const(30.0)))),
     "30.0 * tanh(score / 30.0)"),
    (ir.op("add", score, ir.const(-math.inf)), "score + -inf"),
])
def test_printer(node, text):
    assert str(node) == text


def test_long_and_or_chains_build_and_print_without_deep_recursion():
    """A mask built in a Python loop (`m = m | (kv == i)`) can be thousands of terms long."""
    terms = [ir.op("eq", kv, ir.const(3 * i)) for i in range(2000)]
    appended = ir.FALSE
    for t in terms:
        appended = ir.op("or", appended, t)
    text = str(appended)
    assert text.startswith("kv == 0 or kv == 3 or") and text.count(" or ") == 1999
    live = ev.evaluate(appended, {"kv": torch.arange(12)}, {}, {})
    assert live.tolist() == [i % 3 == 0 for i in range(12)]
    prepended = ir.FALSE
    for t in reversed(terms[:300]):
        prepended = ir.op("or", t, prepended)  # re-associated to the left, one term at a time
    assert str(prepended) == " or ".join(f"kv == {3 * i}" for i in range(300))


def test_deep_right_nested_expressions_print_in_linear_time():
    """20,000 nested subtractions: one pass over an explicit stack (the old printer kept every
    subexpression's whole text, quadratic in the depth)."""
    node = q
    for i in range(20000):
        node = ir.op("sub", kv, node)
    text = str(node)
    assert text == "kv - (" * 19999 + "kv - q" + ")" * 19999


def test_folding_min_max_propagates_nan_like_torch():
    for name in ("min", "max"):
        for args in ((ir.const(0), ir.const(math.nan)), (ir.const(math.nan), ir.const(1.0))):
            assert math.isnan(ev.evaluate(ir.op(name, *args), {}, {}, {}).item())
    assert ir.op("max", ir.const(2), ir.const(3.5)) is ir.const(3.5)


def test_huge_integer_powers_are_not_folded():
    assert isinstance(ir.op("pow", ir.const(2), ir.const(10 ** 9)), ir.Op)  # would take minutes
    assert ir.op("pow", ir.const(-1), ir.const(10 ** 9 + 1)) is ir.const(-1)
    assert ir.op("pow", ir.const(3), ir.const(4)) is ir.const(81)


def test_interning_from_several_threads():
    built: list = []

    def work():
        for k in range(200):
            built.append((k, ir.op("add", ir.op("mul", q, ir.const(k)), ir.const(-k - 0.5))))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 800
    for k, node in built:
        assert node is ir.op("add", ir.op("mul", q, ir.const(k)), ir.const(-k - 0.5))


def test_deep_expressions_pickle_without_recursion():
    """A 1000-term `or` (a nested chain) pickled node by node ran past the recursion limit."""
    import attncc as ac

    pat = ac.parse("mask = " + " or ".join(f"q - kv == {i}" for i in range(1000)))
    again = pickle.loads(pickle.dumps(pat))
    assert again == pat and again.mask is pat.mask  # interned: the very same nodes
    odd = ac.parse("param W = 2.5\nmask = q - kv <= W\nscore = where(q > kv, score * W, -0.0)")
    assert pickle.loads(pickle.dumps(odd)).score is odd.score  # -0.0 kept apart from 0.0
