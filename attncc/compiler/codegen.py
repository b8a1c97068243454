"""IR -> Triton expression text, and the forward kernel's source from its template.

Lowering conventions (inside the generated `mask_mod` / `score_mod` jit functions):
- `q` is a column of query indices `[BLOCK_M, 1]`, `kv` a row of key indices `[1, BLOCK_N]`,
  `b` and `h` are scalars; all int32. Padded rows/columns arrive clamped to the last valid index,
  so buffer reads stay in bounds there too (the block-mask builder proves the ranges for valid
  indices).
- `score` is the float32 score tile in natural units (`scale * q.k`).
- A param `W` is the scalar kernel argument `p_W`; a buffer `doc` is `buf_doc` (pointer) with
  strides `buf_doc_s0, ...`; loads are converted to float32 (floats) or bool (bools).
- `x / y` with y constant over the tile (params, b, h) is `x * (1.0 / y)`: one reciprocal.
- `//` and `%` follow torch's floor semantics; Triton's truncate towards zero, so the general
  case calls the `floordiv`/`floormod` helpers and operands proved non-negative by `nonneg`
  use the plain operators.
- `tanh` calls the `tanh` helper: the GPU's `tanh.approx.f32` for 16-bit inputs on CUDA
  (constexpr FAST_TANH), else `2 / (1 + exp(-2x)) - 1`, which also runs in Triton's interpreter
  (libdevice does not). `a ** b` is a product of `a`s for a constant integer b in 0..8, else
  `exp2(b log2 a)` (a > 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from string import Template
from typing import Mapping

import torch

from ..dsl import ir, ops
from ..dsl.pattern import Pattern
from .evaluate import token_mask

TEMPLATES = Path(__file__).parent / "templates"


@dataclass(frozen=True)
class TileConfig:
    """How a forward kernel is scheduled: tile sizes, warps and software-pipelining stages."""
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"{self.BLOCK_M}x{self.BLOCK_N}, num_warps={self.num_warps}, num_stages={self.num_stages}"


@dataclass(frozen=True)
class BufferSpec:
    """What the code generator needs to know about a captured tensor."""
    name: str
    dtype: torch.dtype
    ndim: int

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> "BufferSpec":
        return cls(name, t.dtype, t.dim())


# ----------------------------------------------------------------------------------------------
# Sign analysis: which integer expressions are provably >= 0 (indices are, after clamping).

@lru_cache(maxsize=None)
def nonneg(node: ir.Node) -> bool:
    """True when `node` is >= 0 for every valid index and any param value."""
    if isinstance(node, ir.Var):
        return node.name != ir.SCORE_VAR
    if isinstance(node, ir.Const):
        return not isinstance(node.value, bool) and node.value >= 0
    if isinstance(node, (ir.Param, ir.Load)):
        return False
    a = node.args
    if node.op in ("add", "mul", "floordiv", "min"):
        return all(nonneg(x) for x in a)
    if node.op == "mod":
        return nonneg(a[1])
    if node.op == "max":
        return any(nonneg(x) for x in a)
    if node.op == "abs":
        return True
    if node.op == "where":
        return nonneg(a[1]) and nonneg(a[2])
    return False


# ----------------------------------------------------------------------------------------------
# Expression lowering.

HELPERS = {
    "floordiv": '''@triton.jit
def floordiv(a, b):
    """a // b rounded towards -inf (torch semantics; Triton's // truncates towards zero)."""
    quot = a // b
    return tl.where((a % b != 0) & ((a < 0) != (b < 0)), quot - 1, quot)''',
    "floormod": '''@triton.jit
def floormod(a, b):
    """a % b with the sign of b (torch semantics; Triton's % takes the sign of a)."""
    rem = a % b
    return tl.where((rem != 0) & ((rem < 0) != (b < 0)), rem + b, rem)''',
    "round_half_even": '''@triton.jit
def round_half_even(x):
    """x rounded to the nearest integer, ties to even (torch.round); exact for every float."""
    r = tl.floor(x)
    d = x - r
    up = (d > 0.5) | ((d == 0.5) & (r - 2.0 * tl.floor(r * 0.5) == 1.0))
    return tl.where(up, r + 1.0, r)''',
    "tanh": '''@triton.jit
