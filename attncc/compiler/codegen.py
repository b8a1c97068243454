"""Kernel sources: a kind's template (templates/{forward,backward,decode}.py.tmpl) around the part
every kind shares (templates/common.py.tmpl: imports, helpers, the pattern's `mask_mod` and `score_mod`
lowered to Triton by lowering.py under a numeric plan, tile loads, descriptors), with the
launcher arguments of the pattern's params and buffers. `generate(kind, ...)` is the entry."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from string import Template
from typing import Mapping

import torch

from ..dsl import ir
from ..dsl.pattern import Pattern
from .bands import SLIVER_KEYS
from .derivative import derivative
from .evaluate import token_mask
from .layout import Layout
from .lowering import HELPERS, BufferSpec, lower_function
from .numerics import NumericPlan

TEMPLATES = Path(__file__).parent / "templates"
_DOC_LIMIT = 2000  # characters of an expression shown in a docstring (the code below it is whole)


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
class BackwardTiles:
    """How the two backward kernels are scheduled: dK/dV programs hold a BLOCK_N kv tile and walk
    BLOCK_M query tiles, dQ programs the other way round; each has its own block-mask granularity."""
    dkdv: TileConfig
    dq: TileConfig

    def __str__(self) -> str:
        return f"dK/dV {self.dkdv}; dQ {self.dq}"


def kernel_roots(pattern: Pattern, kind: str = "forward") -> tuple[ir.Node, ...]:
    """The expressions a `kind` kernel evaluates: the token mask (block predicate folded in) and
    the score; the backward also the score mod's derivative (0.0 where it is identically zero)."""
    roots = (token_mask(pattern), pattern.score)
    if kind == "backward":
        roots += (score_derivative(pattern),)
    return roots


def score_derivative(pattern: Pattern) -> ir.Node:
    """d(score mod)/d(raw score) as IR (the constant 0.0 where it is identically zero)."""
    d = derivative(pattern.score, ir.Var(ir.SCORE_VAR))
    return ir.const(0.0) if d is None else d


KINDS = ("forward", "backward", "decode")


def token_row(layout: Layout | None) -> str:
    """The kernels' `token_row(p)`: the row of kernel position p in the tensors they read and
    write — p itself, or with a token layout its natural index, so the kernels gather and scatter
    rows in place of permuted copies of q, k, v, out and lse."""
    if layout is None:
        return '@triton.jit\ndef token_row(p):\n    """Tensors are in kernel order."""\n    return p'
    return (f'@triton.jit\ndef token_row(p):\n    """The natural index of kernel position p in {layout!r}."""\n'
            f"    return {layout.row_expression('p')}")


