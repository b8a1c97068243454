"""Trace FlexAttention-style Python functions into the IR.

The user's `mask_mod(b, h, q_idx, kv_idx)` / `score_mod(score, b, h, q_idx, kv_idx)` is called
once with `Proxy` objects. Python operators and torch functions on proxies (through
`__torch_function__`) build IR nodes; indexing a captured tensor with a proxy registers the tensor
as a named buffer. Anything that would need a concrete value raises `PatternError` pointing at the
user's line.
"""
from __future__ import annotations

import inspect
import numbers
import os
import sys
import threading
from typing import Any, Callable

import torch

from . import ir, ops


class PatternError(ValueError):
    """A pattern that cannot be traced, type-checked or safely compiled."""


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Frames in these directories are attncc's machinery, not pattern code (the catalogue counts as
# pattern code, so its tensors get their own names).
_INTERNAL_DIRS = tuple(os.path.join(_PACKAGE_DIR, d) for d in ("dsl", "compiler", "runtime")) + (
    os.path.dirname(os.path.abspath(torch.__file__)),)


def _user_frame():
    frame = sys._getframe(2)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL_DIRS):
        frame = frame.f_back
    return frame


def _traceback_location(tb) -> str:
    """`file:line` of the innermost traceback entry outside attncc's machinery and torch."""
    where = "<unknown>"
    while tb is not None:
        if not os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_INTERNAL_DIRS):
            where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return where


def user_location() -> str:
    """`file:line` of the innermost stack frame outside attncc's machinery and torch."""
    frame = _user_frame()
    return f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame else "<unknown>"


def _fail(what: str) -> PatternError:
    return PatternError(f"{what} (at {user_location()})")


class Tracer:
    """Collects buffers (captured tensors) and params met while tracing one pattern."""

    def __init__(self, reserved: dict[str, torch.Tensor] | None = None):
        self.buffers: dict[str, torch.Tensor] = dict(reserved or {})
        self.params: dict[str, ir.Value] = {}
        self.scalar_views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (0-dim x, x.view(1))

    def buffer_name(self, tensor: torch.Tensor, hint: str | None) -> str:
        for name, t in self.buffers.items():
            if t is tensor:
                return name
        base = hint if hint and hint.isidentifier() and hint.isascii() and hint not in RESERVED_NAMES else "buf"
        name, i = base, 0
        while name in self.buffers or name in RESERVED_NAMES:
            i += 1
            name = f"{base}{i}"
        self.buffers[name] = tensor
        return name

    def add_params(self, params: dict[str, ir.Value]) -> None:
        _merge_params(self.params, params)


RESERVED_NAMES = set(ir.ALL_VARS) | {"q_idx", "kv_idx", "true", "false", "inf", "param", "buffer",
                                "mask", "score", "block", "and", "or", "not", "clamp"} | set(ops.FUNCTIONS)


