"""Pattern: an attention pattern as a value — mask IR, score IR, block predicate, params, buffers."""
from __future__ import annotations

import itertools
import math
import numbers
import weakref
from typing import Callable, Mapping

import torch

from . import ir
from .trace import BUFFER_DTYPES, PatternError, Tracer, python_number, trace

_UIDS = itertools.count()
_BY_UID: "weakref.WeakValueDictionary[str, Pattern]" = weakref.WeakValueDictionary()

MASK_VARS = ("b", "h", "q", "kv")
SCORE_VARS = ("score", "b", "h", "q", "kv")
BLOCK_VARS = ("b", "h", "qb", "kb")
IDENTITY_SCORE = ir.Var("score")


class Pattern:
    """Which (query, key) pairs attend (`mask`), how scores change (`score`), which blocks live.

    Build from FlexAttention-style functions, `Pattern(mask_mod=causal, score_mod=softcap)`, from
    the text DSL (`attncc.parse`), or from the catalogue (`attncc.patterns`). A pattern is an
    immutable value: hashable, comparable, and `str(p)` is its DSL text.

    mask_mod(b, h, q_idx, kv_idx) -> bool; score_mod(score, b, h, q_idx, kv_idx) -> float;
    block_mask_mod(b, h, q_block, kv_block) -> bool marks whole blocks of `block_size` tokens
    (an int or (BQ, BK), default 128) dead; at token level it reads as `block(q // BQ, kv // BK)`.
    """

    __slots__ = ("mask", "score", "block", "block_size", "params", "buffers", "name", "uid", "layout",
                 "kernel_pattern", "__weakref__")

    def __init__(self, mask_mod: Callable | None = None, score_mod: Callable | None = None,
                 block_mask_mod: Callable | None = None, name: str | None = None,
                 block_size: int | tuple[int, int] = 128):
        tracer = Tracer()
        mask = trace(mask_mod, MASK_VARS, tracer, "mask_mod") if mask_mod is not None else ir.TRUE
        score = trace(score_mod, SCORE_VARS, tracer, "score_mod") if score_mod is not None else IDENTITY_SCORE
        block = trace(block_mask_mod, BLOCK_VARS, tracer, "block_mask_mod") if block_mask_mod is not None else ir.TRUE
        if name is None:
            name = _name_of(mask_mod or score_mod or block_mask_mod)
            if block_mask_mod is not None and (mask_mod or score_mod) is not None:
                block_name = _name_of(block_mask_mod)
                name = f"{name or 'pattern'} with block predicate" + (f" {block_name}" if block_name else "")
        buffers, renames = dict(tracer.buffers), {}
        for clash in set(tracer.params) & set(buffers):  # a tensor variable named like a param
            renames[clash] = _fresh(clash, set(buffers) | set(tracer.params))
            buffers[renames[clash]] = buffers.pop(clash)
        mask, score, block = (ir.rename_buffers(e, renames) for e in (mask, score, block))
        self._init(mask, score, block, tracer.params, buffers, name, block_size)

    @classmethod
    def from_ir(cls, mask: ir.Node = ir.TRUE, score: ir.Node = IDENTITY_SCORE, block: ir.Node = ir.TRUE,
                params: Mapping[str, ir.Value] | None = None,
                buffers: Mapping[str, torch.Tensor | None] | None = None, name: str | None = None,
                block_size: int | tuple[int, int] = 128, layout=None) -> "Pattern":
        """A pattern from IR nodes; `params` gives each Param's value, `buffers` each buffer's tensor;
        `layout` (compiler/layout.py) how the kernels order the tokens (None: naturally)."""
        self = object.__new__(cls)
        self._init(mask, score, block, dict(params or {}), dict(buffers or {}), name, block_size, layout)
        return self

    def _init(self, mask, score, block, params, buffers, name, block_size, layout=None):
        _check_expr(mask, MASK_VARS, "mask", ("bool", "any"))
        _check_expr(score, SCORE_VARS, "score", ("float", "int", "any"))
        _check_expr(block, BLOCK_VARS, "block", ("bool", "any"))
        if ir.kind_of(score) == "int":
            score = ir.op("mul", score, ir.const(1.0))
        used_params: dict[str, ir.Param] = {}
        used_buffers: set[str] = set()
        for e in (mask, score, block):
            used_params.update(ir.params_of(e))
            used_buffers |= ir.buffers_of(e)
        for pname, pnode in used_params.items():
            if pname not in params:
                raise PatternError(f"param {pname!r} has no value")
            params[pname] = _coerce_param(pname, pnode.kind, params[pname])
        missing = used_buffers - set(buffers)
        if missing:
            raise PatternError(f"buffer(s) {sorted(missing)} are used but not declared")
        both = set(params) & set(buffers)
        if both:
            raise PatternError(f"{sorted(both)} name both a param and a buffer; rename one")
        for bname, t in buffers.items():
            _check_buffer(bname, t)
        setter = object.__setattr__
        setter(self, "mask", mask)
        setter(self, "score", score)
        setter(self, "block", block)
        setter(self, "block_size", block_pair(block_size))
        setter(self, "params", dict(sorted(params.items())))
        setter(self, "buffers", dict(sorted(buffers.items())))
        setter(self, "name", name)
        # a process-unique string naming this pattern object: what torch.compile'd graphs hold
        # (runtime/compiled_op.py), as a constant, to find it again (by_uid)
        setter(self, "uid", f"attncc-pattern-{next(_UIDS)}")
        _BY_UID[self.uid] = self
        # the pattern the kernels run: itself, or in a layout's coordinates (built once, here)
        setter(self, "layout", layout)
        setter(self, "kernel_pattern", self if layout is None else layout.compose(self))

    def __setattr__(self, key, value):
        raise AttributeError("Pattern is immutable; use bind() or the & and | operators")

    @staticmethod
    def by_uid(uid: str) -> "Pattern | None":
        """The live pattern whose `uid` this is (None once it was garbage-collected)."""
        return _BY_UID.get(uid)

    # -- queries
    @property
    def has_score_mod(self) -> bool:
        return self.score is not IDENTITY_SCORE

    @property
    def has_block_mask(self) -> bool:
        return self.block is not ir.TRUE

    def free_vars(self) -> frozenset[str]:
        """Index variables the pattern reads (through buffers' indices too)."""
        return ir.free_vars(self.mask) | ir.free_vars(self.score) | ir.free_vars(self.block)

    def param_kind(self, name: str) -> str:
        return "int" if isinstance(self.params[name], int) else "float"

    def unbound_buffers(self) -> list[str]:
        return [n for n, t in self.buffers.items() if t is None]

    def require_bound(self) -> None:
        missing = self.unbound_buffers()
        if missing:
            raise PatternError(f"buffer(s) {missing} have no tensor; supply them with "
                               f"pattern.bind({missing[0]}=tensor)")

    # -- building new patterns
    def bind(self, **values) -> "Pattern":
        """A copy with new param values (numbers) and/or buffer tensors; never changes the IR.

        Values are checked for their kind (an int param takes ints) and, before anything runs, for
        the domain conditions (compiler/domain.py), not for a catalogue constructor's own limits:
        `sliding_window(8).bind(W=-1)` is the formula with W = -1 (every row empty)."""
        params, buffers = dict(self.params), dict(self.buffers)
        for key, value in values.items():
            if key in params:
                params[key] = _coerce_param(key, self.param_kind(key), value)
            elif key in buffers:
                buffers[key] = value
            else:
                known = sorted(params) + sorted(buffers)
                raise PatternError(f"bind(): {key!r} is not a param or buffer of this pattern "
                                   f"(it has {known or 'none'})")
        return Pattern.from_ir(self.mask, self.score, self.block, params, buffers, self.name, self.block_size,
                               self.layout)

    def with_layout(self, layout) -> "Pattern":
        """A copy whose kernels run in `layout`'s token order (compiler/layout.py; None: natural
        order). What the pattern means, its reference and its dense mask do not change."""
        return Pattern.from_ir(self.mask, self.score, self.block, self.params, self.buffers, self.name,
                               self.block_size, layout)

    def __and__(self, other: "Pattern") -> "Pattern":
        return self._combine(other, "and")

    def __or__(self, other: "Pattern") -> "Pattern":
        return self._combine(other, "or")

    def _combine(self, other: "Pattern", how: str) -> "Pattern":
        if not isinstance(other, Pattern):
            return NotImplemented
        params = dict(self.params)
        for k, v in other.params.items():
            if k in params and (params[k] != v or type(params[k]) is not type(v)):
                raise PatternError(f"cannot combine patterns: param {k!r} is {params[k]!r} in one and "
                                   f"{v!r} in the other; rename one or bind them to the same value")
            params[k] = v
        buffers = dict(self.buffers)
        renames: dict[str, str] = {}
        for k, t in other.buffers.items():
            if k in buffers and not _same_tensor(buffers[k], t):
                renames[k] = _fresh(k, set(buffers) | set(other.buffers))
                k = renames[k]
            buffers[k] = t
        o_mask, o_score, o_block = (ir.rename_buffers(e, renames) for e in (other.mask, other.score, other.block))
        if how == "and":
            score = ir.substitute(o_score, lambda n: self.score if n is IDENTITY_SCORE else None)
        else:
            if self.has_score_mod and o_score is not IDENTITY_SCORE and o_score is not self.score:
                raise PatternError("cannot | two patterns with different score mods")
            score = self.score if self.has_score_mod else o_score
        if self.has_block_mask and other.has_block_mask and self.block_size != other.block_size:
            raise PatternError(f"cannot combine block predicates of block sizes {self.block_size} "
                               f"and {other.block_size}")
        block_size = self.block_size if self.has_block_mask else other.block_size
        if how == "or" and (self.has_block_mask or other.has_block_mask):
            # (m1 and blk1) or (m2 and blk2) is not (m1 or m2) and (blk1 or blk2): fold each side's
            # block predicate into its mask; the union of the predicates stays as a sound block filter.
            mask = ir.op("or", ir.op("and", self.mask, block_at_tokens(self.block, self.block_size)),
                         ir.op("and", o_mask, block_at_tokens(o_block, other.block_size)))
        else:
            mask = ir.op(how, self.mask, o_mask)
        block = ir.op(how, self.block, o_block)
        name = f"{self.name} {'&' if how == 'and' else '|'} {other.name}" if self.name and other.name else None
        if self.layout is not None and other.layout is not None and self.layout != other.layout:
            raise PatternError(f"cannot combine patterns in different layouts ({self.layout!r} and "
                               f"{other.layout!r}); pick one with .with_layout()")
        return Pattern.from_ir(mask, score, block, params, buffers, name, block_size, self.layout or other.layout)

    # -- value semantics
    def _key(self):
        return (self.mask, self.score, self.block, self.block_size if self.has_block_mask else None,
                params_key(self.params),
                tuple((k, None if t is None else (tuple(t.shape), t.dtype)) for k, t in self.buffers.items()))

    def __eq__(self, other) -> bool:
        if not isinstance(other, Pattern):
            return NotImplemented
        return self._key() == other._key() and all(
            _same_tensor(t, other.buffers[k]) for k, t in self.buffers.items())

    def __hash__(self) -> int:
        return hash(self._key())

    def __reduce__(self):
        return (Pattern.from_ir, (self.mask, self.score, self.block, self.params, self.buffers,
                                  self.name, self.block_size, self.layout))

    def __str__(self) -> str:
        lines = [f"# {' '.join(self.name.splitlines())}"] if self.name else []  # one comment line
        lines += [f"param {k} = {ir.format_const(v)}" for k, v in self.params.items()]
        lines += [f"buffer {k}" for k in self.buffers]
        if self.mask is not ir.TRUE or not self.has_score_mod:
            lines.append(f"mask = {self.mask}")
        if self.has_score_mod:
            lines.append(f"score = {self.score}")
        if self.has_block_mask:
            bq, bk = self.block_size
            lines.append(f"block_size = {bq}" if bq == bk else f"block_size = {bq}, {bk}")
            lines.append(f"block = {self.block}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        body = "; ".join(line for line in str(self).splitlines() if not line.startswith("#"))
        layout = f"; in {self.layout!r}" if self.layout is not None else ""
        return f"Pattern({self.name + ': ' if self.name else ''}{body}{layout})"


def _name_of(fn) -> str | None:
    name = getattr(fn, "__name__", None)
    return None if name == "<lambda>" else name


def block_at_tokens(block: ir.Node, block_size: tuple[int, int]) -> ir.Node:
    """A block predicate read at token level: `block` with qb := q // BQ, kb := kv // BK."""
    bq, bk = block_size
    qb, kb = ir.op("floordiv", ir.Var("q"), ir.const(bq)), ir.op("floordiv", ir.Var("kv"), ir.const(bk))
    return ir.substitute(block, lambda n: qb if n is ir.Var("qb") else kb if n is ir.Var("kb") else None)


def _fresh(name: str, taken: set) -> str:
    """`name` with the smallest numeric suffix not in `taken`."""
    i = 1
    while f"{name}{i}" in taken:
        i += 1
    return f"{name}{i}"


def _check_expr(node: ir.Node, allowed_vars: tuple, what: str, kinds: tuple) -> None:
    if not isinstance(node, ir.Node):
        raise PatternError(f"{what} must be an IR node, got {type(node).__name__}")
    extra = ir.free_vars(node) - set(allowed_vars)
    if extra:
        raise PatternError(f"{what} may use only {', '.join(allowed_vars)}; it uses {', '.join(sorted(extra))}")
    if ir.kind_of(node) not in kinds:
        raise PatternError(f"{what} must be {' or '.join(k for k in kinds if k != 'any')}, "
                           f"got a {ir.kind_of(node)} expression: {node}")


def block_pair(bs) -> tuple[int, int]:
    """(rows, cols) from a block size given as an int or a pair; PatternError (a ValueError) if bad."""
    pair = (bs, bs) if isinstance(bs, int) else tuple(bs) if isinstance(bs, (tuple, list)) else ()
    if len(pair) != 2 or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in pair):
        raise PatternError(f"block_size must be a positive int or a pair of them, got {bs!r}")
    return pair


