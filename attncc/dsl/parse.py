"""The text DSL: pattern text -> Pattern, with errors that point at the line and column.

The grammar (grammar.lark) gives shapes; this module gives names meaning and builds IR only
through `ir.op` / `ir.load` / `ir.const`, the same builder traced Python uses, so a text and the
equivalent traced mod produce the identical nodes, and `parse(str(p)) == p`. Nothing here calls
`eval` or `exec`: the only names a text can reach are the index variables, its own params and
buffers, and the functions listed in `FUNCTIONS`.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import lark

from . import ir, ops
from .pattern import BLOCK_VARS, MASK_VARS, SCORE_VARS, Pattern
from .trace import RESERVED_NAMES, PatternError

ALIASES = {"q_idx": "q", "kv_idx": "kv"}
CONSTANTS = {"true": True, "false": False, "inf": math.inf, "nan": math.nan}
FUNCTIONS = {**ops.FUNCTIONS, "clamp": 3}  # clamp(x, lo, hi) is spelled out as min(max(x, lo), hi)
# Which variables each expression may read.
CONTEXT_VARS = {"mask": MASK_VARS, "score": SCORE_VARS, "block": BLOCK_VARS, "param": ()}
STATEMENTS = ("param", "buffer", "mask", "score", "block", "block_size")
_BINARY = ops.INFIX  # "+" -> "add", "<=" -> "le", ...
MAX_DEPTH = 1000  # operators nested in one expression: bounds the work a text can ask of the compiler
_CHAINS = {"or_test": "or", "and_test": "and", "bor": "or", "band": "and"}
_CHAIN_HINT = (" (comparisons do not chain, and `&`, `|` bind tighter than comparisons as in Python: "
               "write `a < b and c < d` or `(a < b) & (c < d)`)")
_TERMINAL_WORDS = {"NAME": "a name", "NUMBER": "a number", "COMPARE": "a comparison", "ADDOP": "+ or -",
                   "MULOP": "*, /, // or %", "$END": "end of text"}
_INT64 = (-(1 << 63), (1 << 63) - 1)

Pos = tuple[int, int]


class DSLError(ValueError):
    """A pattern text that does not describe a valid pattern; `.line`, `.column` are 1-based.

    str(error) is `line L, column C: message`, then the source line with a caret under the spot.
    """

    def __init__(self, message: str, line: int, column: int, source_line: str = ""):
        self.message, self.line, self.column = message, line, column
        text = f"line {line}, column {column}: {message}"
        if source_line:
            start = max(0, column - 60)
            shown = ("..." if start else "") + source_line[start:column + 60]
            caret = "".join(c if c == "\t" else " " for c in shown[:column - 1 - start + (3 if start else 0)])
            text += f"\n    {shown}\n    {caret}^"
        super().__init__(text)


@lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    grammar = (Path(__file__).parent / "grammar.lark").read_text()
    return lark.Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=False)


MAX_TEXT = 1_000_000  # characters: a pattern text longer than this is refused (DSLError)


def parse(text: str) -> Pattern:
    """A Pattern from DSL text (see grammar.lark); raises DSLError with line and column.

    Texts longer than MAX_TEXT characters are refused (an unrolled 10,000-term `or` is ~150,000)."""
    if not isinstance(text, str):
        raise TypeError(f"parse() needs the pattern text as a str, got {type(text).__name__}")
    if len(text) > MAX_TEXT:
        raise DSLError(f"the pattern text has {len(text):,} characters; the limit is {MAX_TEXT:,}", 1, 1)
    return _Builder(text).pattern()


class _Builder:
    def __init__(self, text: str):
        self.text = text
        self.lines = text.splitlines() or [""]
        self.params: dict[str, ir.Param] = {}
        self.values: dict[str, ir.Value] = {}
        self.buffers: dict[str, None] = {}
        self.declared_at: dict[str, Pos] = {}  # where each param and buffer is declared
        self.context = "mask"

    # -- errors
    def error(self, message: str, pos: Pos) -> DSLError:
        line, col = pos
        source = self.lines[line - 1] if 1 <= line <= len(self.lines) else ""
        return DSLError(message, line, col, source)

    def _end(self) -> Pos:
        return len(self.lines), len(self.lines[-1]) + 1

    def syntax_tree(self) -> lark.Tree:
        try:
            return _parser().parse(self.text)
        except lark.exceptions.UnexpectedCharacters as e:
            char = self.text[e.pos_in_stream] if e.pos_in_stream < len(self.text) else ""
            hint = " (strings, attributes and other Python syntax are not part of the language)" \
                if char in "'\".:;{}`\\@$?!" else ""
            raise self.error(f"unexpected character {char!r}{hint}", (e.line, e.column)) from None
        except lark.exceptions.UnexpectedToken as e:
            stack = e.interactive_parser.parser_state.value_stack if e.interactive_parser else []
            if len(stack) >= 2 and isinstance(stack[-2], lark.Tree) and isinstance(stack[-1], lark.Token) \
                    and stack[-1].type == "NAME" and stack[-1] not in STATEMENTS:
                # `mask = q kv`: the name after a complete expression was read as a new statement
                raise self.error(f"unexpected name {str(stack[-1])!r} after a complete expression "
                                 "(is an operator missing before it?)", _pos(stack[-1])) from None
            if e.token.type == "$END":
                raise self.error(f"unexpected end of text; expected {self._expected(e.expected)}",
                                 self._end()) from None
            hint = _CHAIN_HINT if e.token.type == "COMPARE" else ""
            raise self.error(f"unexpected {str(e.token)!r}; expected {self._expected(e.expected)}{hint}",
                             (e.token.line, e.token.column)) from None

    @staticmethod
    def _expected(names) -> str:
        """Terminal names as a reader knows them: `'('`, `a name`, ..."""
        literals = {t.name: repr(t.pattern.value) for t in _parser().terminals if t.pattern.type == "str"}
        shown = sorted({literals.get(n) or _TERMINAL_WORDS.get(n, n) for n in names})
        return ", ".join(shown)

    # -- statements
    def pattern(self) -> Pattern:
        statements = self.syntax_tree().children
        defs: dict[str, lark.Tree] = {}
        for st in statements:
            head = st.children[0]
            if head not in STATEMENTS:
                raise self.error(f"unknown statement {str(head)!r}; expected one of {', '.join(STATEMENTS)}",
                                 _pos(head))
            if st.data == "assign" and head in ("param", "buffer"):
                raise self.error(f"`{head}` needs a name: `{head} NAME`", _pos(head))
            if st.data != "assign":
                self._declare(st)
            elif head in defs:
                raise self.error(f"`{head} =` is defined twice (first at line {_pos(defs[head])[0]})", _pos(head))
            else:
                defs[str(head)] = st
        if not any(k in defs for k in ("mask", "score", "block")):
            pos = _pos(statements[0]) if statements else (1, 1)
            raise self.error("the text defines no `mask =`, `score =` or `block =`", pos)
        exprs = {}
        for what in ("mask", "score", "block"):
            if what in defs:
                exprs[what] = self._definition(defs[what])
        block_size = self._block_size(defs["block_size"]) if "block_size" in defs else 128
        try:
            return Pattern.from_ir(**exprs, params=self.values, buffers=self.buffers, name=self._name(),
                                   block_size=block_size)
        except (PatternError, ir.IRError) as e:  # at the declaration it names, if any
            named = [pos for name, pos in self.declared_at.items() if f"'{name}'" in str(e)]
            raise self.error(str(e), named[0] if named else _pos(statements[0])) from None

    def _name(self) -> str | None:
        first = next((line.strip() for line in self.lines if line.strip()), "")
        return (first[1:].strip() or None) if first.startswith("#") else None

    def _declare(self, st: lark.Tree) -> None:
        head, names = st.children[0], st.children[1:]
        if st.data == "declare":
            names, value = names[:1], names[1]
            if head != "param":
                raise self.error(f"`{head} NAME = ...` is not a statement; write `param NAME = value`"
                                 if head != "buffer" else "a buffer has no default value; write `buffer NAME` "
                                 "and bind the tensor with pattern.bind(NAME=tensor)", _pos(head))
        elif head != "buffer":
            raise self.error(f"param {names[0]} needs a default value: `param {names[0]} = 1`"
                             if head == "param" else f"expected `{head} = ...`", _pos(names[0]))
        for n in names:
            if n in RESERVED_NAMES:
                raise self.error(f"{str(n)!r} is a reserved name and cannot be a {head}'s name", _pos(n))
            if n in self.params or n in self.buffers:
                raise self.error(f"{str(n)!r} is declared twice", _pos(n))
            self.declared_at[str(n)] = _pos(n)
        if head == "buffer":
            self.buffers.update((str(n), None) for n in names)
            return
        default = self._expr(value, "param")
        if not isinstance(default, ir.Const) or isinstance(default.value, bool):
            raise self.error("a param's default must be a number, e.g. 1024 or 30.0", _pos(value))
        kind = "int" if isinstance(default.value, int) else "float"
        self.params[str(names[0])] = ir.Param(str(names[0]), kind)
        self.values[str(names[0])] = default.value

    def _definition(self, st: lark.Tree) -> ir.Node:
        head, exprs = str(st.children[0]), st.children[1:]
        if len(exprs) != 1:
            raise self.error(f"`{head} =` takes one expression", _pos(exprs[1]))
        node = self._expr(exprs[0], head)
        kind = ir.kind_of(node)
        if head == "score" and kind == "bool":
            raise self.error("score must be a number, got a boolean expression", _pos(exprs[0]))
        if head != "score" and kind in ("int", "float"):
            raise self.error(f"{head} must be a boolean expression (e.g. a comparison), got {kind}",
                             _pos(exprs[0]))
        return node

    def _block_size(self, st: lark.Tree) -> int | tuple[int, int]:
        sizes = st.children[1:]
        if len(sizes) > 2:
            raise self.error("block_size takes one or two sizes", _pos(sizes[2]))
        for s in sizes:
            if not (isinstance(s, lark.Token) and s.type == "NUMBER" and s.isdigit() and int(s) > 0):
                raise self.error("block_size must be a positive integer literal", _pos(s))
        return int(sizes[0]) if len(sizes) == 1 else (int(sizes[0]), int(sizes[1]))

    # -- expressions
    def _expr(self, tree, context: str) -> ir.Node:
        """The IR of one expression's parse tree, built bottom-up without recursion (so text of any
        nesting depth, e.g. a long traced expression's printed form, reads back)."""
        self.context = context
        self.built: dict[int, ir.Node] = {}
        depth: dict[int, int] = {}
        for sub in _subtrees_children_first(tree):
            depth[id(sub)] = 1 + max((depth[id(c)] for c in sub.children if isinstance(c, lark.Tree)), default=0)
            if depth[id(sub)] > MAX_DEPTH:
                raise self.error(f"expression is nested too deeply (more than {MAX_DEPTH} levels of operators)",
                                 _pos(sub))
            self.built[id(sub)] = self._build_tree(sub)
        return self._build(tree)

    def _build(self, t) -> ir.Node:
        """An expression operand: a token, or a subtree `_expr` has already built."""
        if isinstance(t, lark.Token):
            return self._number(t) if t.type == "NUMBER" else self._variable(t)
        return self.built[id(t)]

    def _build_tree(self, t: lark.Tree) -> ir.Node:
        kind, kids = str(t.data), t.children
        if kind in _CHAINS:
            return self._chain([(None, k) for k in kids[1:]], kids[0], lambda _: _CHAINS[kind])
        if kind in ("arith", "term", "comparison"):
            return self._chain(list(zip(kids[1::2], kids[2::2])), kids[0], lambda tok: _BINARY[str(tok)])
        if kind in ("not_", "invert"):
            return self._apply("not", [kids[0]], _pos(t))
        if kind == "neg":
            return self._apply("neg", [kids[0]], _pos(t))
        if kind == "power":
            return self._power(t)
        if kind == "call":
            return self._call(t)
        if kind == "load":
            return self._load(t)
        raise AssertionError(f"unhandled grammar rule {kind}")

    def _chain(self, rest: list, first, opname) -> ir.Node:
        node, positions = self._build(first), [_pos(first)]
        for tok, operand in rest:
            rhs = self._build(operand)
            pos = _pos(tok) if tok is not None else _pos(first)
            node = self._op(opname(tok), [node, rhs], [positions[0], _pos(operand)], pos)
        return node

    def _apply(self, name: str, trees: list, pos: Pos) -> ir.Node:
        return self._op(name, [self._build(a) for a in trees], [_pos(a) for a in trees], pos)

    def _op(self, name: str, args: list, positions: list, pos: Pos) -> ir.Node:
        try:
            node = ir.op(name, *args)
        except ir.IRError as e:
            culprit = _culprit(name, args)
            raise self.error(str(e), positions[culprit] if culprit is not None else pos) from None
        if isinstance(node, ir.Const) and type(node.value) is int and not _INT64[0] <= node.value <= _INT64[1]:
            raise self.error("integer constant outside the int64 range", pos)
        return node

    def _power(self, t: lark.Tree) -> ir.Node:
        base, exp = (self._build(c) for c in t.children)
        if all(isinstance(n, ir.Const) and type(n.value) is int for n in (base, exp)) \
                and abs(base.value) > 1 and exp.value > 64:
            raise self.error("integer constant outside the int64 range", _pos(t))
        return self._op("pow", [base, exp], [_pos(c) for c in t.children], _pos(t))

    def _call(self, t: lark.Tree) -> ir.Node:
        fname, args = t.children[0], t.children[1:]
        if fname not in FUNCTIONS:
            known = ", ".join(sorted(FUNCTIONS))
            raise self.error(f"unknown function {str(fname)!r}; the functions are {known}", _pos(fname))
        if len(args) != FUNCTIONS[fname]:
            raise self.error(f"{fname}() takes {FUNCTIONS[fname]} argument(s), got {len(args)}", _pos(fname))
        if fname == "clamp":
            inner = self._op("max", [self._build(args[0]), self._build(args[1])],
                             [_pos(args[0]), _pos(args[1])], _pos(fname))
            return self._op("min", [inner, self._build(args[2])], [_pos(args[0]), _pos(args[2])], _pos(fname))
        return self._apply(str(fname), args, _pos(fname))

    def _load(self, t: lark.Tree) -> ir.Node:
        name, index = t.children[0], t.children[1:]
        if name not in self.buffers:
            what = "is not a buffer" if self._known(name) else "is not defined"
            raise self.error(f"{str(name)!r} {what}; only buffers can be indexed "
                             f"(declare one with `buffer {name}`)", _pos(name))
        nodes = [self._build(i) for i in index]
        try:
            return ir.load(str(name), tuple(nodes))
        except ir.IRError as e:
            bad = next(i for i, n in enumerate(nodes) if ir.kind_of(n) not in ("int", "any"))
            raise self.error(str(e), _pos(index[bad])) from None

    def _known(self, name: str) -> bool:
        return name in CONSTANTS or name in ALIASES or name in ir.ALL_VARS or name in self.params \
            or name in FUNCTIONS

    def _number(self, tok: lark.Token) -> ir.Node:
        try:
            value = float(tok) if any(c in tok for c in ".eE") else int(tok)
        except ValueError as e:
            raise self.error(f"bad number: {e}", _pos(tok)) from None
        if type(value) is int and value > _INT64[1]:
            raise self.error("integer constant outside the int64 range", _pos(tok))
        return ir.const(value)

    def _variable(self, tok: lark.Token) -> ir.Node:
        name = str(tok)
        if name in self.params:  # before CONSTANTS: a param may be called `nan`
            return self.params[name]
        if name in CONSTANTS:
            return ir.const(CONSTANTS[name])
        var = ALIASES.get(name, name)
        if var in ir.ALL_VARS:
            allowed = CONTEXT_VARS[self.context]
            if var not in allowed:
                raise self.error(_misplaced(var, self.context), _pos(tok))
            return ir.Var(var)
        if name in self.buffers:
            raise self.error(f"buffer {name!r} must be indexed, e.g. {name}[q]", _pos(tok))
        if name in FUNCTIONS:
            raise self.error(f"{name!r} is a function; call it, e.g. {name}(...)", _pos(tok))
        known = [*CONTEXT_VARS[self.context], *self.params, *CONSTANTS]
        raise self.error(f"unknown name {name!r}; known here: {', '.join(known)} "
                         "(declare params with `param NAME = value`, buffers with `buffer NAME`)", _pos(tok))