class Proxy:
    """Stands in for a tensor of indices or scores while a mod is traced."""

    __slots__ = ("node", "tracer", "params")

    def __init__(self, node: ir.Node, tracer: Tracer | None, params: dict | None = None):
        self.node = node
        self.tracer = tracer
        self.params = params or {}

    # -- building
    def __add__(self, o): return _apply("add", self, o)
    def __radd__(self, o): return _apply("add", o, self)
    def __sub__(self, o): return _apply("sub", self, o)
    def __rsub__(self, o): return _apply("sub", o, self)
    def __mul__(self, o): return _apply("mul", self, o)
    def __rmul__(self, o): return _apply("mul", o, self)
    def __truediv__(self, o): return _apply("truediv", self, o)
    def __rtruediv__(self, o): return _apply("truediv", o, self)
    def __floordiv__(self, o): return _apply("floordiv", self, o)
    def __rfloordiv__(self, o): return _apply("floordiv", o, self)
    def __mod__(self, o): return _apply("mod", self, o)
    def __rmod__(self, o): return _apply("mod", o, self)
    def __pow__(self, o): return _apply("pow", self, o)
    def __rpow__(self, o): return _apply("pow", o, self)
    def __neg__(self): return _apply("neg", self)
    def __pos__(self): return self
    def __abs__(self): return _apply("abs", self)
    def __eq__(self, o): return _apply("eq", self, o)  # type: ignore[override]
    def __ne__(self, o): return _apply("ne", self, o)  # type: ignore[override]
    def __lt__(self, o): return _apply("lt", self, o)
    def __le__(self, o): return _apply("le", self, o)
    def __gt__(self, o): return _apply("gt", self, o)
    def __ge__(self, o): return _apply("ge", self, o)
    def __and__(self, o): return _apply("and", self, o)
    def __rand__(self, o): return _apply("and", o, self)
    def __or__(self, o): return _apply("or", self, o)
    def __ror__(self, o): return _apply("or", o, self)
    def __xor__(self, o): return _apply("xor", self, o)
    def __rxor__(self, o): return _apply("xor", o, self)
    def __invert__(self): return _apply("not", self)
    __hash__ = object.__hash__

    # -- method-style torch calls: q_idx.abs(), score.tanh(), x.clamp(min=..)
    def abs(self): return _apply("abs", self)
    def exp(self): return _apply("exp", self)
    def exp2(self): return _apply("exp2", self)
    def log(self): return _apply("log", self)
    def log2(self): return _apply("log2", self)
    def sqrt(self): return _apply("sqrt", self)
    def tanh(self): return _apply("tanh", self)
    def sigmoid(self): return _apply("sigmoid", self)
    def logical_not(self): return _apply("not", self)
    def logical_and(self, o): return _apply("and", self, o)
    def logical_or(self, o): return _apply("or", self, o)
    def remainder(self, o): return _apply("mod", self, o)
    def minimum(self, o): return _apply("min", self, o)
    def maximum(self, o): return _apply("max", self, o)

    def clamp(self, min=None, max=None):
        return _clamp(self, min, max)

    # -- 0-dim constants, as torch's and_masks / or_masks / noop_mask make them: b.new_ones(())
    def new_ones(self, *size, dtype=None, **_):
        return _new_scalar(size, 1, dtype)

    def new_zeros(self, *size, dtype=None, **_):
        return _new_scalar(size, 0, dtype)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def floor(self): return _apply("floor", self)
    def ceil(self): return _apply("ceil", self)
    def round(self): return _apply("round", self)
    def trunc(self): return _trunc(self)

    def float(self):
        return _as_float(self)

    def long(self):
        return _as_int(self)

    def int(self):
        return _as_int(self)

    def bool(self):
        return self if ir.kind_of(self.node) == "bool" else _apply("ne", self, 0)

    def to(self, *args, **kwargs):
        dtype = kwargs.get("dtype", args[0] if args else None)
        if dtype in (torch.float16, torch.bfloat16):  # refused rather than computed unrounded
            raise _fail(f".to({dtype}) in a pattern would be computed in float32 / float64 without its "
                        "16-bit rounding; use .float() (or compute the rounding yourself)")
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return _as_float(self)
        if dtype == torch.bool:
            return self.bool()
        if isinstance(dtype, torch.dtype) and dtype in (torch.int32, torch.int64):
            return _as_int(self)
        raise _fail(f"cannot trace .to({dtype!r}) on a traced value")

    # -- what cannot be traced
    def __bool__(self):
        if _in_builtin_minmax():
            raise _fail("Python's builtin min()/max() compares traced values with a concrete bool; "
                        "use torch.minimum / torch.maximum (or torch.min(a, b) / torch.max(a, b)) instead")
        raise _fail("a traced value was used where Python needs a concrete bool (an `if`, `and`, "
                    "`or`, `not` or a chained comparison); use torch.where, &, | and ~ instead")

    def __index__(self):
        raise _fail("a traced value was used as a Python integer (e.g. a list index or range())")

    def __int__(self):
        raise _fail("int() of a traced value is data-dependent and cannot be traced")

    def __float__(self):
        raise _fail("float() of a traced value is data-dependent and cannot be traced")

    def item(self):
        raise _fail(".item() reads a concrete value and cannot be traced")

    def __getattr__(self, name):
        raise _fail(f"attribute or method .{name} is not supported on a traced value")

    def __iter__(self):
        raise _fail("a traced value cannot be iterated")

    def __getitem__(self, index):
        raise _fail("a traced index/score value cannot be indexed")

    def __repr__(self):
        return f"Proxy({ir.to_text(self.node)})"

    # -- torch functions
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__:
            return _buffer_load(args[0], args[1])
        handler = _TORCH_HANDLERS.get(func)
        name = getattr(func, "__name__", repr(func))
        if handler is None:
            raise _fail(f"torch function {name} is not supported in patterns")
        try:
            return handler(*args, **kwargs)
        except TypeError as e:  # wrong arity or an unsupported keyword (e.g. torch.add(alpha=))
            raise _fail(f"torch function {name} called with unsupported arguments ({e})") from None


