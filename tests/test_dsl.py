"""The text DSL: round trips through the printer, errors with positions, equivalence with traced
Python, and that a text can do nothing but describe a pattern."""
import inspect
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import attncc as ac
from attncc.dsl import ir
from attncc.dsl.parse import DSLError

# ------------------------------------------------------------------------------------------------
# Round trip: random IR -> str -> parse -> the identical nodes.

INT_CONSTS = st.sampled_from([0, 1, 2, 3, 7, 64, 1000, -1, -5, 2 ** 40])
FLOAT_CONSTS = st.sampled_from([0.0, -0.0, 0.5, 1.0, 30.0, -2.5, 1e-05, 1.5e20, 1 / 3, math.inf, -math.inf])
PARAMS = {"W": ir.Param("W", "int"), "cap": ir.Param("cap", "float")}
PARAM_VALUES = {"W": 16, "cap": 30.0}


def _op(name: str, *args: ir.Node) -> ir.Node:
    """ir.op, with a constant zero divisor (refused when built) replaced by one."""
    if name in ("floordiv", "mod", "truediv") and isinstance(args[1], ir.Const) and args[1].value == 0:
        args = (args[0], ir.const(type(args[1].value)(1)))
    return ir.op(name, *args)


def _expr(draw, kind: str, depth: int, index_vars: tuple, with_score: bool) -> ir.Node:
    """A random well-typed expression of `kind` ("int", "float", "bool"), built with ir.op."""
    leaf = depth <= 0 or draw(st.integers(0, 5)) == 0
    sub = lambda k: _expr(draw, k, depth - 1, index_vars, with_score)
    if kind == "int":
        if leaf:
            choice = draw(st.integers(0, 3))
            if choice == 0:
                return ir.const(draw(INT_CONSTS))
            if choice == 1:
                return PARAMS["W"]
            return ir.Var(draw(st.sampled_from(index_vars)))
        name = draw(st.sampled_from(["add", "sub", "mul", "floordiv", "mod", "neg", "abs", "min", "max",
                                     "where", "pow", "load"]))
        if name == "load":
            return ir.load("doc", (sub("int"),)) if draw(st.booleans()) else ir.load("rel", (sub("int"), sub("int")))
        if name == "pow":
            return ir.op("pow", sub("int"), ir.const(draw(st.integers(0, 3))))
        if name == "where":
            return ir.op("where", sub("bool"), sub("int"), sub("int"))
        return _op(name, *(sub("int") for _ in range(ir.OPS[name])))
    if kind == "float":
        if leaf:
            choice = draw(st.integers(0, 3))
            if choice == 0:
                return ir.const(draw(FLOAT_CONSTS))
            if choice == 1:
                return PARAMS["cap"]
            return ir.Var("score") if with_score else ir.op("mul", sub("int"), ir.const(1.0))
        name = draw(st.sampled_from(["add", "sub", "mul", "truediv", "neg", "abs", "min", "max",
                                     "where", "pow", *ir.FLOAT_FUNCS]))
        if name == "where":
            return ir.op("where", sub("bool"), sub("float"), sub(draw(st.sampled_from(["int", "float"]))))
        if ir.OPS[name] == 1:
            return ir.op(name, sub("float"))
        return _op(name, sub("float"), sub(draw(st.sampled_from(["int", "float"]))))
    if leaf:
        if draw(st.integers(0, 3)) == 0:
            return ir.const(draw(st.booleans()))
        return ir.op(draw(st.sampled_from(ir.COMPARE)), ir.Var(draw(st.sampled_from(index_vars))),
                     _expr(draw, "int", 0, index_vars, with_score))
    name = draw(st.sampled_from(["lt", "le", "gt", "ge", "eq", "ne", "and", "or", "not", "where", "beq"]))
    if name in ("and", "or", "not"):
        return ir.op(name, *(sub("bool") for _ in range(ir.OPS[name])))
    if name == "where":
        return ir.op("where", sub("bool"), sub("bool"), sub("bool"))
    if name == "beq":
        return ir.op(draw(st.sampled_from(["eq", "ne"])), sub("bool"), sub("bool"))
    return ir.op(name, sub(draw(st.sampled_from(["int", "float"]))), sub("int"))