def generate(kind: str, pattern: Pattern, buffers: Mapping[str, BufferSpec],
             config: TileConfig | BackwardTiles, plan: NumericPlan, version: str,
             layout: Layout | None = None) -> str:
    """Stand-alone Python source of the `kind` kernels (one of KINDS) and their launcher.

    `config`: a TileConfig for the forward and the decode kernel (BLOCK_M packed query rows),
    BackwardTiles for the backward. The source depends on
    the pattern's IR, the buffers' dtypes and ranks, `config` and the
    numeric plan (not on param values or buffer contents, except through the plan's types);
    q/k/v dtype, head dims, GQA group and list contiguity are constexpr arguments. `layout`: the
    pattern is in this token layout's kernel order, the tensors in natural order (token_row).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}; known: {KINDS}")
    roots = kernel_roots(pattern, kind)
    mask, score = roots[:2]
    bufs = [buffers[n] for n in sorted(buffers)]
    extra = [f"p_{p}" for p in _used_params(pattern, plan)]
    buffer_args = []
    for spec in bufs:
        buffer_args += [f"buf_{spec.name}"] + [f"buf_{spec.name}_s{d}" for d in range(spec.ndim)]
    extra += buffer_args
    fast_tanh = any(isinstance(n, ir.Op) and n.op == "tanh" for e in roots for n in ir.walk(e))
    extra_args = "".join(f", {a}" for a in extra) + (", FAST_TANH" if fast_tanh else "")
    helpers: set[str] = set()
    functions = {"MASK_MOD": ("mask_mod", "b, h, q, kv", mask, "mask"),
                 "SCORE_MOD": ("score_mod", "score, b, h, q, kv", score, "score")}
    if kind == "backward":
        functions["SCORE_GRAD"] = ("score_grad", "score, b, h, q, kv", roots[2], "d(score)/d(raw score)")
    holes = {hole: lower_function(name, args + extra_args, root, f"{what} = {_shown(root)}", buffers, plan, helpers)
             for hole, (name, args, root, what) in functions.items()}
    launch_extra = []
    for spec in bufs:
        t = f"buffers[{spec.name!r}]"
        launch_extra.append(f"buf_{spec.name}={t}.view(torch.uint8)" if spec.dtype == torch.bool
                            else f"buf_{spec.name}={t}")
        launch_extra += [f"buf_{spec.name}_s{d}={t}.stride({d})" for d in range(spec.ndim)]
    if fast_tanh:
        launch_extra.append("FAST_TANH=q.is_cuda and q.dtype != torch.float32")
    holes.update({
        "VERSION": version,
        "PATTERN": _describe(pattern, bufs, plan, roots),
        "CONFIG": str(config),
        "HELPERS": "".join(HELPERS[h] + "\n\n\n" for h in sorted(helpers)),
        "TOKEN_ROW": token_row(layout),
        "EXTRA_ARGS": extra_args,
        "EXTRA_PARAMS": "".join(f"\n    {a}," for a in buffer_args)
        + ("\n    FAST_TANH: tl.constexpr," if fast_tanh else ""),
        "LOAD_PARAMS": _load_params(pattern, plan),
        "NO_SPECIALIZE": ", ".join(repr(a) for a in ["Q_LEN", "KV_LEN", "FULL_WIDTH", "PARTIAL_WIDTH"]
                                   + (["NUM_PAGES"] if kind == "decode" else [])),
        "HAS_SCORE_MOD": str(pattern.has_score_mod),
        "LAUNCH_EXTRA": "".join(f"\n        {a}," for a in launch_extra),
    })
    named = {"": config} if kind != "backward" else {"DKDV_": config.dkdv, "DQ_": config.dq}
    for prefix, tiles in named.items():
        holes.update({f"{prefix}BLOCK_M": str(tiles.BLOCK_M), f"{prefix}BLOCK_N": str(tiles.BLOCK_N),
                      f"{prefix}NUM_WARPS": str(tiles.num_warps), f"{prefix}NUM_STAGES": str(tiles.num_stages)})
    holes["COMMON"] = _template("common.py.tmpl").substitute(holes)
    return _template(f"{kind}.py.tmpl").substitute(holes)


_PARAM_LOADS = {"i32": ".to(tl.int32)", "i64": "", "f32": ".to(tl.float64, bitcast=True).to(tl.float32)",
                "f64": ".to(tl.float64, bitcast=True)"}


def _used_params(pattern: Pattern, plan: NumericPlan) -> dict[str, tuple[int, str]]:
    """name -> (its slot in the Params array, the plan's type) of each param this kernel's
    expressions read: a param the IR simplified away (strided_heads with one shard drops its
    window) is neither loaded nor passed on."""
    nodes = {name: ir.Param(name, pattern.param_kind(name)) for name in pattern.params}
    return {name: (i, plan.types[node]) for i, (name, node) in enumerate(nodes.items()) if node in plan.types}


def _load_params(pattern: Pattern, plan: NumericPlan) -> str:
    """Prologue lines reading each used param from the Params array in the type the plan gives it."""
    lines = [f"p_{name} = tl.load(Params + {i}){_PARAM_LOADS[t]}"
             for name, (i, t) in _used_params(pattern, plan).items()]
    if not lines:
        return ""
    head = "\n    # params: runtime values (never compiled in), one load each; floats travel as float64 bits"
    return head + "".join(f"\n    {line}" for line in lines)


def _shown(node: ir.Node) -> str:
    text = str(node)
    return text if len(text) <= _DOC_LIMIT else f"{text[:_DOC_LIMIT]} ... ({len(text)} characters)"


def _describe(pattern: Pattern, bufs: list[BufferSpec], plan: NumericPlan, roots: tuple[ir.Node, ...]) -> str:
    """The pattern as the kernel sees it: params and buffers are arguments, so no values here."""
    used = _used_params(pattern, plan)
    lines = [f"param {name}: {pattern.param_kind(name)}, the runtime value p_{name}"
             + (f" ({used[name][1]})" if name in used else " (unused)") for name in pattern.params]
    lines += [f"buffer {b.name}: {str(b.dtype).replace('torch.', '')}, {b.ndim}-d, the pointer buf_{b.name}"
              for b in bufs]
    lines += [f"mask = {_shown(roots[0])}", f"score = {_shown(roots[1])}"]
    if len(roots) > 2:
        lines.append(f"d(score)/d(raw score) = {_shown(roots[2])}")
    wide = sorted({t for t in plan.types.values() if t in ("i64", "f64")})
    lines.append("numeric plan: int32 and float32, " + (f"with {' and '.join(wide)} where values need them"
                                                         if wide else "nothing wider needed"))
    return "\n".join("    " + line for line in lines)


def sliver_source(version: str) -> str:
    """Stand-alone source of the sliver-band backward (templates/sliver_backward.py.tmpl): one
    kernel for every pattern, the band's bounds its arguments (see bands.is_sliver)."""
    return _template("sliver_backward.py.tmpl").substitute(VERSION=version, SLIVER_KEYS=SLIVER_KEYS)


@lru_cache(maxsize=None)
def _template(name: str) -> Template:
    return Template((TEMPLATES / name).read_text())