def _lift(x: Any) -> ir.Node:
    if isinstance(x, Proxy):
        return x.node
    if isinstance(x, (bool, int, float)):
        return ir.const(x)
    if isinstance(x, numbers.Real):  # numpy scalars, e.g. a length from np.cumsum
        return ir.const(python_number(x))
    if isinstance(x, torch.Tensor):
        if x.dim() == 0 and x.requires_grad:
            return _learnable_scalar(x)
        if x.dim() == 0:
            v = x.item()
            return ir.const(bool(v) if x.dtype == torch.bool else v)
        raise _fail(f"a captured tensor of shape {tuple(x.shape)} was used in arithmetic; index it "
                    "with the traced indices (e.g. buf[q_idx]) to read one element")
    raise _fail(f"cannot use a value of type {type(x).__name__} in a pattern")


def _learnable_scalar(x: torch.Tensor) -> ir.Node:
    """A 0-dim tensor that requires grad (a learnable temperature, or `w[0]` of a learnable `w`),
    read as element 0 of a one-element buffer viewing it, so its gradient flows back to it; a
    constant (what other 0-dim tensors become) would silently get none."""
    active = _active()
    if not active:
        raise _fail("a 0-dim tensor that requires grad can only be used inside a traced mask_mod/score_mod")
    tracer = active[-1]
    if id(x) not in tracer.scalar_views:  # x kept alive with its view, so its id stays its own
        tracer.scalar_views[id(x)] = (x, x.view(1))
    return ir.load(tracer.buffer_name(tracer.scalar_views[id(x)][1], _guess_name(x)), (ir.const(0),))


def python_number(x: numbers.Real) -> int | float:
    """A numpy (or other) real scalar as a Python int or float."""
    return int(x) if isinstance(x, numbers.Integral) else float(x)


def _context(args) -> tuple[Tracer | None, dict]:
    tracer, params = None, {}
    for a in args:
        if isinstance(a, Proxy):
            tracer = tracer or a.tracer
            _merge_params(params, a.params)
    return tracer, params


def _merge_params(into: dict[str, ir.Value], params: dict[str, ir.Value]) -> None:
    """Add `params` to `into`; a name already there with another default (or type) is an error."""
    for name, value in params.items():
        old = into.setdefault(name, value)
        if old != value or type(old) is not type(value):
            raise _fail(f"param {name!r} declared twice with different defaults {old!r} and {value!r}")


# torch keeps bool tensors combined with each other bool: + and maximum are `or`, * and minimum `and`;
# ops.NOT_ON_BOOLS refuse them. A bool met with a number reads as 0/1.
_BOOL_ALGEBRA = {"add": "or", "max": "or", "mul": "and", "min": "and"}


def _apply(name: str, *args: Any) -> Proxy:
    tracer, params = _context(args)
    nodes = [_lift(a) for a in args]
    if (name in _BOOL_ALGEBRA or name in ops.NOT_ON_BOOLS) and all(_is_bool(n, tracer) for n in nodes):
        if name in ops.NOT_ON_BOOLS:
            raise _fail(f"'{ops.TABLE[name].spelling}' on booleans is not supported (torch refuses it too); "
                        "convert them first, e.g. with .long()")
        name = _BOOL_ALGEBRA[name]
    elif name in ops.TABLE and ops.TABLE[name].operands == "number":
        nodes = [_bool_as_int(n) for n in nodes]
    if name in ("and", "or", "not", "xor"):
        if any(ir.kind_of(n) in ("int", "float") or (isinstance(n, ir.Load) and not _is_bool(n, tracer))
               for n in nodes):
            raise _fail("bitwise &, |, ^, ~ on integers is not supported; they mean and/or/xor/not on masks")
        name = "ne" if name == "xor" else name
    if name == "where":
        nodes = [nodes[0]] + ([_bool_as_int(n) for n in nodes[1:]]
                              if any(ir.kind_of(n) in ("int", "float") for n in nodes[1:]) else nodes[1:])
    try:
        return Proxy(ir.op(name, *nodes), tracer, params)
    except ir.IRError as e:
        raise _fail(str(e)) from None


