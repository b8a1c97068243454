"""The benchmark suite of shared/BENCHMARKS.md: attncc against FlexAttention (its Triton kernels and,
where FlashAttention-4 is installed, its FLASH backend) and SDPA (cuDNN, flash).

    python benchmarks/suite.py                       # default rows, forward
    python benchmarks/suite.py --backward            # forward and forward+backward
    python benchmarks/suite.py --shapes main --patterns causal,document
    python benchmarks/suite.py --smoke               # tiny shapes; on CPU attncc runs in Triton's interpreter
    python benchmarks/suite.py --no-flash            # without the FLASH column
    python benchmarks/suite.py --decode              # then the decode section (benchmarks/decode.py)

Every row is measured in this one process against the anchors of the same run: random normal bf16
inputs, `triton.testing.do_bench` medians (a plain timer on CPU). Before attncc is timed its output
(and gradients) must match FlexAttention's (else SDPA's, else `ac.reference` on batch 0) within
--tol, or the row says FAILED instead of a time; so must FLASH's (FlexAttention with kernel_options
BACKEND=FLASH, on FlashAttention-4's CuTe kernels; CUDA only). Effective TFLOP/s = 4·D·live pairs /
time (forward+backward: 3.5×), live pairs counted exactly per (b, h). Results go to
benchmarks/results/<date>-<gpu>.{json,md} (and $OUT when set), rewritten after every row.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import json
import math
import os
import re
import secrets
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

if not torch.cuda.is_available():  # attncc's kernels run on CPU tensors in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import attncc as ac  # noqa: E402
from benchmarks import patterns as bp  # noqa: E402
from benchmarks.patterns import SHAPES, SMOKE_SHAPES, Shape  # noqa: E402
from benchmarks.report import cell, output_paths, write  # noqa: E402


EXTRA_PATTERNS = ("full", "causal", "document", "swa1024")  # default for every shape but main and video
SHAPE_PATTERNS = {"video": ("natten3d",)}  # a shape made for one pattern: its default
IMPLS = ("attncc", "flex", "cudnn", "fa2")
SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "fa2": SDPBackend.FLASH_ATTENTION}
BWD_FACTOR = 3.5  # forward+backward FLOPs per forward FLOP
FLASH = {"kernel_options": {"BACKEND": "FLASH"}}  # FlexAttention on FlashAttention-4's CuTe kernels
# What FlexAttention says (often wrapped by torch.compile) when FLASH cannot lower a pattern to CuTe
REFUSALS = ("NotImplementedError", "UNSUPPORTED CUTEDSL OPERATION", "flash attention cannot be used")


@dataclass
class Context:
    args: argparse.Namespace
    device: torch.device
    sizes: bp.Sizes
    flex: Callable
    block_mask: Callable
    flash: bool  # whether the FLASH column runs

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclass(frozen=True)
class Impl:
    """One attention implementation for one row: fn(q, k, v) -> out, run inside scope()."""
    fn: Callable
    scope: Callable = contextlib.nullcontext


# ---------------------------------------------------------------- measuring

def sync(ctx: Context) -> None:
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)


def fresh_compiler(ctx: Context) -> None:
    """Drop torch.compile's caches before a new mask: each row compiles its own masks anyway, and
    a long list of earlier entries would add guard checks to every later flex call."""
    if ctx.cuda:
        torch._dynamo.reset()


def bench_ms(ctx: Context, fn: Callable, grads: list[torch.Tensor] | None = None) -> float:
    """Median time of fn() in ms: do_bench on CUDA, else a plain timer over --cpu-reps runs."""
    if ctx.cuda:
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=ctx.args.warmup, rep=ctx.args.rep,
                                             grad_to_none=grads, return_mode="median"))
    times = []
    for _ in range(ctx.args.cpu_reps):
        for t in grads or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in float32 (NaN anywhere gives NaN, which never passes a guard)."""
    want = want.float()
    return float((got.float() - want).norm() / want.norm().clamp_min(1e-30))


def describe(exc: BaseException) -> str:
    """'Type: first line' of exc, or of the error torch.compile wrapped in it; ==== rules are dropped
    (CuteDSL's UNSUPPORTED box puts one before its reason)."""
    exc = getattr(exc, "inner_exception", exc)
    first = (re.sub(r"={3,}\s*", "", str(exc)).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:300]