def tanh(x, FAST_TANH: tl.constexpr):
    """tanh(x): one MUFU instruction (max rel. error ~2^-11) when FAST_TANH, else exact-ish."""
    if FAST_TANH:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0''',
}

_TILE_VARS = frozenset({"q", "kv", "score"})  # what varies inside a tile


class _Lowering:
    """Lowers one expression to Triton text; nodes used more than once become temporaries."""

    def __init__(self, buffers: Mapping[str, BufferSpec]):
        self.buffers = buffers
        self.lines: list[str] = []
        self.names: dict[int, str] = {}

    def lower(self, root: ir.Node) -> str:
        uses: dict[int, int] = {}
        for n in ir.walk(root):
            for c in n.children():
                uses[id(c)] = uses.get(id(c), 0) + 1
        for n in ir.walk(root):
            text = self._expr(n)
            if n is not root and uses.get(id(n), 0) > 1 and isinstance(n, (ir.Op, ir.Load)):
                name = f"t{len(self.lines)}"
                self.lines.append(f"{name} = {text}")
                text = name
            self.names[id(n)] = text
        return self.names[id(root)]

    def _float(self, n: ir.Node) -> str:
        text = self.names[id(n)]
        if isinstance(n, ir.Const) and not isinstance(n.value, bool):
            return _const(float(n.value))
        return text if ir.kind_of(n) == "float" else f"({text}).to(tl.float32)"

    def _expr(self, n: ir.Node) -> str:
        if isinstance(n, ir.Var):
            return n.name
        if isinstance(n, ir.Const):
            return _const(n.value)
        if isinstance(n, ir.Param):
            return f"p_{n.name}"
        if isinstance(n, ir.Load):
            return self._load(n)
        row = ops.TABLE[n.op]
        if row.kind == "float":
            a = [self._float(x) for x in n.args]
        else:
            a = [self.names[id(x)] for x in n.args]
        if isinstance(row.triton, str):
            return row.triton.format(*a)
        return row.triton(self, n, a)

    # -- the table's Triton column calls these for operators that need more than a template

    def truediv(self, n: ir.Op, a: list[str]) -> str:
        if not ir.free_vars(n.args[1]) & _TILE_VARS:  # a per-program scalar: one reciprocal
            return f"({a[0]} * (1.0 / {a[1]}))"
        return f"({a[0]} / {a[1]})"

    def equality(self, n: ir.Op, a: list[str]) -> str:
        x = n.args[0]
        if _is_int_mod(x) and n.args[1] is ir.Const(0):
            # (x floor-mod y) == 0 exactly when the truncating x % y == 0: skip the sign fix-up
            u, v = (self.names[id(c)] for c in x.args)
            return f"(({u} % {v}) {ir.SYMBOL[n.op]} 0)"
        return f"({a[0]} {ir.SYMBOL[n.op]} {a[1]})"

    def tanh(self, n: ir.Op, a: list[str]) -> str:
        return f"tanh({a[0]}, FAST_TANH)"

    def floor_op(self, n: ir.Op, a: list[str]) -> str:
        x, y = n.args
        if ir.kind_of(n) == "float":
            fx, fy = self._float(x), self._float(y)
            return f"tl.floor({fx} / {fy})" if n.op == "floordiv" else f"({fx} - {fy} * tl.floor({fx} / {fy}))"
        if nonneg(x) and nonneg(y):
            return f"({a[0]} {ir.SYMBOL[n.op]} {a[1]})"
        return f"{'floordiv' if n.op == 'floordiv' else 'floormod'}({a[0]}, {a[1]})"

    def pow(self, n: ir.Op, a: list[str]) -> str:
        base, expo = n.args
        if isinstance(expo, ir.Const) and not isinstance(expo.value, bool) and float(expo.value).is_integer() \
                and 0 <= expo.value <= 8:
            k = int(expo.value)
            if k == 0:
                return "1" if ir.kind_of(n) == "int" else "1.0"
            return "(" + " * ".join([a[0]] * k) + ")"
        return f"tl.exp2({self._float(expo)} * tl.log2({self._float(base)}))"

    def round(self, n: ir.Op, a: list[str]) -> str:
        return f"round_half_even({a[0]})"

    def to_int(self, n: ir.Op, a: list[str]) -> str:
        return f"({a[0]}).to(tl.int32)"

    def _load(self, n: ir.Load) -> str:
        spec = self.buffers.get(n.buffer)
        if spec is None:
            raise ir.IRError(f"buffer {n.buffer!r} has no tensor; bind it before compiling")
        if spec.ndim != len(n.index):
            raise ir.IRError(f"buffer {n.buffer!r} has {spec.ndim} dims but is indexed with {len(n.index)}")
        offset = " + ".join(f"{self.names[id(i)]} * buf_{n.buffer}_s{d}" for d, i in enumerate(n.index))
        text = f"tl.load(buf_{n.buffer} + {offset})"
        if spec.dtype == torch.bool:
            return f"({text} != 0)"
        if spec.dtype.is_floating_point:
            return f"{text}.to(tl.float32)"
        return text


def _is_int_mod(n: ir.Node) -> bool:
    return isinstance(n, ir.Op) and n.op == "mod" and ir.kind_of(n) == "int"


def _const(value: ir.Value) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float) and math.isinf(value):
        return 'float("inf")' if value > 0 else '-float("inf")'
    text = repr(value)
    return f"({text})" if text.startswith("-") else text


def lower_function(name: str, args: str, root: ir.Node, doc: str, buffers: Mapping[str, BufferSpec],
                   helpers: set[str]) -> str:
    """A `@triton.jit def name(args)` returning the lowering of `root`."""
    low = _Lowering(buffers)
    result = low.lower(root)
    body = [f"    {line}" for line in low.lines] + [f"    return {result}"]
    helpers |= {name for name in HELPERS if any(f"{name}(" in line for line in body)}
    return "\n".join(["@triton.jit", f"def {name}({args}):", f'    """{doc}"""', *body])


# ----------------------------------------------------------------------------------------------
# The forward kernel.

def generate_forward(pattern: Pattern, buffers: Mapping[str, BufferSpec], config: TileConfig,
                     version: str) -> str:
    """Stand-alone Python source of the forward kernel and its launcher for `pattern`.

    The source depends only on the pattern's IR (not param values), the buffers' dtypes and ranks,
    and `config`; q/k/v dtype, head dims, GQA group and list contiguity are constexpr arguments.
    """
    params = list(pattern.params)
    bufs = [buffers[n] for n in sorted(buffers)]
    extra = [f"p_{p}" for p in params]
    for spec in bufs:
        extra += [f"buf_{spec.name}"] + [f"buf_{spec.name}_s{d}" for d in range(spec.ndim)]
    mask = token_mask(pattern)
    fast_tanh = any(isinstance(n, ir.Op) and n.op == "tanh"
                    for e in (mask, pattern.score) for n in ir.walk(e))
    extra_args = "".join(f", {a}" for a in extra) + (", FAST_TANH" if fast_tanh else "")
    helpers: set[str] = set()
    mask_fn = lower_function("mask_mod", "b, h, q, kv" + extra_args, mask, f"mask = {mask}",
                             buffers, helpers)
    score_fn = lower_function("score_mod", "score, b, h, q, kv" + extra_args, pattern.score,
                              f"score = {pattern.score}", buffers, helpers)
    launch_extra = [f"p_{p}=params[{p!r}]" for p in params]
    for spec in bufs:
        t = f"buffers[{spec.name!r}]"
        launch_extra.append(f"buf_{spec.name}={t}.view(torch.uint8)" if spec.dtype == torch.bool
                            else f"buf_{spec.name}={t}")
        launch_extra += [f"buf_{spec.name}_s{d}={t}.stride({d})" for d in range(spec.ndim)]
    if fast_tanh:
        launch_extra.append("FAST_TANH=q.is_cuda and q.dtype != torch.float32")
    holes = {
        "VERSION": version,
        "PATTERN": _describe(pattern, bufs, mask),
        "CONFIG": str(config),
        "HELPERS": "".join(HELPERS[h] + "\n\n\n" for h in sorted(helpers)),
        "MASK_MOD": mask_fn,
        "SCORE_MOD": score_fn,
        "EXTRA_ARGS": extra_args,
        "EXTRA_PARAMS": "".join(f"\n    {a}," for a in extra)
        + ("\n    FAST_TANH: tl.constexpr," if fast_tanh else ""),
        "NO_SPECIALIZE": ", ".join(repr(a) for a in ["Q_LEN", "KV_LEN", "FULL_WIDTH", "PARTIAL_WIDTH"]
                                   + [f"p_{p}" for p in params]),
        "HAS_SCORE_MOD": str(pattern.has_score_mod),
        "LAUNCH_EXTRA": "".join(f"\n        {a}," for a in launch_extra),
        "BLOCK_M": str(config.BLOCK_M), "BLOCK_N": str(config.BLOCK_N),
        "NUM_WARPS": str(config.num_warps), "NUM_STAGES": str(config.num_stages),
    }
    return _template("forward.py.tmpl").substitute(holes)


def _describe(pattern: Pattern, bufs: list[BufferSpec], mask: ir.Node) -> str:
    """The pattern as the kernel sees it: params and buffers are arguments, so no values here."""
    lines = [f"param {p}: {pattern.param_kind(p)}, the runtime argument p_{p}" for p in pattern.params]
    lines += [f"buffer {b.name}: {str(b.dtype).replace('torch.', '')}, {b.ndim}-d, the pointer buf_{b.name}"
              for b in bufs]
    lines += [f"mask = {mask}", f"score = {pattern.score}"]
    return "\n".join("    " + line for line in lines)


@lru_cache(maxsize=None)
def _template(name: str) -> Template:
    return Template((TEMPLATES / name).read_text())