def _is_bool(n: ir.Node, tracer: Tracer | None) -> bool:
    """Whether n is a boolean as torch sees it: a mask expression or constant, or a read of a bool buffer."""
    if isinstance(n, ir.Load) and tracer is not None and n.buffer in tracer.buffers:
        return tracer.buffers[n.buffer].dtype == torch.bool
    return ir.kind_of(n) == "bool"


def _bool_as_int(n: ir.Node) -> ir.Node:
    return ir.where_01(n) if ir.kind_of(n) == "bool" else n


def _as_float(x: Proxy) -> Proxy:
    return x if ir.kind_of(x.node) == "float" else _apply("mul", x, 1.0)


def _as_int(x: Proxy) -> Proxy:
    """`.long()` / `.int()` / `.to(torch.int64)`: booleans as 0/1, floats truncated towards zero; a
    buffer read, whose dtype the IR leaves open, keeps the conversion (`int(buf[i])`): a bool
    buffer's `buf[q].long() + buf[kv].long()` is 2 where both are set, its `buf[q] + buf[kv]` True."""
    kind = ir.kind_of(x.node)
    if kind in ("float", "any"):
        return _apply("int", x)
    return Proxy(_bool_as_int(x.node), x.tracer, x.params) if kind == "bool" else x


def _trunc(x) -> Proxy:
    """torch.trunc: towards zero, staying a float."""
    return _apply("where", _apply("ge", x, 0), _apply("floor", x), _apply("ceil", x))


def _in_builtin_minmax() -> bool:
    """Whether the user's frame is calling Python's builtin min or max (which then asks a traced
    comparison for a concrete bool): its current line calls min( or max( and it is in a call."""
    import dis
    import linecache
    import re

    frame = _user_frame()
    if frame is None:
        return False
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
    instr = next((i for i in dis.get_instructions(frame.f_code) if i.offset == frame.f_lasti), None)
    return bool(re.search(r"(?<![.\w])(min|max)\s*\(", line)) and instr is not None and instr.opname.startswith("CALL")


def _clamp(x, min=None, max=None):  # torch's keyword names
    lo, hi = min, max
    if lo is not None:
        x = _apply("max", x, lo)
    if hi is not None:
        x = _apply("min", x, hi)
    return x


def _new_scalar(size: tuple, value: int, dtype) -> Proxy:
    if len(size) == 1 and isinstance(size[0], (tuple, list)):
        size = tuple(size[0])
    if size:
        raise _fail(f"only 0-dim new_ones/new_zeros can be traced, got size {size}")
    v = bool(value) if dtype == torch.bool else float(value) if dtype is not None and dtype.is_floating_point else value
    return Proxy(ir.const(v), None)


def _div(a, b, rounding_mode=None):
    if rounding_mode is None:
        return _apply("truediv", a, b)
    if rounding_mode == "floor":
        return _apply("floordiv", a, b)
    raise _fail(f"torch.div(rounding_mode={rounding_mode!r}) is not supported; use 'floor' or //")


def _minmax(name):
    def f(a, b=None, *rest, **kw):
        if b is None or rest or kw or not isinstance(b, (Proxy, int, float, torch.Tensor)):
            raise _fail(f"torch.{name} is supported only with two tensor arguments (elementwise)")
        return _apply(name, a, b)
    return f


def _like(value):
    def f(x, *args, dtype=None, **_):
        v = value if value is not None else (args[0] if args else None)
        if v is None or isinstance(v, Proxy):
            raise _fail("torch.full_like needs a constant fill value in a pattern")
        kind = ir.kind_of(_lift(x)) if dtype is None else (
            "bool" if dtype == torch.bool else "float" if dtype.is_floating_point else "int")
        return Proxy(ir.const(bool(v) if kind == "bool" else float(v) if kind == "float" else int(v)), None)
    return f