@st.composite
def patterns(draw):
    depth = draw(st.integers(1, 4))
    mask = _expr(draw, "bool", depth, ("b", "h", "q", "kv"), False)
    score = _expr(draw, "float", depth, ("b", "h", "q", "kv"), True)
    block = _expr(draw, "bool", depth, ("b", "h", "qb", "kb"), False)
    for e in (mask, score, block):
        assume(all(-(1 << 63) <= n.value < (1 << 63) for n in ir.walk(e)
                   if isinstance(n, ir.Const) and type(n.value) is int))
    name = draw(st.sampled_from([None, "random pattern"]))
    block_size = draw(st.sampled_from([128, 64, (32, 64)]))
    return ac.Pattern.from_ir(mask, score, block, PARAM_VALUES, {"doc": None, "rel": None}, name, block_size)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterns())
def test_random_ir_round_trips(p):
    text = str(p)
    back = ac.parse(text)
    assert back.mask is p.mask and back.score is p.score and back.block is p.block, text
    assert back == p and back.name == p.name
    assert str(back) == text


def _catalogue():
    ids = ac.patterns.lengths_to_ids([5, 9, 2])
    return [ac.patterns.causal(), ac.patterns.causal(offset=3), ac.patterns.sliding_window(16),
            ac.patterns.sliding_window(16, causal=False), ac.patterns.prefix_lm(8),
            ac.patterns.dilated(8, 2), ac.patterns.softcap(), ac.patterns.softcap(20.0, causal=False),
            ac.patterns.alibi(4), ac.patterns.document(ids=ids), ac.patterns.document(ids=ids, causal=False),
            ac.patterns.natten2d(8, 8, 3), ac.patterns.causal() & ac.patterns.sliding_window(4),
            ac.patterns.sinks(4, 16), ac.patterns.chunked(8), ac.patterns.global_tokens(ids < 1, window=3),
            ac.patterns.strided_heads(4, 8), ac.patterns.vertical_slash([[0, 3], [1]], [[0, 2], [0]], 16),
            ac.patterns.power(32, window=2), ac.patterns.tree([-1, 0, 0, 1, 2]), ac.patterns.cross(ids, ids),
            ac.patterns.relative_bias(torch.randn(8, 2), num_buckets=8), ac.patterns.relative_bias(torch.randn(31)),
            ac.patterns.per_head([ac.patterns.causal(), ac.patterns.sliding_window(4)]),
            ac.patterns.block_topk(selected=torch.ones(1, 2, 2, 2, dtype=torch.bool), block_size=8),
            ac.patterns.neighborhood((4, 6, 8), 3, dilation=(1, 2, 1)), ac.patterns.sliding_tile((8, 8), 3, 2),
            ac.patterns.radial(4, 16)]


@pytest.mark.parametrize("p", _catalogue(), ids=lambda p: p.name)
def test_catalogue_round_trips(p):
    back = ac.parse(str(p))
    assert back.mask is p.mask and back.score is p.score and back.block is p.block
    assert back.params == p.params and back.name == p.name
    assert back.unbound_buffers() == list(p.buffers)
    assert back.bind(**p.buffers) == p


def test_every_catalogue_family_is_round_tripped():
    families = {n for n in ac.patterns.__all__
                if inspect.signature(getattr(ac.patterns, n)).return_annotation in (ac.Pattern, "Pattern")}
    assert families and families <= {p.name.split("(")[0] for p in _catalogue()}, "add new catalogue patterns to _catalogue()"


def test_traced_params_named_like_statements_round_trip():
    n, bs = ac.param("nan", 2), ac.param("block_size", 3)
    p = ac.Pattern(lambda b, h, q, kv: (q - kv) % bs < n)
    assert ac.parse(str(p)) == p
    p = ac.Pattern(score_mod=lambda s, b, h, q, kv: s + float("nan"))
    assert ac.parse(str(p)) == p and str(p) == "score = score + nan"


