"""The pattern IR: a small closed set of frozen, hash-consed expression nodes.

Every way of writing a pattern (traced Python, the text DSL, the catalogue) ends here, and every
consumer (reference, block classifier, code generator, derivative) is an interpreter over it.

Nodes are interned: building the same expression twice returns the same object, so equality is
identity and hashing is O(1). Build nodes with `op(name, *args)`, which type-checks and applies
light algebraic simplification; `str(node)` is the canonical DSL text (and the cache key).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterator, Union

from . import ops

Value = Union[bool, int, float]

INDEX_VARS = ("b", "h", "q", "kv")
BLOCK_VARS = ("qb", "kb")
SCORE_VAR = "score"
ALL_VARS = INDEX_VARS + BLOCK_VARS + (SCORE_VAR,)


class IRError(TypeError):
    """An ill-typed or malformed IR expression (e.g. a bool where a number is needed)."""


class Node:
    """Base of all IR nodes. Instances are interned: structural equality is identity."""

    __slots__ = ()
    _table: dict = {}

    def __new__(cls, *fields):
        # floats by repr: 0.0 == -0.0 and nan != nan would otherwise merge or split nodes
        key = (cls,) + tuple((type(f), repr(f) if type(f) is float else f) for f in fields)
        node = Node._table.get(key)
        if node is None:  # setdefault is atomic: two threads interning one key get one node
            node = Node._table.setdefault(key, object.__new__(cls))
        return node

    def __reduce__(self):
        """Pickled as its distinct nodes in post-order, children by index: no recursion, so a
        1000-term `or` pickles (nested reduction ran past Python's recursion limit)."""
        order = list(walk(self))
        index = {id(n): i for i, n in enumerate(order)}

        def encode(f):
            if isinstance(f, Node):
                return _ChildRef(index[id(f)])
            return tuple(encode(x) for x in f) if type(f) is tuple else f
        return (_rebuild, ([(type(n), tuple(encode(f) for f in n.fields())) for n in order],))

    def fields(self) -> tuple:
        return tuple(getattr(self, s) for s in self.__slots__)

    def children(self) -> tuple["Node", ...]:
        return ()

    def __str__(self) -> str:
        return to_text(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {to_text(self)}>"

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


class _ChildRef(int):
    """In a pickled expression: the position of a child among the nodes rebuilt before it."""


def _rebuild(rows: list) -> "Node":
    """The expression pickled by Node.__reduce__: each row (type, fields) after its children."""
    built: list[Node] = []

    def decode(f):
        if type(f) is _ChildRef:
            return built[f]
        return tuple(decode(x) for x in f) if type(f) is tuple else f
    for cls, fields in rows:
        built.append(cls(*(decode(f) for f in fields)))
    return built[-1]


def _node(cls):
    """Frozen, identity-compared dataclass for an interned node type."""
    return dataclass(frozen=True, eq=False, slots=True, repr=False)(cls)


@_node
class Var(Node):
    """An index variable (`b h q kv`, `qb kb` in block predicates) or the `score`."""
    name: str

    def __post_init__(self):
        if self.name not in ALL_VARS:
            raise IRError(f"unknown variable {self.name!r}; expected one of {ALL_VARS}")


@_node
class Const(Node):
    """A literal bool, int or float."""
    value: Value


@_node
class Param(Node):
    """A named runtime scalar; its value lives in the Pattern, so rebinding never recompiles."""
    name: str
    kind: str  # "int" or "float"


@_node
class Load(Node):
    """`buffer[index...]`: a scalar read from a named captured tensor."""
    buffer: str
    index: tuple

    def children(self):
        return self.index


@_node
class Op(Node):
    """An operator application; `op` is a key of OPS."""
    op: str
    args: tuple

    def children(self):
        return self.args


# ----------------------------------------------------------------------------------------------
# Operators: every fact about one lives in its row of the table in ops.py. Kinds are "bool",
# "int", "float", or "any" (an unbound buffer's element type, compatible with every kind).

OPS: dict[str, int] = {name: row.arity for name, row in ops.TABLE.items()}  # name -> arity
COMPARE, LOGIC, FLOAT_FUNCS = ops.COMPARE, ops.LOGIC, ops.FLOAT_FUNCS
SYMBOL = {row.name: row.spelling for row in ops.ROWS if row.form == "infix"}
_NUMERIC = ("int", "float", "any")


@lru_cache(maxsize=None)
def kind_of(node: Node) -> str:
    """The value kind of an expression: "bool", "int", "float" or "any"."""
    if isinstance(node, Var):
        return "float" if node.name == SCORE_VAR else "int"
    if isinstance(node, Const):
        return type(node.value).__name__
    if isinstance(node, Param):
        return node.kind
    if isinstance(node, Load):
        return "any"
    return result_kind(ops.TABLE[node.op].kind, [kind_of(a) for a in node.args], node.args)


def result_kind(rule: str, kinds: list[str], args: tuple) -> str:
    """The kind an operator of result rule `rule` (ops.py) gives operands of `kinds`."""
    if rule in ("bool", "float", "int"):
        return rule
    if rule == "branches":
        return _join(kinds[1], kinds[2])
    if rule == "pow" and not (kinds == ["int", "int"] and _nonneg_const(args[1])):
        return _join(*kinds, "float")
    return _join(*kinds)


def _join(*kinds: str) -> str:
    if "any" in kinds:
        return "any"
    return "float" if "float" in kinds else kinds[0]


def _nonneg_const(n: Node) -> bool:
    return isinstance(n, Const) and n.value >= 0


def _check(name: str, args: tuple) -> None:
    row = ops.TABLE.get(name)
    if row is None:
        raise IRError(f"unknown operator {name!r}")
    if len(args) != row.arity:
        raise IRError(f"{name} takes {row.arity} argument(s), got {len(args)}")
    kinds = [kind_of(a) for a in args]
    numeric = [k for k in kinds if k in _NUMERIC]
    if row.operands == "bool":
        if any(k not in ("bool", "any") for k in kinds):
            raise IRError(f"'{row.spelling}' needs booleans, got {', '.join(kinds)}")
    elif row.operands == "where":
        if kinds[0] not in ("bool", "any"):
            raise IRError(f"where() needs a boolean condition, got {kinds[0]}")
        if (kinds[1] == "bool") != (kinds[2] == "bool") and "any" not in kinds[1:]:
            raise IRError(f"where() branches must both be booleans or both numbers, got {kinds[1]}, {kinds[2]}")
    elif row.operands == "any":
        if len(numeric) == 1 and "any" not in kinds:
            raise IRError(f"'{row.spelling}' compares a boolean with a number")
    elif len(numeric) != len(kinds):
        raise IRError(f"'{row.spelling}' needs numbers, got a boolean")
    if name in ("truediv", "floordiv", "mod") and isinstance(args[1], Const) and args[1].value == 0:
        raise IRError(f"division by zero: {to_text(args[0])} {row.spelling} {to_text(args[1])}")


# ----------------------------------------------------------------------------------------------
# Construction: type check, constant folding, canonical operand order, rewrite rules.

def const(value: Value) -> Const:
    if isinstance(value, bool) or isinstance(value, int):
        return Const(value)
    if isinstance(value, float):
        return Const(float(value))
    raise IRError(f"constants must be bool, int or float, got {type(value).__name__}")


TRUE, FALSE = Const(True), Const(False)


def _fold(name: str, args: tuple) -> Node | None:
    int_pow = name == "pow" and kind_of(args[0]) == kind_of(args[1]) == "int"
    if int_pow and abs(args[1].value) > 64 and abs(args[0].value) > 1:
        return None  # 2 ** 10**9 would take Python minutes (and is no int64 anyway)
    try:
        value = ops.TABLE[name].fold(*(a.value for a in args))
    except (ZeroDivisionError, ValueError, OverflowError):
        return None
    if isinstance(value, complex):  # e.g. (-8.0) ** 0.5: not a real constant, leave it unfolded
        return None
    kind = kind_of(Op(name, args))
    if kind == "float":
        value = float(value)
    elif kind == "int" and not isinstance(value, bool):
        value = int(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    return const(value)


def _bool(n: Node) -> bool:
    return kind_of(n) == "bool"


def _is(n: Node, value) -> bool:
    return isinstance(n, Const) and type(n.value) is type(value) and n.value == value


def _is_one(n: Node) -> bool:
    return _is(n, 1) or _is(n, 1.0)


_LEAD_RANK = {v: i for i, v in enumerate(("score", "q", "qb", "kv", "kb", "h", "b"))}


@lru_cache(maxsize=None)
def _order(n: Node, consts_first: bool) -> tuple:
    """Sort key of a commutative or compared operand: expressions of the variables first, by their
    leading variable (score, q, qb, kv, kb, h, b: `q >= kv`, `q + 1 >= kv`), then params, then
    constants (`q + 1`); constants and params first instead where `consts_first` (`2 * q`,
    `cap * tanh(score / cap)`). Ties by text."""
    if isinstance(n, Const):
        return (-2 if consts_first else 3, 0, "")
    if isinstance(n, Param) and consts_first:
        return (-1, 0, n.name)
    names = free_vars(n)
    if names:
        return (0, min(_LEAD_RANK[v] for v in names), to_text(n))
    return (1 if isinstance(n, (Param, Op)) else 2, 0, to_text(n))


def _canonical(name: str, args: tuple) -> tuple[str, tuple]:
    """`kv <= q` -> `q >= kv`, `1 + q` -> `q + 1`: mirrored and commutative forms share one node."""
    row = ops.TABLE[name]
    if len(args) == 2 and (row.commutative or row.mirror):
        key = lambda n: _order(n, consts_first=name == "mul")
        if key(args[1]) < key(args[0]):
            return (row.mirror or name), (args[1], args[0])
    return name, args


def op(name: str, *args: Node) -> Node:
    """Build `name(*args)`, type-checked, folded, canonically ordered and lightly simplified.

    A boolean compared with a number (`flag == 1`) reads the boolean as 0/1, as torch does.
    """
    args = tuple(args)
    if name in ("eq", "ne") and len(args) == 2 and {kind_of(a) for a in args} in ({"bool", "int"}, {"bool", "float"}):
        args = tuple(where_01(a) if _bool(a) else a for a in args)
    _check(name, args)
    if all(isinstance(a, Const) for a in args):
        folded = _fold(name, args)
        if folded is not None:
            return folded
    name, args = _canonical(name, args)
    for names, rule in RULES:
        if name in names:
            simpler = rule(name, *args)
            if simpler is not None:
                return simpler
    return Op(name, args)


def where_01(c: Node) -> Node:
    """A boolean as the integer 0 / 1."""
    return op("where", c, const(1), const(0))


# -- rewrite rules: (operators, rule(name, *args) -> simpler node or None), tried in order

def _identity(name, a, b):
    """x * 1, 1 * x -> x; integers: x + 0, 0 + x, x - 0 -> x; floats only where IEEE leaves every x
    as it is: x - 0.0, x + -0.0, -0.0 + x (x + 0.0 is +0.0 at x = -0.0). Same kinds, so the
    result keeps its kind."""
    if kind_of(a) != kind_of(b):
        return None
    if name == "mul":
        return a if _is_one(b) else b if _is_one(a) else None
    if kind_of(a) == "int":
        if _is(b, 0):
            return a
        return b if name == "add" and _is(a, 0) else None
    if _signed_zero(b, negative=name == "add"):
        return a
    return b if name == "add" and _signed_zero(a, negative=True) else None


def _signed_zero(n: Node, negative: bool) -> bool:
    """Whether n is the float constant -0.0 (negative) or +0.0."""
    return _is(n, 0.0) and (math.copysign(1.0, n.value) < 0) == negative


def _self_cancel(name, a, b):
    """x - x -> 0 and x * 0 -> 0 for integers (floats keep them: inf - inf is nan)."""
    if kind_of(a) == kind_of(b) == "int":
        if name == "sub" and a is b:
            return Const(0)
        if name == "mul" and (_is(a, 0) or _is(b, 0)):
            return Const(0)
    return None


def _unit_divisor(name, a, b):
    return a if kind_of(a) == "int" and _is(b, 1) else None


def _unit_modulus(name, a, b):
    """x % 1 -> 0 and x % -1 -> 0 for an integer x (a layout without dilation writes x % 1)."""
    return Const(0) if kind_of(a) == "int" and (_is(b, 1) or _is(b, -1)) else None


def _involution(name, a):
    """-(-x) -> x; not (not x) -> x for a boolean x (an integer buffer read used as a truth value
    is not the same value as the truth value itself)."""
    if isinstance(a, Op) and a.op == name and (name == "neg" or _bool(a.args[0])):
        return a.args[0]
    return None


def _left_chain(name, a, b):
    """a and (b and c) -> (a and b) and c: chains stay left-associated, built iteratively (they
    may be thousands of terms long)."""
    if not (isinstance(b, Op) and b.op == name):
        return None
    operands = []
    while isinstance(b, Op) and b.op == name:
        operands.append(b.args[1])
        b = b.args[0]
    for x in [b] + operands[::-1]:
        a = op(name, a, x)
    return a


def _logic_units(name, a, b):
    absorbing, neutral = (FALSE, TRUE) if name == "and" else (TRUE, FALSE)
    if a is absorbing or b is absorbing:
        return absorbing
    if _bool(a) and (b is neutral or a is b):
        return a
    if _bool(b) and a is neutral:
        return b
    return None


def _reflexive(name, a, b):
    if a is b and kind_of(a) == "int":
        return TRUE if name in ("eq", "le", "ge") else FALSE
    return None


def _flag_compare(name, a, b):
    """where(c, 1, 0) == 1 -> c, == 0 -> not c (and != likewise): `flag == 1` on a traced mask."""
    if isinstance(a, Op) and a.op == "where" and _is(a.args[1], 1) and _is(a.args[2], 0) \
            and isinstance(b, Const) and b.value in (0, 1) and not isinstance(b.value, bool):
        keep = (b.value == 1) == (name == "eq")
        return a.args[0] if keep else op("not", a.args[0])
    return None


def _idempotent(name, a, b):
    return a if a is b else None


def _where(name, c, a, b):
    """where(True, a, b) -> a, where(False, a, b) -> b, where(c, a, a) -> a. The branch taken keeps
    the where's kind, as torch promotes it: an integer, or a load (of unknown dtype), beside a
    float branch becomes a float (x * 1.0: 1 / -(b + b) at b = 0 is -inf in floats, where -0.0
    exists, inf in integers). Where the kind cannot be known (a load beside an integer or a load)
    the where stays: the evaluators promote its branches."""
    pick = a if c is TRUE else b if c is FALSE else a if a is b else None
    if pick is None or a is b:
        return pick
    kind, other = kind_of(pick), kind_of(b if pick is a else a)
    if kind == "float" or kind == other != "any":
        return pick
    if other == "float":
        return op("mul", pick, const(1.0))
    return None


def _integer_rounding(name, a):
    """floor / ceil / round / int of an integer is the integer itself."""
    return a if kind_of(a) == "int" else None


RULES: list[tuple[tuple[str, ...], Callable]] = [
    (("add", "sub", "mul"), _identity),
    (("sub", "mul"), _self_cancel),
    (("floordiv",), _unit_divisor),
    (("mod",), _unit_modulus),
    (("neg", "not"), _involution),
    (LOGIC, _left_chain),
    (LOGIC, _logic_units),
    (COMPARE, _reflexive),
    (("eq", "ne"), _flag_compare),
    (("min", "max"), _idempotent),
    (("where",), _where),
    (ops.ROUNDING + ("int",), _integer_rounding),
]


def load(buffer: str, index: tuple) -> Load:
    for i in index:
        if kind_of(i) not in ("int", "any"):
            raise IRError(f"index of buffer {buffer!r} must be an integer, got {kind_of(i)}")
    return Load(buffer, tuple(index))


# ----------------------------------------------------------------------------------------------
# Traversal and rewriting.

def walk(node: Node) -> Iterator[Node]:
    """Every distinct node of the expression, children before parents."""
    seen: set[int] = set()
    stack: list[tuple[Node, bool]] = [(node, False)]
    while stack:
        n, expanded = stack.pop()
        if id(n) in seen:
            continue
        if expanded:
            seen.add(id(n))
            yield n
        else:
            stack.append((n, True))
            stack.extend((c, False) for c in reversed(n.children()))


@lru_cache(maxsize=None)
def free_vars(node: Node) -> frozenset[str]:
    """The variables `node` reads (cached: nodes are interned, and the analyses ask per node)."""
    return frozenset(n.name for n in walk(node) if isinstance(n, Var))


def score_free(node: Node) -> bool:
    """Whether `node` does not read the score (its value is fixed by b, h, q, kv, params, buffers)."""
    return SCORE_VAR not in free_vars(node)


def power_of_two_divisor(node: Node) -> int | None:
    """k where `node` is a floor division or modulo by the integer constant 2**k (a shift or a
    bit-mask of an integer dividend), else None."""
    if not (isinstance(node, Op) and node.op in ("floordiv", "mod")):
        return None
    y = node.args[1]
    if not isinstance(y, Const) or type(y.value) is not int or y.value <= 0 or y.value & (y.value - 1):
        return None
    return y.value.bit_length() - 1


def params_of(node: Node) -> dict[str, Param]:
    return {n.name: n for n in walk(node) if isinstance(n, Param)}


def buffers_of(node: Node) -> frozenset[str]:
    return frozenset(n.buffer for n in walk(node) if isinstance(n, Load))


def substitute(node: Node, mapping: Callable[[Node], Node | None]) -> Node:
    """Rebuild `node` bottom-up; each rebuilt node for which `mapping` returns a node is replaced.

    A rebuilt node that simplification turned into another kind of node (`-(-score)` with score
    already replaced collapses to `score`) is made of replacements already and is not mapped again.
    """
    memo: dict[int, Node] = {}
    for n in walk(node):
        if isinstance(n, Op):
            n2 = op(n.op, *(memo[id(a)] for a in n.args))
        elif isinstance(n, Load):
            n2 = load(n.buffer, tuple(memo[id(i)] for i in n.index))
        else:
            n2 = n
        repl = mapping(n2) if type(n2) is type(n) else None
        memo[id(n)] = n2 if repl is None else repl
    return memo[id(node)]


def rename_buffers(node: Node, renames: dict[str, str]) -> Node:
    """`node` with each buffer `old` read as `renames[old]`."""
    return substitute(node, lambda n: load(renames[n.buffer], n.index)
                      if isinstance(n, Load) and n.buffer in renames else None)


# ----------------------------------------------------------------------------------------------
# The canonical printer (DSL syntax, Python-like precedence).

_PREC = {row.name: row.prec for row in ops.ROWS if row.prec is not None}
_ATOM = 10


def format_const(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    return str(value)


def _prec(n: Node) -> int:
    if isinstance(n, Const) and not isinstance(n.value, bool) and (n.value < 0 or str(n.value).startswith("-")):
        return _PREC["neg"]
    if isinstance(n, Op):
        return _PREC.get(n.op, _ATOM)
    return _ATOM


@lru_cache(maxsize=4096)
def to_text(node: Node) -> str:
    """Canonical DSL text of an expression; `parse` reads it back to the identical node. Written
    piece by piece from an explicit stack: time and memory linear in the text at any depth."""
    out: list[str] = []
    stack: list = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        else:
            stack.extend(reversed(_pieces(item)))
    return "".join(out)


def _pieces(node: Node) -> list:
    """`node`'s text as strings and child nodes (each to be written in its place)."""
    if isinstance(node, Var):
        return [node.name]
    if isinstance(node, Const):
        return [format_const(node.value)]
    if isinstance(node, Param):
        return [node.name]
    if isinstance(node, Load):
        return [f"{node.buffer}[", *_separated(node.index), "]"]
    row, args = ops.TABLE[node.op], node.args
    if row.form == "call":
        return [f"{row.spelling}(", *_separated(args), ")"]
    p = row.prec
    if row.form == "prefix":
        space = " " if row.spelling.isalpha() else ""
        return [f"{row.spelling}{space}", *_wrap(args[0], p, strict=False)]
    if node.op == "pow":  # right-associative
        return [*_wrap(args[0], p, strict=True), " ** ", *_wrap(args[1], p, strict=False)]
    left_strict = node.op in COMPARE  # comparisons do not chain
    return [*_wrap(args[0], p, strict=left_strict), f" {row.spelling} ", *_wrap(args[1], p, strict=True)]


def _separated(nodes) -> list:
    pieces: list = []
    for i, n in enumerate(nodes):
        pieces += [", ", n] if i else [n]
    return pieces


def _wrap(child: Node, parent_prec: int, strict: bool) -> list:
    cp = _prec(child)
    if cp < parent_prec or (strict and cp == parent_prec):
        return ["(", child, ")"]
    return [child]


def tree(node: Node, depth: int = 1) -> str:
    """The expression as an indented tree, one node a line with its kind."""
    if isinstance(node, Op):
        label = node.op
    elif isinstance(node, Load):
        label = f"load {node.buffer}"
    else:
        label = f"{type(node).__name__.lower()} {to_text(node)}"
    lines = [f"{'  ' * depth}{label} : {kind_of(node)}"]
    lines += [tree(c, depth + 1) for c in node.children()]
    return "\n".join(lines)