def _coerce_param(name: str, kind: str, value) -> ir.Value:
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        value = value.item()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = python_number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PatternError(f"param {name!r} needs a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise PatternError(f"param {name!r} must be finite, got {value!r}")
    if kind == "int":
        if isinstance(value, float):
            if not value.is_integer():
                raise PatternError(f"param {name!r} is an integer param; got {value!r}")
            value = int(value)
        if not -2 ** 63 <= value < 2 ** 63:  # the kernels take int params as int64
            raise PatternError(f"int param {name!r} must fit int64, got {value}")
        return value
    return float(value)


def _check_buffer(name: str, t) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise PatternError(f"buffer {name!r} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in BUFFER_DTYPES:
        raise PatternError(f"buffer {name!r} has unsupported dtype {t.dtype}")
    if t.dim() == 0 or t.numel() == 0:
        raise PatternError(f"buffer {name!r} must have at least one dimension and one element")


def params_key(params: dict) -> tuple:
    """Param values as a hashable key that tells apart what compares equal but computes differently:
    0.0 and -0.0 (1 / W), 1 and 1.0 (the kernel's integer or float arithmetic)."""
    return tuple((k, type(v), repr(v) if isinstance(v, float) else v) for k, v in params.items())


def _same_tensor(a, b) -> bool:
    if a is b:
        return True
    if a is None or b is None:
        return False
    return (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and bool(torch.equal(a, b)))

