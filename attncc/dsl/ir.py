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
        return (type(self), self.fields())

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
# Operators: name -> (arity, kind rule). Kinds are "bool", "int", "float", or "any" (an unbound
# buffer's element type, compatible with every kind).

ARITH = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow")
COMPARE = ("eq", "ne", "lt", "le", "gt", "ge")
LOGIC = ("and", "or")
FLOAT_FUNCS = ("exp", "exp2", "log", "log2", "sqrt", "tanh", "sigmoid")
OPS: dict[str, int] = {
    **{o: 2 for o in ARITH + COMPARE + LOGIC},
    "min": 2, "max": 2, "neg": 1, "abs": 1, "not": 1, "where": 3,
    **{f: 1 for f in FLOAT_FUNCS},
}
SYMBOL = {"add": "+", "sub": "-", "mul": "*", "truediv": "/", "floordiv": "//", "mod": "%",
          "pow": "**", "eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">=",
          "and": "and", "or": "or"}


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
    kinds = [kind_of(a) for a in node.args]
    o = node.op
    if o in COMPARE or o in LOGIC or o == "not":
        return "bool"
    if o == "where":
        return _join(kinds[1], kinds[2])
    if o in FLOAT_FUNCS or o == "truediv":
        return "float"
    if o == "pow":
        return "int" if kinds == ["int", "int"] and _nonneg_const(node.args[1]) else _join(*kinds, "float")
    return _join(*kinds)


def _join(*kinds: str) -> str:
    if "any" in kinds:
        return "any"
    return "float" if "float" in kinds else kinds[0]


def _nonneg_const(n: Node) -> bool:
    return isinstance(n, Const) and n.value >= 0


def _check(name: str, args: tuple) -> None:
    if name not in OPS:
        raise IRError(f"unknown operator {name!r}")
    if len(args) != OPS[name]:
        raise IRError(f"{name} takes {OPS[name]} argument(s), got {len(args)}")
    kinds = [kind_of(a) for a in args]
    numeric = [k for k in kinds if k in ("int", "float", "any")]
    if name in LOGIC or name == "not":
        if any(k not in ("bool", "any") for k in kinds):
            raise IRError(f"'{SYMBOL.get(name, name)}' needs booleans, got {', '.join(kinds)}")
    elif name == "where":
        if kinds[0] not in ("bool", "any"):
            raise IRError(f"where() needs a boolean condition, got {kinds[0]}")
        if (kinds[1] == "bool") != (kinds[2] == "bool") and "any" not in kinds[1:]:
            raise IRError(f"where() branches must both be booleans or both numbers, got {kinds[1]}, {kinds[2]}")
    elif name in ("eq", "ne"):
        if len(numeric) == 1 and "any" not in kinds:
            raise IRError(f"'{SYMBOL[name]}' compares a boolean with a number")
    elif len(numeric) != len(kinds):
        raise IRError(f"'{SYMBOL.get(name, name)}' needs numbers, got a boolean")


# ----------------------------------------------------------------------------------------------
# Construction with simplification.

def const(value: Value) -> Const:
    if isinstance(value, bool) or isinstance(value, int):
        return Const(value)
    if isinstance(value, float):
        return Const(float(value))
    raise IRError(f"constants must be bool, int or float, got {type(value).__name__}")


TRUE, FALSE = Const(True), Const(False)

_FOLD: dict[str, Callable] = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "truediv": lambda a, b: a / b, "floordiv": lambda a, b: a // b, "mod": lambda a, b: a % b,
    "pow": lambda a, b: a ** b,
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
    "and": lambda a, b: a and b, "or": lambda a, b: a or b, "not": lambda a: not a,
    # min/max propagate nan like torch.minimum/maximum (Python's min(0, nan) is 0)
    "min": lambda a, b: a + b if a != a or b != b else min(a, b),
    "max": lambda a, b: a + b if a != a or b != b else max(a, b),
    "neg": lambda a: -a, "abs": abs,
    "where": lambda c, a, b: a if c else b,
    "exp": math.exp, "exp2": lambda a: 2.0 ** a, "log": math.log, "log2": math.log2,
    "sqrt": math.sqrt, "tanh": math.tanh, "sigmoid": lambda a: 1.0 / (1.0 + math.exp(-a)),
}


def _fold(name: str, args: tuple) -> Node | None:
    int_pow = name == "pow" and kind_of(args[0]) == kind_of(args[1]) == "int"
    if int_pow and abs(args[1].value) > 64 and abs(args[0].value) > 1:
        return None  # 2 ** 10**9 would take Python minutes (and is no int64 anyway)
    try:
        value = _FOLD[name](*(a.value for a in args))
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


