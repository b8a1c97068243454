"""IR -> CuTe-DSL source: the `mask_mod`, `score_mod` and `score_mod_bwd` hooks of
FlashAttention-4's kernels (the `fa4` backend, runtime/fa4.py), one more printer over the
operator table (its `cute` column). `generate(...)` returns the hooks module's source; it runs
no GPU code and imports nothing of CUTLASS here.

Conventions inside the generated hooks:
- FA4 passes b, h, q, kv (and the score) as SSA vectors of a few lanes; each hook copies them
  into register fragments and computes every lane with scalar code, in the machine types of
  attncc's numeric plan (compiler/numerics.py): cutlass.Int32 / Int64 / Float32 / Float64 /
  Boolean, the same widths the Triton kernels use, so both decide every mask bit alike.
- `score` is the float32 score in natural units (FA4 multiplies by the softmax scale before the
  hook, as attncc's semantics want). Masked positions never reach `score_mod_bwd`'s result.
- A param `W` is `p_W`, read from FA4's runtime `aux_scalars` tuple (`HookInputs` says in which
  order), so a new value recompiles nothing. Buffers travel in aux_scalars too, each as its
  address (Int64) and strides (Int32): `ptr_doc` is a global-memory pointer and `doc[q]` the read
  `(ptr_doc + (q * s_doc_0)).load()`; FA4 gets no aux_tensors. (With aux tensors FA4 wraps q and kv
  into range by two fast divisions per element and hands the score mod one lane per call; without
  them, two lanes, and a read at b and h only — alibi's `slope[h]` — has one address for all of a
  tile's elements.) FA4 calls the hooks on the padded rows and columns of a ragged last tile too and
  discards what they return there; so that their reads stay in the buffers, a hook that reads a
  buffer at an index of q (kv) first clamps q to `q_last` = Q - 1 (kv to KV - 1), runtime aux
  scalars, which leaves every real position as it is: the domain check's proof over [0, Q) x
  [0, KV) then covers every read.
- `//` on signed integers is floor division in CuTe-DSL (arith.floordivsi); its `%` may truncate,
  so a floor `%` whose operands are not proved non-negative is spelled `a - (a // b) * b`.
  Floats follow torch through helpers (floor division from fmod, as torch computes it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from ..dsl import ir
from ..dsl.pattern import Pattern
from .lowering import BufferSpec, Lowering
from .numerics import NumericPlan

_CT = {"i32": "cutlass.Int32", "i64": "cutlass.Int64", "f32": "cutlass.Float32", "f64": "cutlass.Float64",
       "bool": "cutlass.Boolean"}
_DTYPE_TYPE = {torch.int32: "i32", torch.int64: "i64", torch.float32: "f32", torch.float64: "f64"}
# a buffer element's CuTe type when read through a pointer (bool is stored as one byte)
_POINTEE = {torch.bool: "cutlass.Uint8", torch.uint8: "cutlass.Uint8", torch.int8: "cutlass.Int8",
            torch.int16: "cutlass.Int16", torch.int32: "cutlass.Int32", torch.int64: "cutlass.Int64",
            torch.float16: "cutlass.Float16", torch.bfloat16: "cutlass.BFloat16", torch.float32: "cutlass.Float32",
            torch.float64: "cutlass.Float64"}
_VAR_TYPE = {"b": "cutlass.Int32", "h": "cutlass.Int32", "q": "cutlass.Int32", "kv": "cutlass.Int32",
             "score": "cutlass.Float32"}
_VAR_ARG = {"b": "batch_idx", "h": "head_idx", "q": "q_idx", "kv": "kv_idx", "score": "score_ssa"}

HELPERS = {
    "floormod_i": '''@cute.jit
def floormod_i(a, b):
    """a % b with the sign of b (torch), from floor division (CuTe-DSL's % may truncate)."""
    return a - (a // b) * b''',
    "floordiv_f": '''@cute.jit
def floordiv_f(a, b):
    """a // b for floats as torch computes it: from fmod, not floor(a / b); by zero a / b (+-inf, NaN)."""
    mod = cute.math.rem(a, b)
    div = (a - mod) / b
    div = (div - 1.0) if ((mod != 0.0) & ((b < 0.0) != (mod < 0.0))) else div
    fl = cute.math.floor(div)
    fl = (fl + 1.0) if (div - fl > 0.5) else fl
    return (a / b) if (b == 0.0) else (fl if (div != 0.0) else (a / b) * 0.0)''',
    "floormod_f": '''@cute.jit
def floormod_f(a, b):
    """a % b for floats with the sign of b (torch), from fmod."""
    rem = cute.math.rem(a, b)
    return (rem + b) if ((rem != 0.0) & ((rem < 0.0) != (b < 0.0))) else rem''',
    "pow_": '''@cute.jit
def pow_(a, b):
    """a ** b with torch's rules: negative bases take integer powers, x ** 0 is 1."""
    r = cute.math.exp2(b * cute.math.log2(cute.math.abs(a)))
    whole = cute.math.floor(b) == b
    odd = whole & (cute.math.floor(b * 0.5) * 2.0 != b)
    r = (((-r) if odd else r) if whole else r * float("nan")) if (a < 0.0) else r
    return (r * 0.0 + 1.0) if (b == 0.0) else r''',
}

_PRELUDE = '''import cutlass
import cutlass.cute as cute


@cute.jit
def lanes(x, dtype):
    """An SSA vector FA4 passes as a register fragment, indexable lane by lane."""
    frag = cute.make_rmem_tensor(x.shape, dtype)
    frag.store(x)
    return frag
'''


def _float_literal(value: float) -> str:
    return repr(value) if math.isfinite(value) else f'float("{value}")'


class CuteLowering(Lowering):
    """Lowers expressions to CuTe-DSL scalar code (see the module docstring)."""

    column = "cute"

    def cast(self, text: str, T: str) -> str:
        return f"({text}).to({_CT[T]})"

    @staticmethod
    def literal(value: ir.Value, T: str) -> str:
        if isinstance(value, bool):
            return f"cutlass.Boolean({value})"
        if T in ("f32", "f64"):
            return f"{_CT[T]}({_float_literal(float(value))})"
        return f"{_CT[T]}({value!r})"

    # -- the table's cute column calls these (truediv is Lowering's: a float32 division by a
    #    tile-invariant value is a product with its reciprocal, as in the Triton kernels)

    def floor_op(self, n: ir.Op, a: list[str]) -> str:
        if self.compute[n] in ("f32", "f64"):
            return f"floordiv_f({a[0]}, {a[1]})" if n.op == "floordiv" else f"floormod_f({a[0]}, {a[1]})"
        if n.op == "floordiv":
            return f"({a[0]} // {a[1]})"
        if all(x in self.plan.nonneg for x in n.args):
            return f"({a[0]} % {a[1]})"
        return f"floormod_i({a[0]}, {a[1]})"

    def absolute(self, n: ir.Op, a: list[str]) -> str:
        return f"cute.math.{'abs' if self.compute[n] in ('f32', 'f64') else 'absi'}({a[0]})"

    def minmax(self, n: ir.Op, a: list[str]) -> str:
        nan = ", propagate_nan=True" if self.compute[n] in ("f32", "f64") else ""
        return f"cute.math.{n.op}({a[0]}, {a[1]}{nan})"

    def rounding(self, n: ir.Op, a: list[str]) -> str:
        if self.compute[n] not in ("f32", "f64"):
            return a[0]  # an integer is its own floor, ceil and round
        return f"cute.math.{'roundeven' if n.op == 'round' else n.op}({a[0]})"

    def tanh(self, n: ir.Op, a: list[str]) -> str:
        # float32: the GPU's tanh.approx.f32, as the Triton kernels use for 16-bit inputs
        return f"cute.math.tanh({a[0]}{', approx=True' if self.plan.types[n] == 'f32' else ''})"

    def sigmoid(self, n: ir.Op, a: list[str]) -> str:
        one = self.literal(1.0, self.compute[n])
        return f"({one} / ({one} + cute.math.exp(-{a[0]})))"

    def _load(self, n: ir.Load) -> str:
        spec = self.spec(n)
        if self.plan.offsets[n] != "i32":
            raise ir.IRError(f"buffer {n.buffer!r} spans more than 2**31 elements; the fa4 backend indexes int32")
        offset = " + ".join(f"{self.typed(i, 'i32')} * s_{n.buffer}_{d}" for d, i in enumerate(n.index))
        text = f"(ptr_{n.buffer} + ({offset})).load()"
        T = self.plan.types[n]
        if T == "bool":
            return f"({text} != 0)"
        if spec.dtype == torch.uint8:  # CuTe-DSL 4.8.1 widens by the target's sign (extsi to Int32): 255 -> -1
            text = f"(({text}).to(cutlass.Int32) & cutlass.Int32(255))"
            return text if T == "i32" else self.cast(text, T)
        return text if _DTYPE_TYPE.get(spec.dtype) == T else self.cast(text, T)


def scalar_params(pattern: Pattern, plan: NumericPlan) -> list[tuple[str, str]]:
    """(name, CuTe type) of each param the hooks read, in the order they lead aux_scalars."""
    out = []
    for name in pattern.params:
        node = ir.Param(name, pattern.param_kind(name))
        if node in plan.types:
            out.append((name, _CT[plan.types[node]]))
    return out


@dataclass(frozen=True)
class HookInputs:
    """What the hooks read from FA4's aux_scalars, in order: the `params` (name, CuTe type); for
    each buffer in `pointers` its address (Int64) and one Int32 stride per dimension (in
    elements); then for each of q and kv in `bounds` its last valid index (Int32, Q - 1 / KV - 1),
    which every q / kv a hook reads is clamped to (see the module docstring)."""
    params: tuple[tuple[str, str], ...]
    pointers: tuple[tuple[str, int], ...]  # (buffer, ndim), sorted
    bounds: tuple[str, ...]  # "q", "kv"

    def scalar_slots(self) -> list[tuple[str, str, int]]:
        """(kind, name, dimension) of each aux_scalars entry: ("param", "W", 0), ("address",
        "slope", 0), ("stride", "slope", d), ("last", "kv", 0)."""
        return ([("param", n, 0) for n, _ in self.params]
                + [slot for b, ndim in self.pointers
                   for slot in [("address", b, 0)] + [("stride", b, d) for d in range(ndim)]]
                + [("last", v, 0) for v in self.bounds])


def hook_inputs(pattern: Pattern, roots: tuple[ir.Node, ...], buffers: Mapping[str, BufferSpec],
                plan: NumericPlan) -> HookInputs:
    """The HookInputs of the hooks for kernel roots `roots` (compiler/codegen.kernel_roots)."""
    loads = [n for root in hook_roots(pattern, roots).values() for n in ir.walk(root) if isinstance(n, ir.Load)]
    indexed = set().union(*(ir.free_vars(i) for n in loads for i in n.index))
    return HookInputs(tuple(scalar_params(pattern, plan)),
                      tuple((b, buffers[b].ndim) for b in sorted({n.buffer for n in loads})),
                      tuple(v for v in ("q", "kv") if v in indexed))


def hook_roots(pattern: Pattern, roots: tuple[ir.Node, ...]) -> dict[str, ir.Node]:
    """The hooks FA4 needs for kernel roots (mask, score[, d(score)/d(raw score)]): a mask_mod
    unless the mask is always true, a score_mod (and its derivative hook) unless the score is
    unmodified."""
    hooks = {}
    if roots[0] is not ir.TRUE:
        hooks["mask_mod"] = roots[0]
    if pattern.has_score_mod:
        hooks["score_mod"] = roots[1]
        if len(roots) > 2:
            hooks["score_mod_bwd"] = roots[2]
    return hooks


def generate(pattern: Pattern, roots: tuple[ir.Node, ...], buffers: Mapping[str, BufferSpec],
             plan: NumericPlan, version: str) -> str:
    """Stand-alone CuTe-DSL source of the hooks for `roots` (compiler/codegen.kernel_roots of the
    backward: mask, score, d(score)/d(raw score)). Raises ir.IRError naming the first operator or
    read the backend cannot express. Depends on the IR, buffer dtypes/ranks and the plan's types."""
    hooks = hook_roots(pattern, roots)
    inputs = hook_inputs(pattern, roots, buffers, plan)
    helpers: set[str] = set()
    slots = inputs.scalar_slots()
    parts = [f'"""FlashAttention-4 hooks generated by attncc {version}.\n\n'
             + "".join(f"{name}: {_shown(root)}\n" for name, root in hooks.items())
             + ("aux_scalars: " + ", ".join(n if k == "param" else f"{k} of {n}" + (f" dim {d}" if k == "stride" else "")
                                            for k, n, d in slots) + "\n" if slots else "")
             + ("q and kv in range of every buffer read: " + ", ".join(f"{v} <= {v}_last" for v in inputs.bounds) + "\n"
                if inputs.bounds else "")
             + '"""', _PRELUDE]
    for name, root in hooks.items():
        parts.append(_hook(name, root, buffers, inputs, plan, helpers))
    for h in sorted(helpers):
        parts.insert(2, HELPERS[h] + "\n")
    return "\n\n".join(parts) + "\n"


def _hook(name: str, root: ir.Node, buffers, inputs: HookInputs, plan, helpers: set[str]) -> str:
    low = CuteLowering(buffers, plan)
    result = low.lower(root)
    if name == "mask_mod":
        head, out_type, shape_of = "def mask_mod(batch_idx, head_idx, q_idx, kv_idx, seqlen_info, aux_tensors, " \
                                   "aux_scalars=None):", "cutlass.Boolean", "q_idx"
    elif name == "score_mod":
        head, out_type, shape_of = "def score_mod(score_ssa, batch_idx, head_idx, q_idx, kv_idx, seqlen_info, " \
                                   "aux_tensors, aux_scalars=None):", "cutlass.Float32", "score_ssa"
    else:
        head, out_type, shape_of = "def score_mod_bwd(grad_ssa, score_ssa, batch_idx, head_idx, q_idx, kv_idx, " \
                                   "seqlen_info, aux_tensors, aux_scalars=None):", "cutlass.Float32", "score_ssa"
        result = f"grad * {result}" if not (isinstance(root, ir.Const) and root.value == 1.0) else "grad"
    what = {"mask_mod": "mask", "score_mod": "score", "score_mod_bwd": "grad * d(score)/d(raw score)"}[name]
    lines = ["@cute.jit", head, f'    """{what} = {_shown(root)}"""']
    used = ir.free_vars(root)
    reads = [n for n in ir.walk(root) if isinstance(n, ir.Load)]
    loads = {n.buffer for n in reads}
    clamped = {v for n in reads for i in n.index for v in ir.free_vars(i)} & set(inputs.bounds)
    params = {n.name for n in ir.walk(root) if isinstance(n, ir.Param)}
    for i, (kind, b, d) in enumerate(inputs.scalar_slots()):
        if kind == "param" and b in params:
            lines.append(f"    p_{b} = aux_scalars[{i}]")
        elif kind == "address" and b in loads:
            lines.append(f"    ptr_{b} = cute.make_ptr({_POINTEE[buffers[b].dtype]}, aux_scalars[{i}], "
                         f"cute.AddressSpace.gmem, assumed_align={buffers[b].dtype.itemsize})")
        elif kind == "stride" and b in loads:
            lines.append(f"    s_{b}_{d} = aux_scalars[{i}]")
        elif kind == "last" and b in clamped:
            lines.append(f"    {b}_last = aux_scalars[{i}]")
    lane_vars = [v for v in ("score", "b", "h", "q", "kv") if v in used]
    if name == "score_mod_bwd":
        lane_vars = ["grad"] + lane_vars
    for v in lane_vars:
        src, T = ("grad_ssa", "cutlass.Float32") if v == "grad" else (_VAR_ARG[v], _VAR_TYPE[v])
        lines.append(f"    {v}_lanes = lanes({src}, {T})")
    lines.append(f"    out = cute.make_rmem_tensor({shape_of}.shape, {out_type})")
    lines.append(f"    for i in cutlass.range_constexpr(cute.size({shape_of}.shape)):")
    lines += [f"        {v} = cute.math.min({v}_lanes[i], {v}_last)" if v in clamped else f"        {v} = {v}_lanes[i]"
              for v in lane_vars]
    lines += [f"        {line}" for line in low.lines]
    lines.append(f"        out[i] = {result}")
    lines.append("    return out.load()")
    body = "\n".join(lines)
    helpers |= {h for h in HELPERS if f"{h}(" in body}
    return body


def _shown(node: ir.Node, limit: int = 2000) -> str:
    text = str(node)
    return text if len(text) <= limit else f"{text[:limit]} ... ({len(text)} characters)"