def failure(ctx: Context, exc: Exception) -> dict:
    """The record of an exception. 'Not supported' is n/a, not an error: a NotImplementedError, also
    wrapped by torch.compile, or FLASH refusing a mask or score_mod it cannot lower to CuTe."""
    if ctx.cuda:
        torch.cuda.empty_cache()
    if isinstance(exc, NotImplementedError) or any(r in str(exc) for r in REFUSALS):
        return {"status": "n/a", "why": describe(exc)}
    return {"status": "error", "error": describe(exc)}


def timed(ms: float, flops: float) -> dict:
    return {"ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}


# ---------------------------------------------------------------- implementations

def setup_flex(device: torch.device) -> tuple[Callable, Callable]:
    """(flex_attention, create_block_mask): compiled on CUDA (recompile limits raised), eager on CPU."""
    if device.type != "cuda":
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention, create_block_mask
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 4096)
    flex = torch.compile(flex_attention, dynamic=False)

    def block_mask(mask_mod, B, H, Q, KV, device):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return create_block_mask(mask_mod, B, H, Q, KV, device=device, _compile=True)
    return flex, block_mask


def flash_state(args: argparse.Namespace, device: torch.device) -> str:
    """'on', or why the FLASH column is off: --no-flash, not CUDA, or FlashAttention-4 does not import."""
    if not args.flash:
        return "off (--no-flash)"
    if device.type != "cuda":
        return "off (not CUDA)"
    try:
        importlib.import_module("flash_attn.cute")
    except Exception as exc:  # noqa: BLE001 - a broken install only drops the column
        return f"off ({describe(exc)})"
    return "on"


def make_impls(ctx: Context, pat: bp.BenchPattern, shape: Shape, per_b: bool, per_h: bool,
               row: dict) -> dict[str, Impl | dict]:
    """Each implementation of this row, or the record saying why it has none."""
    gqa = shape.Hq != shape.Hkv
    opts = {"kernel_options": ctx.args.kernel_options} if ctx.args.kernel_options else {}
    impls: dict[str, Impl | dict] = {"attncc": Impl(lambda q, k, v: ac.attention(q, k, v, pat.attncc, **opts))}
    flex_impls = {"flex": {}, **({"flash": FLASH} if ctx.flash else {})}  # one compiled flex, one block mask
    try:
        start = time.perf_counter()
        bm = None if pat.mask_mod is None else ctx.block_mask(
            pat.mask_mod, shape.B if per_b else None, shape.Hq if per_h else None, shape.N, shape.N, ctx.device)
        sync(ctx)
        row["flex_block_mask_s"] = time.perf_counter() - start
        for name, extra in flex_impls.items():
            impls[name] = Impl(lambda q, k, v, e=extra: ctx.flex(q, k, v, score_mod=pat.score_mod, block_mask=bm,
                                                                 enable_gqa=gqa, **e))
    except Exception as exc:  # noqa: BLE001 - recorded in the row
        impls.update(dict.fromkeys(flex_impls, failure(ctx, exc)))
    for name, backend in SDPA_BACKENDS.items():
        if pat.sdpa_causal is None:
            impls[name] = {"status": "none"}
            continue
        extra = {"enable_gqa": True} if gqa else {}
        scope = (lambda b=backend: sdpa_kernel(b)) if ctx.cuda else (lambda: sdpa_kernel(SDPBackend.MATH))
        impls[name] = Impl(lambda q, k, v, c=pat.sdpa_causal, e=extra: F.scaled_dot_product_attention(
            q, k, v, is_causal=c, **e), scope)
    return impls


def attncc_config(pat: bp.BenchPattern, q, k, v, options: dict | None) -> dict:
    try:
        return dict(ac.compile(pat.attncc, q, k, v, **({"kernel_options": options} if options else {})).config)
    except Exception as exc:  # noqa: BLE001 - recorded in the row
        return {"backend": "?", "error": describe(exc)}


# ---------------------------------------------------------------- one row