def op(name: str, *args: Node) -> Node:
    """Build `name(*args)`, type-checked and lightly simplified."""
    args = tuple(args)
    _check(name, args)
    if all(isinstance(a, Const) for a in args):
        folded = _fold(name, args)
        if folded is not None:
            return folded
    simpler = _simplify(name, args)
    return simpler if simpler is not None else Op(name, args)


def _simplify(name: str, args: tuple) -> Node | None:
    a = args[0]
    b = args[1] if len(args) > 1 else None
    same_kind = b is not None and kind_of(a) == kind_of(b)
    is_int = kind_of(a) == "int"
    if name == "add" and same_kind:
        if _is(b, 0) or _is(b, 0.0):
            return a
        if _is(a, 0) or _is(a, 0.0):
            return b
    if name == "sub" and same_kind:
        if _is(b, 0) or _is(b, 0.0):
            return a
        if a is b and is_int:
            return Const(0)
    if name == "mul" and same_kind:
        if _is(b, 1) or _is(b, 1.0):
            return a
        if _is(a, 1) or _is(a, 1.0):
            return b
        if is_int and (_is(a, 0) or _is(b, 0)):
            return Const(0)
    if name == "floordiv" and _is(b, 1) and is_int:
        return a
    # and/or/not may return an operand only if it is a boolean: an integer buffer read (kind
    # "any") used as a truth value is not the same value as the truth value itself
    if name in ("neg", "not") and isinstance(a, Op) and a.op == name and (name == "neg" or _bool(a.args[0])):
        return a.args[0]
    if name in LOGIC and isinstance(b, Op) and b.op == name:  # keep chains left-associated
        operands = []
        while isinstance(b, Op) and b.op == name:  # iteratively: chains may be thousands long
            operands.append(b.args[1])
            b = b.args[0]
        for x in [b] + operands[::-1]:
            a = op(name, a, x)
        return a
    if name in LOGIC:
        absorbing, neutral = (FALSE, TRUE) if name == "and" else (TRUE, FALSE)
        if a is absorbing or b is absorbing:
            return absorbing
        if _bool(a) and (b is neutral or a is b):
            return a
        if _bool(b) and a is neutral:
            return b
    if name in COMPARE and a is b and is_int:
        return TRUE if name in ("eq", "le", "ge") else FALSE
    if name in ("min", "max") and a is b:
        return a
    if name == "where":
        if a is TRUE:
            return args[1]
        if a is FALSE:
            return args[2]
        if args[1] is args[2]:
            return args[1]
    return None


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


def free_vars(node: Node) -> frozenset[str]:
    return frozenset(n.name for n in walk(node) if isinstance(n, Var))


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

_PREC = {"or": 1, "and": 2, "not": 3, **{c: 4 for c in COMPARE}, "add": 5, "sub": 5,
         "mul": 6, "truediv": 6, "floordiv": 6, "mod": 6, "neg": 7, "pow": 8}
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


_TEXT: dict[Node, str] = {}


def to_text(node: Node) -> str:
    """Canonical DSL text of an expression; `parse` reads it back to the identical node."""
    text = _TEXT.get(node)
    if text is None:
        for n in walk(node):  # children first, so printing never recurses deeply (long and/or chains)
            if n not in _TEXT:
                _TEXT[n] = _text(n)
        text = _TEXT[node]
    return text


def _text(node: Node) -> str:
    if isinstance(node, Var):
        return node.name
    if isinstance(node, Const):
        return format_const(node.value)
    if isinstance(node, Param):
        return node.name
    if isinstance(node, Load):
        return f"{node.buffer}[{', '.join(to_text(i) for i in node.index)}]"
    o, args = node.op, node.args
    if o not in _PREC:
        return f"{o}({', '.join(to_text(a) for a in args)})"
    p = _PREC[o]
    if o == "not":
        return f"not {_wrap(args[0], p, strict=False)}"
    if o == "neg":
        return f"-{_wrap(args[0], p, strict=False)}"
    if o == "pow":
        return f"{_wrap(args[0], p, strict=True)} ** {_wrap(args[1], p, strict=False)}"
    if o in COMPARE:
        return f"{_wrap(args[0], p, strict=True)} {SYMBOL[o]} {_wrap(args[1], p, strict=True)}"
    return f"{_wrap(args[0], p, strict=False)} {SYMBOL[o]} {_wrap(args[1], p, strict=True)}"


def _wrap(child: Node, parent_prec: int, strict: bool) -> str:
    text = to_text(child)
    cp = _prec(child)
    if cp < parent_prec or (strict and cp == parent_prec):
        return f"({text})"
    return text


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