def _where(cond, a=None, b=None):
    if a is None or b is None:
        raise _fail("torch.where needs three arguments in a pattern")
    return _apply("where", cond, a, b)


def _unary(name):
    return lambda x: _apply(name, x)


def _binary(name):
    return lambda x, y: _apply(name, x, y)


_TORCH_HANDLERS: dict = {
    torch.where: _where,
    torch.abs: _unary("abs"), torch.Tensor.abs: _unary("abs"),
    torch.clamp: _clamp, torch.clip: _clamp, torch.Tensor.clamp: _clamp,
    torch.minimum: _binary("min"), torch.maximum: _binary("max"),
    torch.min: _minmax("min"), torch.max: _minmax("max"),
    torch.logical_and: _binary("and"), torch.logical_or: _binary("or"),
    torch.logical_not: _unary("not"), torch.bitwise_not: _unary("not"),
    torch.remainder: _binary("mod"), torch.fmod: None,
    torch.floor_divide: _binary("floordiv"), torch.div: _div, torch.true_divide: _binary("truediv"),
    torch.add: _binary("add"), torch.sub: _binary("sub"), torch.mul: _binary("mul"),
    torch.neg: _unary("neg"), torch.pow: _binary("pow"),
    torch.eq: _binary("eq"), torch.ne: _binary("ne"), torch.lt: _binary("lt"),
    torch.le: _binary("le"), torch.gt: _binary("gt"), torch.ge: _binary("ge"),
    torch.sigmoid: _unary("sigmoid"), torch.special.expit: _unary("sigmoid"),
    torch.floor: _unary("floor"), torch.ceil: _unary("ceil"), torch.round: _unary("round"), torch.trunc: _trunc,
    torch.Tensor.floor: _unary("floor"), torch.Tensor.ceil: _unary("ceil"), torch.Tensor.round: _unary("round"),
    torch.full_like: _like(None), torch.zeros_like: _like(0), torch.ones_like: _like(1),
    torch.special.exp2: _unary("exp2"),
    **{getattr(torch, f): _unary(f) for f in ir.FLOAT_FUNCS},
}
# Tensor dunder methods reached when a real (0-dim) tensor is on the left of an operator.
for _name, _op in [("add", "add"), ("radd", "add"), ("sub", "sub"), ("mul", "mul"), ("rmul", "mul"),
                   ("truediv", "truediv"), ("floordiv", "floordiv"), ("mod", "mod"), ("pow", "pow"),
                   ("eq", "eq"), ("ne", "ne"), ("lt", "lt"), ("le", "le"), ("gt", "gt"), ("ge", "ge"),
                   ("and", "and"), ("or", "or"), ("xor", "xor")]:
    _method = getattr(torch.Tensor, f"__{_name}__")
    if _name.startswith("r"):
        _TORCH_HANDLERS[_method] = (lambda o: lambda s, x: _apply(o, x, s))(_op)
    else:
        _TORCH_HANDLERS[_method] = (lambda o: lambda s, x: _apply(o, s, x))(_op)
# Tensor methods reached from those operators with a real 0-dim tensor on the left (`t + q_idx`).
for _name, _op in [("add", "add"), ("sub", "sub"), ("mul", "mul"), ("true_divide", "truediv"),
                   ("floor_divide", "floordiv"), ("remainder", "mod"), ("pow", "pow"), ("eq", "eq"),
                   ("ne", "ne"), ("lt", "lt"), ("le", "le"), ("gt", "gt"), ("ge", "ge"),
                   ("minimum", "min"), ("maximum", "max"), ("logical_and", "and"), ("logical_or", "or")]:
    _TORCH_HANDLERS[getattr(torch.Tensor, _name)] = _binary(_op)
_TORCH_HANDLERS[torch.Tensor.div] = _div
_TORCH_HANDLERS = {k: v for k, v in _TORCH_HANDLERS.items() if v is not None}