def make_inputs(shape: Shape, device: torch.device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    randn = lambda h: torch.randn(shape.B, h, shape.N, shape.D, generator=gen, device=device, dtype=torch.bfloat16)
    return randn(shape.Hq), randn(shape.Hkv), randn(shape.Hkv)


def corner(ts: list[torch.Tensor], group: int) -> list[torch.Tensor]:
    """Batch 0, kv head 0 and the `group` query heads that read it, of [out] or [dq, dk, dv]."""
    return [t[:1, :group if i == 0 else 1] for i, t in enumerate(ts)]


def oracle(pat: bp.BenchPattern, qkv, dout: torch.Tensor | None) -> list[torch.Tensor]:
    """ac.reference in float64 on corner(qkv) (exact there): [out], or [dq, dk, dv] for dout."""
    group = qkv[0].shape[1] // qkv[1].shape[1]
    q, k, v = (t.detach().double().requires_grad_(dout is not None) for t in corner(list(qkv), group))
    out = ac.reference(q, k, v, pat.attncc)
    if dout is None:
        return [out]
    out.backward(dout[:1, :q.shape[1]].double())
    return [q.grad, k.grad, v.grad]


def max_rel_err(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    return max(errs) if all(e == e for e in errs) else math.nan


def guard(row: dict, name: str, pat: bp.BenchPattern, got: list, refs: dict, qkv, dout, key: str,
          tol: float) -> dict:
    """Record the error of `name` (attncc, flash) against the first anchor that ran, else against the
    float64 oracle on batch 0, in row["guard"][key] (attncc) or [f"{name}_{key}"]; when it fails
    against an anchor at a modest size, also both against the oracle. Returns the record."""
    group = qkv[0].shape[1] // qkv[1].shape[1]
    if refs:
        ref_name, want = next(iter(refs.items()))
        err = max_rel_err(got, want)
    else:
        ref_name = "reference[corner]"
        err = max_rel_err(corner(got, group), oracle(pat, qkv, dout))
    record = {"vs": ref_name, "rel_err": err, "tol": tol, "ok": err < tol}
    row.setdefault("guard", {})[key if name == "attncc" else f"{name}_{key}"] = record
    if refs and not err < tol and dout is None and qkv[0].shape[2] ** 2 <= 1 << 26:
        exact = oracle(pat, qkv, None)
        record[f"{name}_vs_reference[corner]"] = max_rel_err(corner(got, group), exact)
        record[f"{ref_name}_vs_reference[corner]"] = max_rel_err(corner(want, group), exact)
    return record


def first_run(impl: Impl, qkv: list[torch.Tensor], dout: torch.Tensor | None) -> list[torch.Tensor]:
    """One call: [out], or the gradients [dq, dk, dv] for the upstream gradient dout."""
    with impl.scope():
        out = impl.fn(*qkv)
        if dout is None:
            return [out]
        out.backward(dout)
    grads = [t.grad for t in qkv]
    for t in qkv:
        t.grad = None
    return grads


def run_pass(ctx: Context, row: dict, pat: bp.BenchPattern, impls: dict, qkv, flops: float, backward: bool):
    """Measure every implementation for one pass (forward, or forward+backward) into row[key]; the
    first anchor that runs is the reference that attncc and FLASH must match before they are timed."""
    key, tol = ("fwd_bwd", ctx.args.grad_tol) if backward else ("fwd", ctx.args.tol)
    entries = row[key]
    dout = None
    if backward:
        qkv = [t.detach().clone().requires_grad_() for t in qkv]
        dout = torch.randn_like(qkv[0])
    refs, results = {}, {}
    for name in ("flex", "cudnn", "fa2", "flash", "attncc"):
        impl = impls.get(name)
        if impl is None:
            continue
        if not isinstance(impl, Impl):
            entries[name] = impl
            continue
        try:
            start = time.perf_counter()
            out = first_run(impl, qkv, dout)
            sync(ctx)
            entries[name] = {"first_s": time.perf_counter() - start}
        except Exception as exc:  # noqa: BLE001 - recorded in the row
            entries[name] = failure(ctx, exc)
            continue
        if name not in ("flash", "attncc"):
            refs = refs or {name: out}
            results[name] = impl
            continue
        try:
            record = guard(row, name, pat, out, refs, qkv, dout, key, tol)
        except Exception as exc:  # noqa: BLE001 - an unchecked kernel is not timed
            entries[name] = {"status": "error", "error": f"guard: {describe(exc)}"}
            continue
        if not record["ok"]:
            entries[name] = {"status": "FAILED", **record}
            continue
        results[name] = impl
    del refs
    for name, impl in results.items():
        step = (lambda f=impl.fn: f(*qkv).backward(dout)) if backward else (lambda f=impl.fn: f(*qkv))
        try:
            with impl.scope():
                ms = bench_ms(ctx, step, qkv if backward else None)
            entries[name].update(timed(ms, flops * (BWD_FACTOR if backward else 1.0)))
        except Exception as exc:  # noqa: BLE001 - recorded in the row
            entries[name] = failure(ctx, exc)


def run_row(ctx: Context, shape_name: str, shape: Shape, name: str) -> dict:
    row = {"pattern": name, "shape": shape_name, "label": shape.label(), "dims": asdict(shape),
           "fwd": {}, "fwd_bwd": {}}
    start = time.perf_counter()
    fresh_compiler(ctx)
    try:
        pat = bp.build(name, shape.N, shape.Hq, ctx.device, ctx.sizes)
        row["params"] = pat.params
        live, per_b, per_h = bp.count_live_pairs(pat.mask_mod, shape.B, shape.Hq, shape.N, shape.N, ctx.device)
        row.update(live_pairs=live, density=live / (shape.B * shape.Hq * shape.N * shape.N))
        qkv = make_inputs(shape, ctx.device)
        row["attncc_config"] = attncc_config(pat, *qkv, ctx.args.kernel_options)
        impls = make_impls(ctx, pat, shape, per_b, per_h, row)
        flops = 4.0 * shape.D * live
        run_pass(ctx, row, pat, impls, qkv, flops, backward=False)
        if ctx.args.backward:
            run_pass(ctx, row, pat, impls, qkv, flops, backward=True)
    except Exception as exc:  # noqa: BLE001 - recorded in the row, the run goes on
        row["error"] = failure(ctx, exc).get("error") or describe(exc)
    row["row_s"] = time.perf_counter() - start
    if ctx.cuda:
        torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------- first call of a new pattern

def new_mask(N: int) -> tuple[Callable, str]:
    """A never-seen sink + sliding window mask_mod (random constants, so no cache can hold it), and its text."""
    window = N // 16 + secrets.randbelow(max(1, N // 16))
    sink = 16 + secrets.randbelow(64)

    def sink_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & ((q_idx - kv_idx <= window) | (kv_idx < sink))
    return sink_window, f"(q >= kv) & ((q - kv <= {window}) | (kv < {sink}))"


def first_call(ctx: Context, shape: Shape) -> dict:
    """Seconds to the first result of a never-seen pattern, for attncc (trace + block mask + codegen +
    compile + run) and FlexAttention (block mask + compile + run), then the same call again; FLASH
    gets a pattern of its own (flex's block mask compile would be cached for the shared one)."""
    sink_window, text = new_mask(shape.N)
    q, k, v = make_inputs(shape, ctx.device, seed=1)
    fresh_compiler(ctx)
    res: dict = {"pattern": text, "shape": shape.label()}

    def flex_run(mask_mod: Callable, **extra) -> Callable:
        return lambda: ctx.flex(q, k, v, block_mask=ctx.block_mask(mask_mod, None, None, shape.N, shape.N, ctx.device),
                                enable_gqa=shape.Hq != shape.Hkv, **extra)
    runs = {"attncc": lambda: ac.attention(q, k, v, ac.Pattern(sink_window, name="first_call")),
            "flex": flex_run(sink_window)}
    if ctx.flash:
        flash_mask, res["flash_pattern"] = new_mask(shape.N)
        runs["flash"] = flex_run(flash_mask, **FLASH)
    outs = {}
    for name, fn in runs.items():
        try:
            sync(ctx)
            times = []
            for _ in range(2):
                start = time.perf_counter()
                outs[name] = fn()
                sync(ctx)
                times.append(time.perf_counter() - start)
            res[name] = {"first_s": times[0], "second_s": times[1]}
        except Exception as exc:  # noqa: BLE001 - recorded
            res[name] = failure(ctx, exc)
    if {"attncc", "flex"} <= outs.keys():
        res["rel_err"] = rel_err(outs["attncc"], outs["flex"])
    return res


# ---------------------------------------------------------------- driver

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="main,d64,gqa,long,odd",
                   help=f"comma list of {', '.join(SHAPES)} (default: BENCHMARKS.md's)")
    p.add_argument("--patterns", default=None,
                   help=f"comma list of {', '.join(bp.NAMES)} for every shape (default: all on main, natten3d "
                        f"on video, {', '.join(EXTRA_PATTERNS)} on the others); also, named only, "
                        f"{', '.join(bp.VALIDATION_NAMES)}")
    p.add_argument("--backward", action="store_true", help="also measure forward+backward")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and scaled pattern sizes (runs on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=float, default=25.0, help="do_bench warmup, ms")
    p.add_argument("--rep", type=float, default=100.0, help="do_bench repetition time, ms")
    p.add_argument("--cpu-reps", type=int, default=2, help="timed runs per measurement on CPU")
    p.add_argument("--tol", type=float, default=2e-2, help="guard: max rel err of attncc's output")
    p.add_argument("--grad-tol", type=float, default=5e-2, help="guard: max rel err of attncc's gradients")
    p.add_argument("--kernel-options", type=json.loads, default=None, help="JSON dict for ac.attention")
    p.add_argument("--no-first-call", dest="first_call", action="store_false",
                   help="skip the first-call timing of a new pattern")
    p.add_argument("--no-flash", dest="flash", action="store_false",
                   help="skip the FLASH column (FlexAttention's FlashAttention-4 backend)")
    p.add_argument("--decode", action="store_true",
                   help="then the decode section: benchmarks/decode.py at its default rows (B 1/16/64, KV 8K-128K, "
                        "Q_LEN 1 and 8; --smoke: tiny), written beside the suite's results")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--tag", default="", help="suffix for the result file names")
    args = p.parse_args(argv)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    args.shape_names = [s for s in args.shapes.split(",") if s]
    bad = [s for s in args.shape_names if s not in shapes]
    names = args.patterns.split(",") if args.patterns else []
    bad += [n for n in names if n not in bp.NAMES + bp.VALIDATION_NAMES]
    if bad:
        p.error(f"unknown shape(s)/pattern(s): {', '.join(bad)}")
    args.rows = [(s, n) for s in args.shape_names
                 for n in (names or (bp.NAMES if s == "main" else SHAPE_PATTERNS.get(s, EXTRA_PATTERNS)))]
    return args


def git_describe() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import triton

    device = torch.device(args.device)
    flex, block_mask = setup_flex(device)
    flash = flash_state(args, device)
    ctx = Context(args, device, bp.SMOKE if args.smoke else bp.BENCH, flex, block_mask, flash == "on")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    gpu = torch.cuda.get_device_name(device) if ctx.cuda else "cpu"
    now = datetime.datetime.now(datetime.timezone.utc)
    result = {"date": now.strftime("%Y-%m-%d"), "time_utc": now.strftime("%H:%M:%S"), "gpu": gpu,
              "device": str(device), "torch": torch.__version__, "triton": triton.__version__,
              "attncc": ac.__version__, "git": git_describe(),
              "command": shlex.join(["python"] + (sys.argv if argv is None else ["benchmarks/suite.py"] + argv)),
              "settings": {"smoke": args.smoke, "backward": args.backward, "warmup": args.warmup, "rep": args.rep,
                           "cpu_reps": args.cpu_reps, "bwd_factor": BWD_FACTOR, "tol": args.tol, "grad_tol": args.grad_tol,
                           "kernel_options": args.kernel_options, "sizes": asdict(ctx.sizes), "flash": flash},
              "rows": [], "first_call": None}
    suffix = ("-smoke" if args.smoke else "") + (f"-{args.tag}" if args.tag else "")
    bases = output_paths(args.out_dir, gpu, result["date"], suffix)
    for i, (shape_name, name) in enumerate(args.rows, 1):
        row = run_row(ctx, shape_name, shapes[shape_name], name)
        result["rows"].append(row)
        names = IMPLS + (("flash",) if ctx.flash else ())
        summary = " ".join(f"{impl}={cell(row['fwd'].get(impl))}" for impl in names)
        print(f"[{i}/{len(args.rows)}] {shape_name} {name}: {summary}"
              f"{' error: ' + row['error'] if 'error' in row else ''} ({row['row_s']:.1f} s)",
              file=sys.stderr, flush=True)
        write(result, bases)
    if args.first_call:
        result["first_call"] = first_call(ctx, shapes[args.shape_names[0]])
    text = write(result, bases)
    print(f"written: {', '.join(str(b) + '.{json,md}' for b in bases)}", file=sys.stderr)
    print(text, end="")
    if args.decode:
        from benchmarks import decode

        result["decode"] = decode.main(["--out-dir", str(args.out_dir)] + (["--smoke"] if args.smoke else []))
    return result


if __name__ == "__main__":
    main()