def _misplaced(var: str, context: str) -> str:
    if context == "param":
        return f"a param's default must be a constant number, not {var!r}"
    if var == "score":
        return f"`score` can only be used in `score = ...`, not in `{context} = ...`"
    if var in ("qb", "kb"):
        return f"{var!r} is a block index; it can only be used in `block = ...`"
    return f"{var!r} is a token index; `block = ...` reads the block indices qb, kb (and b, h)"


def _culprit(name: str, args: list) -> int | None:
    """Index of the argument an IRError is about (a bool where a number is needed, or vice versa)."""
    kinds = [ir.kind_of(a) for a in args]
    if name in ir.LOGIC or name == "not" or name == "where":
        bad = [i for i, k in enumerate(kinds) if k in ("int", "float")]
        bad = bad[:1] if name != "where" or 0 in bad else []
    elif name in ("eq", "ne"):
        bad = []
    else:
        bad = [i for i, k in enumerate(kinds) if k == "bool"]
    return bad[0] if bad else None


def _subtrees_children_first(tree) -> list:
    """The parse trees under `tree` (itself included), every one after all of its subtrees."""
    order, stack = [], [tree] if isinstance(tree, lark.Tree) else []
    while stack:
        t = stack.pop()
        order.append(t)
        stack.extend(c for c in t.children if isinstance(c, lark.Tree))
    return order[::-1]


def _pos(x) -> Pos:
    if isinstance(x, lark.Token):
        return x.line, x.column
    return x.meta.line, x.meta.column