def _buffer_load(tensor: Any, index: Any) -> Proxy:
    if not isinstance(tensor, torch.Tensor):
        raise _fail("only captured tensors can be indexed with traced values")
    items = index if isinstance(index, tuple) else (index,)
    if len(items) != tensor.dim():
        raise _fail(f"a captured tensor of {tensor.dim()} dims was indexed with {len(items)} "
                    "indices; patterns read single elements (one index per dim)")
    for i in items:
        if not isinstance(i, (Proxy, int)) or isinstance(i, bool):
            raise _fail(f"unsupported index {i!r} into a captured tensor (slices, lists and tensors "
                        "are not supported; use traced indices or ints)")
    tracer, params = _context(items)
    active = _active()
    tracer = tracer or (active[-1] if active else None)  # indices may be params only: slopes[P]
    if tracer is None:
        raise _fail("captured tensors must be indexed inside a traced mask_mod/score_mod")
    if tensor.dtype not in BUFFER_DTYPES:
        raise _fail(f"captured tensor dtype {tensor.dtype} is not supported; use bool, an integer or a float dtype")
    name = tracer.buffer_name(tensor, _guess_name(tensor))
    nodes = tuple(_lift(i) for i in items)
    try:
        return Proxy(ir.load(name, nodes), tracer, params)
    except ir.IRError as e:
        raise _fail(str(e)) from None


_LOCAL = threading.local()  # .tracers: the tracers of the mods this thread is tracing (innermost last)


def _active() -> list[Tracer]:
    if not hasattr(_LOCAL, "tracers"):
        _LOCAL.tracers = []
    return _LOCAL.tracers


BUFFER_DTYPES = (torch.bool, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
                  torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _guess_name(tensor: torch.Tensor) -> str | None:
    """The variable name the user's code knows this tensor by, for readable IR."""
    frame = _user_frame()
    for scope in ((frame.f_locals, frame.f_globals) if frame else ()):
        for k, v in scope.items():
            if v is tensor and not k.startswith("_"):
                return k
    return None


def param(name: str, default: ir.Value) -> Proxy:
    """A named runtime scalar for traced mods: `W = ac.param("W", 1024)`; `q - kv < W`.

    Its value can be changed with `Pattern.bind(W=...)` without recompiling any kernel.
    """
    if not (isinstance(name, str) and name.isidentifier() and name.isascii()) or name in RESERVED_NAMES:
        raise PatternError(f"invalid param name {name!r} (an ASCII identifier, not a reserved name, as the DSL "
                           "prints it)")
    if isinstance(default, numbers.Real) and not isinstance(default, bool):
        default = python_number(default)
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        raise PatternError(f"param {name!r} needs an int or float default, got {default!r}")
    kind = "int" if isinstance(default, int) else "float"
    return Proxy(ir.Param(name, kind), None, {name: default})


def trace(fn: Callable, var_names: tuple[str, ...], tracer: Tracer, what: str) -> ir.Node:
    """Call `fn` with one proxy per name in `var_names` and return the IR it builds."""
    if not callable(fn):
        raise PatternError(f"{what} must be callable, got {type(fn).__name__}")
    proxies = [Proxy(ir.Var(v), tracer) for v in var_names]
    try:
        inspect.signature(fn).bind(*proxies)
    except TypeError as e:
        code = getattr(fn, "__code__", None)
        where = f" (at {code.co_filename}:{code.co_firstlineno})" if code else ""
        raise PatternError(f"{what} must take {len(var_names)} arguments ({', '.join(var_names)}); "
                           f"{getattr(fn, '__name__', fn)!r} cannot: {e}{where}") from None
    except ValueError:  # no signature (some builtins): let the call decide
        pass
    _active().append(tracer)
    try:
        out = fn(*proxies)
    except TypeError as e:  # e.g. torch.maximum(q_idx): torch rejects the arity before dispatch
        raise PatternError(f"{what} cannot be traced: {e} (at {_traceback_location(e.__traceback__)})") from None
    finally:
        _active().pop()
    if isinstance(out, Proxy):
        tracer.add_params(out.params)
        return out.node
    if isinstance(out, (bool, int, float)) or (isinstance(out, torch.Tensor) and out.dim() == 0):
        return _lift(out)
    raise PatternError(f"{what} returned {type(out).__name__}; expected an expression of its arguments")