def test_a_multi_line_name_prints_as_one_comment():
    p = ac.Pattern(lambda b, h, q, kv: q >= kv, name="two\nlines")
    assert str(p) == "# two lines\nmask = q >= kv" and ac.parse(str(p)) == p


def test_traced_block_predicate_round_trips():
    p = ac.Pattern(lambda b, h, q, kv: q >= kv, block_mask_mod=lambda b, h, qb, kb: (qb - kb) % 3 != 1,
                   block_size=(32, 64))
    back = ac.parse(str(p))
    assert "block_size = 32, 64" in str(p) and back == p and back.block_size == (32, 64)


# ------------------------------------------------------------------------------------------------
# The language: a table of texts against the traced Python they mean.

W = ac.param("W", 5)
cap = ac.param("cap", 20.0)
doc = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 4])

EQUIVALENT_MASKS = [
    ("mask = q >= kv", lambda b, h, q, kv: q >= kv),
    ("mask = q_idx >= kv_idx", lambda b, h, q_idx, kv_idx: q_idx >= kv_idx),
    ("param W = 5\nmask = q >= kv and q - kv <= W", lambda b, h, q, kv: (q >= kv) & (q - kv <= W)),
    ("param W = 5\nmask = (q >= kv) & (q - kv <= W)", lambda b, h, q, kv: (q >= kv) & (q - kv <= W)),
    ("param W = 5\nmask = abs(q - kv) <= W", lambda b, h, q, kv: abs(q - kv) <= W),
    ("mask = kv < 4 or q >= kv", lambda b, h, q, kv: (kv < 4) | (q >= kv)),
    ("mask = not q < kv", lambda b, h, q, kv: ~(q < kv)),
    ("mask = ~(q < kv) and (q - kv) % 3 == 0", lambda b, h, q, kv: ~(q < kv) & ((q - kv) % 3 == 0)),
    ("mask = (q - kv) // 4 == -1 or q // 4 == kv // 4",
     lambda b, h, q, kv: ((q - kv) // 4 == -1) | (q // 4 == kv // 4)),
    ("mask = where(q > 10, kv < 5, kv >= q)", lambda b, h, q, kv: torch.where(q > 10, kv < 5, kv >= q)),
    ("mask = clamp(q, 3, 12) - kv >= 0", lambda b, h, q, kv: q.clamp(3, 12) - kv >= 0),
    ("mask = min(q, 9) >= max(kv, 2)", lambda b, h, q, kv: torch.minimum(q, torch.tensor(9)) >=
     torch.maximum(kv, torch.tensor(2))),
    ("mask = (q + 1) ** 2 >= kv * 7 - h", lambda b, h, q, kv: (q + 1) ** 2 >= kv * 7 - h),
    ("mask = h == 0 and q >= kv or h == 1", lambda b, h, q, kv: (h == 0) & (q >= kv) | (h == 1)),
    ("buffer doc\nmask = doc[q] == doc[kv] and q >= kv", lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv)),
    ("mask = true", lambda b, h, q, kv: True),
]


@pytest.mark.parametrize("text,mask_mod", EQUIVALENT_MASKS)
def test_text_means_the_same_as_traced_python(text, mask_mod):
    parsed = ac.parse(text)
    if parsed.buffers:
        parsed = parsed.bind(doc=doc)
    traced = ac.Pattern(mask_mod)
    assert parsed.mask is traced.mask
    n = len(doc)
    assert torch.equal(ac.create_mask(parsed, 1, 2, n - 3, n), ac.create_mask(traced, 1, 2, n - 3, n))
    assert ac.create_mask(parsed, 1, 2, n - 3, n).any()


def test_score_mods_and_block_predicates_match_traced_python():
    text = """
    param cap = 20.0
    score = cap * tanh(score / cap) - 0.5 * abs(q - kv) + sigmoid(score) * exp2(-score) / sqrt(h + 1.0)
    block_size = 4, 8
    block = qb >= kb and b == 0
    """
    traced = ac.Pattern(
        score_mod=lambda s, b, h, q, kv: cap * torch.tanh(s / cap) - 0.5 * abs(q - kv)
        + torch.sigmoid(s) * torch.exp2(-s) / torch.sqrt(h + 1.0),
        block_mask_mod=lambda b, h, qb, kb: (qb >= kb) & (b == 0), block_size=(4, 8))
    parsed = ac.parse(text)
    assert parsed.score is traced.score and parsed.block is traced.block and parsed == traced
    assert torch.equal(ac.create_mask(parsed, 2, 1, 19, 23), ac.create_mask(traced, 2, 1, 19, 23))
    q, k, v = (torch.randn(2, 2, 19, 16) for _ in range(3))
    torch.testing.assert_close(ac.reference(q, k, v, parsed), ac.reference(q, k, v, traced), rtol=0, atol=0)


def test_params_buffers_name_and_layout():
    p = ac.parse("""
        # my pattern
        param W = -3     # an int param
        param s = 2e-3
        buffer doc, seg
        buffer pos
        mask = q + W >= kv and doc[q] == seg[kv] and pos[q] >= 0
        score =
            score * s
    """)
    assert p.name == "my pattern" and p.params == {"W": -3, "s": 0.002}
    assert p.param_kind("W") == "int" and p.param_kind("s") == "float"
    assert p.unbound_buffers() == ["doc", "pos", "seg"]
    assert ac.parse("mask = q >= kv") == ac.parse("# another name\nmask = q>=kv")
    assert ac.parse("block = qb == kb").block_size == (128, 128)
    assert ac.parse("param W = 2 ** 10\nmask = q - kv < W").params == {"W": 1024}
    assert ac.parse("param W = 4\nmask = q < W").bind(W=9).params == {"W": 9}


# ------------------------------------------------------------------------------------------------
# Errors: every class with its line and column.

ERRORS = [
    # (text, line, column, words in the message)
    ("mask = q >= kv\nmask = q > 1", 2, 1, "defined twice"),
    ("param W = 1\nbuffer W\nmask = q > W", 2, 8, "declared twice"),
    ("mask = q >= kv +", 1, 17, "unexpected end of text"),
    ("mask = q >= kv)", 1, 15, "unexpected ')'"),
    ("mask = q < kv < 3", 1, 15, "do not chain"),
    ("mask = q >= kv\nscore = score * 2 q", 2, 19, "operator missing"),
    ("mask = q kv + 1", 1, 10, "operator missing"),
    ("param W 3\nmask = q < W", 1, 9, "unexpected '3'"),
    ("mask = q >= kv\nscore", 2, 6, "expected '='"),
    ("mask = q >= kv & q - kv < 3", 1, 25, "bind tighter"),
    ("mask = q >= kv and\n  foo < 3", 2, 3, "unknown name 'foo'"),
    ("mask = frob(q) > 1", 1, 8, "unknown function 'frob'"),
    ("mask = where(q > kv, 1) > 0", 1, 8, "where() takes 3"),
    ("mask = clamp(q, 1) > 0", 1, 8, "clamp() takes 3"),
    ("mask = tanh > 0", 1, 8, "is a function"),
    ("mask = q + (kv > 1) > 3", 1, 13, "needs numbers"),
    ("mask = q > kv\n\nscore = score + (q == kv)", 3, 18, "needs numbers"),
    ("mask = 1 and q > kv", 1, 8, "needs booleans"),
    ("mask = kv < 4 | q >= kv", 1, 19, "bind tighter"),  # `|` binds tighter than `<`, as in Python
    ("mask = not q", 1, 12, "needs booleans"),
    ("mask = where(q, kv > 1, kv > 2)", 1, 14, "boolean condition"),
    ("buffer doc\nmask = doc[q > 1] == 0", 2, 12, "must be an integer"),
    ("buffer doc\nmask = doc > 1", 2, 8, "must be indexed"),
    ("mask = q - kv", 1, 8, "must be a boolean"),
    ("score = q > kv", 1, 9, "must be a number"),
    ("mask = score > 0", 1, 8, "`score` can only be used in `score = ...`"),
    ("mask = qb >= kb", 1, 8, "block index"),
    ("score = score * kb", 1, 17, "block index"),
    ("block = q >= kv", 1, 9, "token index"),
    ("param W = q\nmask = q < W", 1, 11, "constant number"),
    ("param W = true\nmask = q < W", 1, 11, "must be a number"),
    ("param W\nmask = q < W", 1, 7, "needs a default"),
    ("param q = 3\nmask = q < 1", 1, 7, "reserved"),
    ("buffer tanh\nmask = q < 1", 1, 8, "reserved"),
    ("buffer doc = 3\nmask = q < 1", 1, 1, "no default"),
    ("maks = q >= kv", 1, 1, "unknown statement 'maks'"),
    ("block_size = 64\nblock_size = 32\nblock = qb > kb", 2, 1, "defined twice"),
    ("block_size = 0\nblock = qb > kb", 1, 14, "positive integer"),
    ("block_size = 16.0\nblock = qb > kb", 1, 14, "positive integer"),
    ("block_size = 1, 2, 3\nblock = qb > kb", 1, 20, "one or two"),
    ("mask = q >= kv, kv > 2", 1, 17, "one expression"),
    ("mask = q < 2 ** 70", 1, 12, "int64"),
    ("mask = q < 99999999999999999999", 1, 12, "int64"),
    ("# nothing but a comment\n", 1, 1, "defines no"),
    ("param W = 3", 1, 1, "defines no"),
]


@pytest.mark.parametrize("text,line,column,words", ERRORS)
def test_errors_carry_line_column_and_caret(text, line, column, words):
    with pytest.raises(DSLError) as info:
        ac.parse(text)
    e = info.value
    assert isinstance(e, ValueError)
    assert (e.line, e.column) == (line, column), str(e)
    assert words in e.message, str(e)
    rendered = str(e).splitlines()
    assert rendered[0].startswith(f"line {line}, column {column}: ")
    if text.splitlines() and line <= len(text.splitlines()):
        source = text.splitlines()[line - 1]
        assert rendered[1].strip() == source.strip()
        assert rendered[2].index("^") - 4 == column - 1


def test_long_lines_are_shown_around_the_error():
    text = "mask = " + "q + " * 60 + "(kv > 2) > 0"
    e = pytest.raises(DSLError, ac.parse, text).value
    shown, caret = str(e).splitlines()[1:3]
    assert len(shown) < 140 and shown[caret.index("^")] == "k" and e.column == text.index("kv") + 1


def test_parse_rejects_non_text():
    with pytest.raises(TypeError, match="str"):
        ac.parse(b"mask = q >= kv")


# ------------------------------------------------------------------------------------------------
# Security: a text can only describe a pattern. None of these may run code; all are DSLErrors.

HOSTILE = [
    "mask = __import__('os').system('touch /tmp/attncc_pwned') == 0",
    "mask = __import__(q) > 0",
    "mask = q.__class__ == kv",
    "mask = q.__class__.__bases__[0].__subclasses__() == 0",
    "mask = (lambda: 1)() > 0",
    "mask = lambda q: q",
    "mask = exec('import os') == 0",
    "mask = eval('1') > q",
    "mask = open('/etc/passwd') > q",
    "mask = getattr(q, 'x') > 0",
    "mask = \"abc\" == q",
    "mask = q[0] > 1",
    "mask = tanh[0] > 1",
    "mask = [q, kv] == q",
    "mask = {q: 1} == q",
    "mask = q if kv else kv",
    "import os",
    "mask = q >= kv; import os",
    "mask = q >= kv\n__import__('os')",
    "mask = globals() == q",
    "mask = 9 ** 9 ** 9 > q",
    "mask = " + "-" * 3000 + "q > kv",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_texts_are_rejected_without_running_anything(text, monkeypatch):
    import builtins

    def forbidden(*args, **kwargs):
        raise AssertionError("the parser called eval/exec/__import__")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    with pytest.raises(DSLError) as info:
        ac.parse(text)
    assert info.value.line >= 1 and info.value.column >= 1


def test_deeply_nested_text_reads_back_up_to_the_depth_limit():
    """A traced expression nested hundreds deep (a loop's `t = kv % (t + i)`) prints as nested
    parentheses; parse reads it back node for node. Past MAX_DEPTH operators the text is refused
    with the limit named, never a RecursionError."""
    from attncc.dsl.parse import MAX_DEPTH

    def mask(b, h, q, kv):
        t = q
        for i in range(MAX_DEPTH // 2 - 1):
            t = kv % (t + i + 2)  # two operators a level
        return t >= 1

    traced = ac.Pattern(mask_mod=mask)
    text = str(traced)
    assert text.count("(") == MAX_DEPTH // 2 - 1 and ac.parse(text) == traced
    too_deep = "mask = " + "kv % (" * MAX_DEPTH + "q" + ")" * MAX_DEPTH + " >= 1"
    with pytest.raises(DSLError, match=f"nested too deeply .*{MAX_DEPTH}"):
        ac.parse(too_deep)


TOKENS = ["mask", "score", "block", "param", "buffer", "block_size", "=", "q", "kv", "b", "h", "qb", "kb",
          "score", "W", "doc", "doc[q]", "1", "0", "-1", "2.5", "1e3", "inf", "true", "(", ")", ",", "+", "-",
          "*", "/", "//", "%", "**", "<", ">=", "==", "!=", "and", "or", "not", "&", "|", "~", "where(",
          "min(", "clamp(", "tanh(", "abs(", "[", "]", "\n", "#", "0 ** 0.5", "2 ** 63"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=25))
def test_any_token_soup_gives_a_pattern_or_a_dsl_error(tokens):
    text = "param W = 3\nbuffer doc\n" + " ".join(tokens)
    try:
        p = ac.parse(text)
    except DSLError as e:
        assert 1 <= e.line <= text.count("\n") + 1 and e.column >= 1
        return
    assert ac.parse(str(p)) == p


def test_texts_past_the_size_limit_are_refused():
    from attncc.dsl.parse import MAX_TEXT

    text = "mask = " + " or ".join(f"kv == {i}" for i in range(MAX_TEXT // 8))
    with pytest.raises(ac.DSLError, match="the limit is 1,000,000"):
        ac.parse(text)


def test_bitwise_spellings_on_integer_buffers_are_refused_once_bound():
    """Text pasted from a FlexAttention mask_mod: `flags[q] & flags[kv]` on an int buffer is bitwise
    in torch (1 & 2 == 0); attncc does not compute that, and read it as a logical and before."""
    q = torch.randn(1, 1, 8, 16)
    for text in ("buffer flags\nmask = flags[q] & flags[kv]", "buffer flags\nmask = ~flags[q] or q == kv",
                 "buffer flags\nmask = flags[q] and q >= kv"):
        pat = ac.parse(text).bind(flags=torch.tensor([1, 2, 0, 3, 1, 2, 0, 3]))
        for run in (lambda: ac.attention(q, q, q, pat), lambda: ac.create_mask(pat, 1, 1, 8, 8)):
            with pytest.raises(ac.PatternError, match="holds int values, and torch's &, |, ~ on them are bitwise"):
                run()
    live = ac.parse("buffer g\nmask = g[q] | g[kv]").bind(g=torch.tensor([True, False] * 4))  # booleans: fine
    assert ac.create_mask(live, 1, 1, 8, 8)[0, 0].sum() == 48


def test_traced_names_are_ascii_so_the_text_reads_back():
    δ = torch.tensor([0, 0, 1, 1])
    pat = ac.Pattern(lambda b, h, q, kv: δ[q] == δ[kv])  # the variable's name is not ASCII: a fresh one
    assert list(pat.buffers) == ["buf"] and ac.parse(str(pat)).bind(buf=δ) == pat
    with pytest.raises(ac.PatternError, match="ASCII identifier"):
        ac.param("é", 3)
    with pytest.raises(ac.DSLError, match="unexpected character"):  # digits are ASCII digits
        ac.parse("mask = q >= \u0663")


def test_an_error_about_a_param_points_at_its_declaration():
    with pytest.raises(ac.DSLError) as info:
        ac.parse("mask = q >= kv\nparam W = 1e400\nscore = score * W")
    assert (info.value.line, info.value.column) == (2, 7) and "param 'W' must be finite" in str(info.value)
