"""A CPU model of the slice of CUTLASS's CuTe DSL the generated FlashAttention-4 hooks use, to run
them with plain Python numbers in tests (the GPU tests run the real DSL).

It models the DSL's documented semantics and is strict where the printer must not rely on
anything: integer `%` truncates (arith.remsi, the DSL's choice on dynamic values), `//` floors on
integers (arith.floordivsi) and is refused on floats, `/` is refused on integers, integers that
leave their width raise instead of wrapping, float32 results are rounded to float32, and only
Booleans have a truth value (a ternary on anything else raises).
"""
from __future__ import annotations

import math
import sys
import types
from contextlib import contextmanager

import numpy as np
import torch

_WIDTH = {"i1": 1, "u8": 8, "i8": 8, "i16": 16, "i32": 32, "i64": 64}
_FLOAT_RANK = {"f16": 16, "bf16": 16, "f32": 32, "f64": 64}


class Num:
    """A scalar of a DSL type T ('i1' Boolean, 'u8', 'i32', 'i64', 'f32', 'f64')."""

    def __init__(self, v, T: str):
        if T == "i1":
            v = bool(v)
        elif T in _WIDTH:
            v = int(v)
            lo, hi = (0, 255) if T == "u8" else (-2 ** (_WIDTH[T] - 1), 2 ** (_WIDTH[T] - 1) - 1)
            if not lo <= v <= hi:
                raise OverflowError(f"{v} does not fit {T}")
        elif T == "f32":
            v = float(np.float32(v))
        elif T in ("f16", "bf16"):
            v = float(torch.tensor(v, dtype=torch.float16 if T == "f16" else torch.bfloat16))
        else:
            v = float(v)
        self.v, self.T = v, T

    @property
    def is_float(self) -> bool:
        return self.T in _FLOAT_RANK

    def to(self, dtype):
        T = dtype.T
        if self.is_float and T in _WIDTH and T != "i1":
            if not math.isfinite(self.v):
                raise ValueError("float -> int of a non-finite value")
            return Num(math.trunc(self.v), T)
        if self.T == "u8" and T != "u8":  # as CuTe-DSL 4.8.1 converted on the H100: signed (200 -> -56)
            return Num(self.v - 256 if self.v >= 128 else self.v, T)
        return Num(self.v, T)

    def __bool__(self):
        if self.T != "i1":
            raise TypeError(f"truth value of a {self.T} (only Booleans are conditions)")
        return self.v

    # -- arithmetic with the DSL's promotion
    def _pair(self, other):
        other = other if isinstance(other, Num) else as_numeric(other)
        a, b = self, other
        if a.is_float or b.is_float:
            T = max((x.T for x in (a, b) if x.is_float), key=_FLOAT_RANK.get)
        elif a.T == b.T:
            T = a.T
        else:
            T = max(a.T, b.T, key=_WIDTH.get)
        return Num(a.v, T), Num(b.v, T), T

    def _arith(self, other, f, flip=False):
        a, b, T = self._pair(other)
        if flip:
            a, b = b, a
        if T == "i1":
            raise TypeError("arithmetic on Booleans")
        return Num(f(a.v, b.v), T)

    def __add__(self, o): return self._arith(o, lambda x, y: x + y)
    def __radd__(self, o): return self._arith(o, lambda x, y: x + y, True)
    def __sub__(self, o): return self._arith(o, lambda x, y: x - y)
    def __rsub__(self, o): return self._arith(o, lambda x, y: x - y, True)
    def __mul__(self, o): return self._arith(o, lambda x, y: x * y)
    def __rmul__(self, o): return self._arith(o, lambda x, y: x * y, True)

    def __truediv__(self, o):
        a, b, T = self._pair(o)
        if T not in _FLOAT_RANK:
            raise TypeError("integer / integer (the printer must cast to float first)")
        return Num(_fdiv(a.v, b.v), T)

    def __rtruediv__(self, o):
        return as_numeric(o).__truediv__(self)

    def __floordiv__(self, o):
        a, b, T = self._pair(o)
        if T in _FLOAT_RANK:
            raise TypeError("float // (the printer uses floordiv_f)")
        return Num(a.v // b.v, T)

    def __mod__(self, o):
        a, b, T = self._pair(o)
        if T in _FLOAT_RANK:
            raise TypeError("float % (the printer uses floormod_f)")
        r = abs(a.v) % abs(b.v)
        return Num(r if a.v >= 0 else -r, T)  # truncating, like arith.remsi

    def __neg__(self):
        if self.T == "i1":
            raise TypeError("negating a Boolean")
        return Num(-self.v, self.T)

    def __invert__(self):
        if self.T != "i1":
            raise TypeError("~ on a non-Boolean")
        return Num(not self.v, "i1")

    def _logic(self, o, f):
        if self.T != "i1" or o.T != "i1":
            raise TypeError("& / | on non-Booleans")
        return Num(f(self.v, o.v), "i1")

    def __and__(self, o):
        if self.T == o.T == "i32":  # bitwise, as the hooks mask a widened Uint8 (compiler/cute.py)
            return Num(self.v & o.v, "i32")
        return self._logic(o, lambda x, y: x and y)
    def __or__(self, o): return self._logic(o, lambda x, y: x or y)

    def _cmp(self, o, f):
        a, b, _ = self._pair(o) if not (self.T == "i1" and getattr(o, "T", None) == "i1") else (self, o, "i1")
        return Num(f(a.v, b.v), "i1")

    def __lt__(self, o): return self._cmp(o, lambda x, y: x < y)
    def __le__(self, o): return self._cmp(o, lambda x, y: x <= y)
    def __gt__(self, o): return self._cmp(o, lambda x, y: x > y)
    def __ge__(self, o): return self._cmp(o, lambda x, y: x >= y)
    def __eq__(self, o): return self._cmp(o, lambda x, y: x == y)  # noqa: E704
    def __ne__(self, o): return self._cmp(o, lambda x, y: x != y)  # noqa: E704
    __hash__ = None


def _fdiv(x: float, y: float) -> float:
    if y == 0.0:
        return math.nan if x == 0.0 or x != x else math.copysign(math.inf, x) * math.copysign(1.0, y)
    return x / y


def as_numeric(v) -> Num:
    if isinstance(v, Num):
        return v
    if isinstance(v, bool):
        return Num(v, "i1")
    return Num(v, "i32") if isinstance(v, int) else Num(v, "f32")


class _Type:
    def __init__(self, T: str):
        self.T = T

    def __call__(self, v):
        return v.to(self) if isinstance(v, Num) else Num(v, self.T)

    def __eq__(self, other):
        return isinstance(other, _Type) and other.T == self.T

    __hash__ = object.__hash__


class SSA(list):
    """A TensorSSA: lanes with a dtype."""

    def __init__(self, values, dtype):
        super().__init__(dtype(v) for v in values)
        self.dtype, self.shape = dtype, (len(self),)

    def to(self, dtype):
        return SSA(self, dtype)


class _Frag(list):
    def __init__(self, shape, dtype):
        n = shape if isinstance(shape, int) else shape[0]
        super().__init__([None] * n)
        self.dtype, self.shape = dtype, (n,)

    def __setitem__(self, i, v):
        super().__setitem__(i, self.dtype(v))

    def store(self, ssa):
        for i, v in enumerate(ssa):
            self[i] = v

    def load(self):
        return SSA(self, self.dtype)


_MEMORY: dict[int, torch.Tensor] = {}  # kept for the whole run: no address is reused by another tensor


def address_of(t: torch.Tensor) -> Num:
    """What fa4.prepare passes for a buffer's address (`fa.address`): the contiguous tensor is
    remembered, so a pointer made from the address reads it, bounds-checked."""
    assert t.is_contiguous()
    _MEMORY[t.data_ptr()] = t
    return Num(t.data_ptr(), "i64")


class Pointer:
    """A global-memory pointer from make_ptr: an address the shim knows (address_of) plus an
    element offset; `load` reads that element, raising IndexError outside the tensor."""

    def __init__(self, dtype, base: torch.Tensor, offset: int = 0):
        self.dtype, self.base, self.offset = dtype, base, offset

    def __add__(self, off):
        if not isinstance(off, Num) or off.T != "i32":
            raise TypeError(f"pointer offset of type {getattr(off, 'T', type(off).__name__)}")
        return Pointer(self.dtype, self.base, self.offset + off.v)

    def load(self):
        flat = self.base.reshape(-1)
        if not 0 <= self.offset < flat.numel():
            raise IndexError(f"read element {self.offset} of a buffer of {flat.numel()}")
        return Num(flat[self.offset].item(), self.dtype.T)


def make_ptr(dtype, value, mem_space, assumed_align=None):
    if value.T != "i64" or mem_space != "gmem":
        raise TypeError("the hooks make Int64 global-memory pointers only")
    base = _MEMORY.get(value.v)
    if base is None:
        raise LookupError(f"no buffer at address {value.v:#x}")
    if assumed_align != base.element_size() or _POINTEE_T[str(base.dtype)] != dtype.T:
        raise TypeError(f"a {dtype.T} pointer aligned {assumed_align} to a {base.dtype} buffer")
    return Pointer(dtype, base)


_POINTEE_T = {"torch.uint8": "u8", "torch.int8": "i8", "torch.int16": "i16", "torch.int32": "i32",
              "torch.int64": "i64", "torch.float16": "f16", "torch.bfloat16": "bf16", "torch.float32": "f32",
              "torch.float64": "f64"}


def _unary(f, float_only=True):
    def op(x, approx=False):
        x = as_numeric(x)
        if float_only and not x.is_float:
            raise TypeError(f"{f.__name__} of an integer")
        try:
            r = f(x.v)
        except (ValueError, OverflowError):
            r = math.nan
        return Num(r, x.T)
    return op


def _log(v):
    return -math.inf if v == 0 else math.log(v) if v > 0 else math.nan


def _minmax(pick):
    def op(x, y, propagate_nan=False):
        a, b, T = as_numeric(x)._pair(y)
        if T in _FLOAT_RANK and (a.v != a.v or b.v != b.v):
            if not propagate_nan:
                raise TypeError("min/max of NaN without propagate_nan")
            return Num(math.nan, T)
        return Num(pick(a.v, b.v), T)
    return op


def _make_modules():
    cutlass = types.ModuleType("cutlass")
    for name, T in (("Boolean", "i1"), ("Uint8", "u8"), ("Int8", "i8"), ("Int16", "i16"), ("Int32", "i32"),
                    ("Int64", "i64"), ("Float16", "f16"), ("BFloat16", "bf16"), ("Float32", "f32"),
                    ("Float64", "f64")):
        setattr(cutlass, name, _Type(T))
    cutlass.range_constexpr = range
    cute = types.ModuleType("cutlass.cute")
    cute.jit = lambda f: f
    cute.make_rmem_tensor = _Frag
    cute.size = lambda shape: int(np.prod(shape))
    cute.make_ptr = make_ptr
    cute.AddressSpace = types.SimpleNamespace(gmem="gmem")
    m = types.SimpleNamespace()
    m.exp = _unary(lambda v: math.exp(v) if v < 709 else math.inf)
    m.exp2 = _unary(lambda v: 2.0 ** v if v < 1023 else math.inf)
    m.log = _unary(_log)
    m.log2 = _unary(lambda v: _log(v) / math.log(2.0) if v > 0 else _log(v))
    m.sqrt = _unary(lambda v: math.sqrt(v) if v >= 0 else math.nan)
    m.tanh = _unary(math.tanh)
    m.abs = _unary(abs)
    m.absi = _unary(abs, float_only=False)
    m.floor = _unary(lambda v: float(math.floor(v)) if math.isfinite(v) else v)
    m.ceil = _unary(lambda v: float(math.ceil(v)) if math.isfinite(v) else v)
    m.roundeven = _unary(lambda v: float(round(v)) if math.isfinite(v) else v)
    m.rem = lambda x, y: Num(math.fmod(x.v, y.v) if y.v != 0 and math.isfinite(x.v) else math.nan, x._pair(y)[2])
    m.min, m.max = _minmax(min), _minmax(max)
    cute.math = m
    cutlass.cute = cute
    return cutlass, cute


@contextmanager
def installed():
    """The fake `cutlass` and `cutlass.cute` importable while the block runs."""
    saved = {k: sys.modules.get(k) for k in ("cutlass", "cutlass.cute")}
    sys.modules["cutlass"], sys.modules["cutlass.cute"] = _make_modules()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def load(source: str) -> dict:
    """The namespace of a generated hooks module, run against the shim."""
    with installed():
        namespace: dict = {}
        exec(compile(source, "<attncc fa4 hooks>", "exec"), namespace)  # noqa: S102 — our own generated source
        return namespace
