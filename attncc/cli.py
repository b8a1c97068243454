"""The `attncc` command: show, viz, check, explain and bench a pattern.

PATTERN is a quoted DSL text (`"mask = q >= kv"`), a pattern file (`causal.attn`), or
`module:function` naming a Python mask_mod(b, h, q_idx, kv_idx), a score_mod(score, b, h, q_idx,
kv_idx), a Pattern, or a function annotated `-> Pattern` called with no arguments
(`attncc.patterns:causal`) or literal ones (`"attncc.patterns:neighborhood((32, 32), 7)"`); no other
callable is called (`os:system(...)` is refused), but importing a module runs its code: a
module:function PATTERN must be trusted (DSL text is the form for untrusted input).
Exit codes: 0 ok, 1 a failure (or a feature this version does not have yet), 2 bad input.

Verbs light up as the library grows: each looks for the function it needs (`attncc.compile`,
`attncc.create_block_mask`, `attncc.testing.check_pattern`, `attncc.explain`, benchmarks/suite.py)
and says clearly when it is not there.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors run the generated kernels in Triton's interpreter

import attncc as ac  # noqa: E402
from attncc.dsl import ir  # noqa: E402
from attncc.runtime.inputs import kernel_head_dim  # noqa: E402
from attncc.viz import ascii_block_map, ascii_mask, save_png  # noqa: E402

_MODULE_FUNCTION = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*(\(.*\))?", re.S)


class InputError(ValueError):
    """Bad command-line input (exit code 2)."""


class Missing(RuntimeError):
    """A feature this version of attncc does not have yet (exit code 1)."""


# ------------------------------------------------------------------------------------------------
# Loading a pattern.

def load_pattern(spec: str, binds: list[str] = ()) -> ac.Pattern:
    """The Pattern named by a DSL text, a pattern file, or `module:function`; then --bind values."""
    if _MODULE_FUNCTION.fullmatch(spec) and not os.path.exists(spec):
        pattern = _from_python(spec)
    elif os.path.isfile(spec):
        try:
            pattern = ac.parse(Path(spec).read_text())
        except ac.DSLError as e:
            raise InputError(f"{spec}: {e}") from None
    elif spec.endswith(".attn"):
        raise InputError(f"no such pattern file: {spec}")
    elif "=" not in spec:
        raise InputError(f"{spec!r} is not a file, module:function or pattern text; PATTERN is DSL text such as "
                         "'mask = q >= kv', a .attn file, or module:function such as attncc.patterns:causal")
    else:
        pattern = ac.parse(spec)
    return _bind(pattern, binds)


def _literal_call(text: str) -> tuple[list, dict]:
    """The positional and keyword arguments of `(1, (8, 8), causal=True)`: Python literals only."""
    try:
        call = ast.parse(f"f{text}", mode="eval").body
        return [ast.literal_eval(a) for a in call.args], {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError) as e:
        raise InputError(f"the arguments {text} must be Python literals (numbers, strings, tuples, lists): {e}") from None


def _returns_pattern(fn) -> bool:
    """Whether `fn` is annotated to return an attncc Pattern (`-> Pattern`, also as a string)."""
    try:
        annotation = inspect.signature(fn).return_annotation
    except (TypeError, ValueError):
        return False
    return annotation is ac.Pattern or (isinstance(annotation, str) and annotation.split(".")[-1] == "Pattern")


def _from_python(spec: str) -> ac.Pattern:
    """module:NAME (a Pattern), module:function(literals) or module:function with no arguments (a
    function annotated `-> Pattern`), or module:mask_mod / score_mod (a Python function, traced).
    Importing the module runs its code: trusted input only (DSL text is the safe form). Nothing
    else is called: os:system('...') is refused before any call."""
    module_name, attr = spec.split(":", 1)
    call = None
    if "(" in attr:  # module:function(literal arguments), e.g. attncc.patterns:sinks(4, 256)
        attr, call = attr[:attr.index("(")], attr[attr.index("("):]
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InputError(f"cannot import {module_name!r}: {e}") from None
    obj = getattr(module, attr, None)
    if obj is None:
        raise InputError(f"module {module_name!r} has no attribute {attr!r}")
    if isinstance(obj, ac.Pattern):
        return obj
    if not callable(obj):
        raise InputError(f"{spec} is a {type(obj).__name__}, not a function or Pattern")
    refused = InputError(f"{module_name}:{attr} is not annotated to return an attncc Pattern (`-> Pattern`); the "
                         "command line calls only such functions, or traces a Python mask_mod / score_mod")
    if (call is not None or not inspect.isfunction(obj)) and not _returns_pattern(obj):
        raise refused
    if call is not None:
        args, kwargs = _literal_call(call)
        try:
            result = obj(*args, **kwargs)
        except (TypeError, ValueError, ac.PatternError) as e:
            raise InputError(f"{spec}: {type(e).__name__}: {e}") from None
        if not isinstance(result, ac.Pattern):
            raise InputError(f"{spec} returned {type(result).__name__}, not an attncc.Pattern")
        return result
    try:
        required = [p for p in inspect.signature(obj).parameters.values()
                    if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    except (TypeError, ValueError):
        raise InputError(f"cannot read the signature of {spec}") from None
    if len(required) == 4:
        return ac.Pattern(mask_mod=obj)
    if len(required) == 5:
        return ac.Pattern(score_mod=obj)
    if len(required) == 0:
        if not _returns_pattern(obj):
            raise refused
        result = obj()
        if isinstance(result, ac.Pattern):
            return result
        raise InputError(f"{spec}() returned {type(result).__name__}, not an attncc.Pattern")
    raise InputError(f"{spec} takes {len(required)} required arguments; expected a mask_mod (b, h, q_idx, "
                     "kv_idx), a score_mod (score, b, h, q_idx, kv_idx) or a function of none returning a Pattern")


def _bind(pattern: ac.Pattern, binds: list[str]) -> ac.Pattern:
    """`NAME=VALUE`: a number for a param, comma-separated numbers (a 1-D tensor) for a buffer."""
    values = {}
    for item in binds:
        name, sep, text = item.partition("=")
        if not sep:
            raise InputError(f"--bind {item!r}: expected NAME=VALUE")
        try:
            numbers = [_number(x) for x in text.split(",")]
        except ValueError:
            raise InputError(f"--bind {item!r}: VALUE must be a number or comma-separated numbers") from None
        if name in pattern.buffers:
            try:
                values[name] = torch.tensor(numbers)
            except (OverflowError, RuntimeError, ValueError) as e:  # integers past int64
                raise InputError(f"--bind {item!r}: {e}") from None
        elif len(numbers) == 1:
            values[name] = numbers[0]
        else:
            raise InputError(f"--bind {item!r}: {name!r} is not a buffer of this pattern, so it takes one number")
    return pattern.bind(**values) if values else pattern


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _require_values(pattern: ac.Pattern) -> None:
    missing = pattern.unbound_buffers()
    if missing:
        raise InputError(f"buffer(s) {', '.join(missing)} have no values; give them with "
                         f"--bind {missing[0]}=0,0,1,1,... (one number per index)")


def _feature(module, name: str):
    """`module.name` if this version of attncc has it, else None."""
    try:
        return getattr(module, name, None)
    except ImportError:  # a lazily imported submodule whose dependencies are not installed
        return None


def _inputs(args, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q [B, H, Q, D], k, v [B, H, KV, D] for the sizes on the command line."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    gen = torch.Generator().manual_seed(0)
    kv_heads = getattr(args, "kv_heads", None) or args.heads
    if args.heads % kv_heads:
        raise InputError(f"--heads {args.heads} is not a multiple of --kv-heads {kv_heads} (GQA)")
    shapes = [(1, h, n, args.head_dim or 64) for h, n in ((args.heads, args.q_len), (kv_heads, args.kv_len),
                                                          (kv_heads, args.kv_len))]
    return tuple(torch.randn(s, generator=gen).to(device, dtype) for s in shapes)


# ------------------------------------------------------------------------------------------------
# Verbs. Each returns an exit code.

def cmd_show(pattern: ac.Pattern, args) -> int:
    print(f"== pattern\n{pattern}\n\n== IR (node : kind)")
    parts = [("mask", pattern.mask), ("score", pattern.score)] + [("block", pattern.block)] * pattern.has_block_mask
    for what, node in parts:
        print(f"{what} =\n{ir.tree(node)}")
    compile_ = _feature(ac, "compile")
    if compile_ is None:
        print("\n(no generated source: this version of attncc has no code generator yet; attncc.compile is missing)")
        return 0
    _require_values(pattern)
    if args.target:
        return _show_target(pattern, args)
    q, k, v = _inputs(args, device="cpu")
    kernel = compile_(pattern, q, k, v)
    print(f"\n== generated Triton source for q {list(q.shape)}, k/v {list(k.shape)} {q.dtype}")
    config = getattr(kernel, "config", None)
    if config is not None:
        print(f"# config: {config}")
    print(kernel.source)
    return 0


def _show_target(pattern: ac.Pattern, args) -> int:
    """What runs on the GPU `args.target` names (runtime/choices.TARGETS), printed on any machine:
    the backend the automatic choice takes there (with FlashAttention-4 installed) and its source."""
    from .runtime import choices, fa4

    name, capability = choices.TARGETS[args.target]
    if args.dtype is None:
        args.dtype = "bfloat16"
    q, k, v = _inputs(args, device="meta")
    kern = ac.compile(pattern, q, k, v, target=args.target)
    print(f"\n== on the {name} (sm_{capability[0]}{capability[1]}), q {list(q.shape)}, k/v {list(k.shape)} {q.dtype}")
    if kern.backend == "fa4":
        print("# backend: fa4 (FlashAttention-4's kernels with these hooks; it must be installed there: "
              "pip install 'attncc[fa4]')")
    else:
        why = fa4.refusal_on(kern.pattern, kern.shapes, capability, q.dtype, "cpu", assume_installed=True)
        print(f"# backend: {kern.backend} (not fa4: {why or 'the cost model or the layout rule of runtime/choices.py prefer it'}); "
              f"Triton tiles {kern.tiles}" + (" (SDPA's cuDNN kernel runs; this is attncc's fallback)"
                                             if kern.backend == "sdpa-cudnn" else ""))
    print(kern.source)
    return 0


def cmd_viz(pattern: ac.Pattern, args) -> int:
    _require_values(pattern)
    if not 0 <= args.head < args.heads:
        raise InputError(f"--head {args.head} is outside 0..{args.heads - 1}")
    heads = args.heads if "h" in pattern.free_vars() else None
    head = args.head if heads else 0
    mask, step = _mask_picture(pattern, heads, head, args.q_len, args.kv_len)
    live = mask.float().mean().item()
    sampled = f", sampled every {step[0]} queries and {step[1]} keys" if step != (1, 1) else ""
    print(f"== mask, {args.q_len} x {args.kv_len} tokens{sampled}, head {args.head}: {live:.1%} of pairs attend "
          "('#' attends, '.' does not, '+' a downsampled cell with both)")
    print(ascii_mask(mask, args.width))
    blocks = None
    create_block_mask = _feature(ac, "create_block_mask")
    if create_block_mask is None:
        print("\n(no block map: this version of attncc has no attncc.create_block_mask yet)")
    else:
        bm = create_block_mask(pattern, 1, heads, args.q_len, args.kv_len, block_size=args.block)
        dense = bm.to_dense()
        blocks = dense[0, head if dense.shape[1] > 1 else 0]
        counts = [int((blocks == c).sum()) for c in (2, 1, 0)]
        print(f"\n== block map, block size {args.block}: {counts[0]} full '#', {counts[1]} partial '+', "
              f"{counts[2]} empty '.'")
        print(ascii_block_map(blocks, args.width))
    if args.output:
        save_png(args.output, mask, blocks, title=pattern.name or "")
        print(f"\nwrote {args.output}")
    return 0


PICTURE_PAIRS = 1 << 24  # (q, kv) pairs evaluated for a picture; beyond, the mask is sampled


def _mask_picture(pattern: ac.Pattern, heads, head: int, Q: int, KV: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """bool [q rows, kv columns] of the mask for one head, every (sq, sk)-th token where the whole
    Q x KV picture would pass PICTURE_PAIRS (a 1M-token mask is 10^12 pairs)."""
    if Q * KV <= PICTURE_PAIRS:
        return ac.create_mask(pattern, 1, heads, Q, KV)[0, head], (1, 1)
    from attncc.compiler import domain, evaluate

    side = int(PICTURE_PAIRS ** 0.5)
    sq, sk = -(-Q // side), -(-KV // side)
    mask = evaluate.token_mask(pattern)
    domain.check_domain(pattern, (mask,), 1, heads or 1, Q, KV)
    env = {"b": torch.tensor(0), "h": torch.tensor(head),
           "q": torch.arange(0, Q, sq).view(-1, 1), "kv": torch.arange(0, KV, sk).view(1, -1)}
    live = evaluate.evaluate(mask, env, pattern.params, pattern.buffers).bool()
    return live.expand(env["q"].shape[0], env["kv"].shape[1]), (sq, sk)


def cmd_check(pattern: ac.Pattern, args) -> int:
    from attncc.testing import check_pattern

    _require_values(pattern)
    dims = {"head_dims": (args.head_dim,)} if args.head_dim else {}
    if args.backend != "auto":
        dims["kernel_options"] = {"backend": args.backend}
    if args.dtype:
        dims["dtypes"] = (getattr(torch, args.dtype),)
    if not args.decode:
        dims["decode"] = False
    try:
        print(check_pattern(pattern, max_examples=args.examples, max_len=args.q_len, **dims))
    except ValueError as e:  # what was asked cannot run here (fa4 on a CPU), not a failing pattern
        raise InputError(str(e)) from None
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_explain(pattern: ac.Pattern, args) -> int:
    explain = _feature(ac, "explain")
    if explain is None:
        raise Missing("this version of attncc has no cost model yet (attncc.explain is missing)")
    _require_values(pattern)
    if args.target:
        if args.dtype is None:
            args.dtype = "bfloat16"
        q, k, v = (t.to("meta") for t in _inputs(args, device="cpu"))
        print(explain(pattern, q, k, v, target=args.target, **({"png": args.png} if args.png else {})))
    else:
        print(explain(pattern, *_inputs(args), **({"png": args.png} if args.png else {})))
    if args.png:
        print(f"\nwrote {args.png}")
    return 0


def cmd_calibrate(args) -> int:
    from .compiler import cost
    from .compiler.codegen import TileConfig
    from .runtime.calibrate import calibrate

    if not args.smoke and not torch.cuda.is_available():
        raise Missing("calibrate measures a GPU: this machine has no CUDA device (--smoke runs a CPU dry run)")
    path, base = None, None
    for D in args.head_dim or cost.HEAD_DIM_CLASSES:  # each class into the profile the one before wrote
        if args.smoke:
            path = calibrate(torch.device("cpu"), B=1, H=1, N=64, D=D, out=Path(args.out) if args.out else None,
                             candidates=(TileConfig(32, 32, 4, 1),), base=base)
        else:
            path = calibrate(torch.device("cuda"), D=D, out=Path(args.out) if args.out else None, base=base,
                             log=lambda line: print(line, flush=True))
        base = cost.read_profile(path)
    print(f"wrote {path}")
    print(path.read_text())
    return 0


def cmd_bench(args) -> int:
    runner = Path(ac.__file__).resolve().parent.parent / "benchmarks" / "suite.py"
    if not runner.is_file():
        raise Missing(f"the benchmark suite is not available: {runner} does not exist")
    return subprocess.call([sys.executable, str(runner), *args.rest])


# ------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attncc", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help: str, lengths: bool = True) -> argparse.ArgumentParser:
        """A verb on a PATTERN; `lengths`: it takes the call's sizes (check draws its own)."""
        p = verbs.add_parser(name, help=help, description=help)
        p.add_argument("pattern", metavar="PATTERN", help="DSL text, a .attn file, or module:function")
        p.add_argument("--bind", action="append", default=[], metavar="NAME=VALUE",
                       help="a param's value, or a buffer's values as comma-separated numbers (repeatable)")
        if lengths:
            p.add_argument("--q-len", type=_positive, default=None,
                           help="query length (default: the tokens of the pattern's layout, else 128)")
            p.add_argument("--kv-len", type=_positive, default=None, help="key length (default: --q-len)")
            p.add_argument("--heads", type=_positive, default=2, help="query heads (default 2)")
        else:
            p.add_argument("--q-len", type=_positive, default=64,
                           help="the longest query and key lengths drawn (default 64)")
        p.add_argument("--head-dim", type=_head_dim, default=None,
                       help="head dim D, 16..256 (default 64; check: 16, 24, 32 and 64)")
        p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                       help="input dtype (default: bfloat16 on a GPU, float32 on CPU)")
        return p

    show = verb("show", "print the pattern, its IR and the generated source")
    show.add_argument("--target", choices=("h200", "h100"), default=None,
                      help="print what runs on that GPU (backend and source) instead of the CPU configuration")
    viz = verb("viz", "draw the mask and the block map (ASCII, or a PNG with -o)")
    viz.add_argument("-o", "--output", metavar="FILE.png", help="write a PNG picture")
    viz.add_argument("--block", type=_block, default=128, help="block size, N or BQ,BK (default 128)")
    viz.add_argument("--head", type=int, default=0, help="which head to draw (default 0)")
    viz.add_argument("--width", type=_positive, default=64, help="ASCII picture size in cells (default 64)")
    check = verb("check", "property-test the pattern's kernels against the float64 reference", lengths=False)
    check.add_argument("--examples", type=_positive, default=5, help="random examples (default 5)")
    check.add_argument("--backend", choices=("auto", "triton", "fa4", "sdpa-cudnn"), default="auto",
                       help="the backend to test (default: the automatic choice)")
    check.add_argument("--no-decode", dest="decode", action="store_false",
                       help="skip the serving steps (paged / packed decode calls) run beside each example")
    explain = verb("explain", "the cost model's report: block map summary, tiles, predicted vs roofline time")
    explain.add_argument("--target", choices=("h200", "h100"), default=None,
                         help="explain a run on that GPU (its profile) from any machine")
    explain.add_argument("--kv-heads", type=_positive, default=None,
                         help="key/value heads (GQA; default: --heads)")
    explain.add_argument("--png", metavar="FILE.png", default=None,
                         help="also draw the block map and each query tile's predicted load")
    calibrate = verbs.add_parser("calibrate", help="measure this GPU's profile for the cost model (attncc explain)")
    calibrate.add_argument("--out", metavar="FILE.json", default=None,
                           help="where to write it (default: the attncc cache's profiles/, found by explain)")
    calibrate.add_argument("--head-dim", type=_head_dim, action="append", default=None,
                           help="a head dim to measure (repeatable; default 64, 128 and 256): the figures of its "
                                "class (up to 64, 128, 256) replace the profile's")
    calibrate.add_argument("--smoke", action="store_true", help="a tiny dry run on CPU (Triton's interpreter)")
    bench = verbs.add_parser("bench", help="run the benchmark suite (arguments go to benchmarks/suite.py)")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the suite")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _head_dim(text: str) -> int:
    value = _positive(text)
    if not kernel_head_dim(value):
        raise argparse.ArgumentTypeError(f"attncc's kernels take head dims 16..256, got {text}")
    return value


def _block(text: str) -> int | tuple[int, int]:
    sizes = [_positive(x) for x in text.split(",")]
    if len(sizes) > 2:
        raise argparse.ArgumentTypeError(f"block size is N or BQ,BK, got {text}")
    return sizes[0] if len(sizes) == 1 else (sizes[0], sizes[1])


COMMANDS = {"show": cmd_show, "viz": cmd_viz, "check": cmd_check, "explain": cmd_explain}


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]); returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.verb == "bench":
            return cmd_bench(args)
        if args.verb == "calibrate":
            return cmd_calibrate(args)
        pattern = load_pattern(args.pattern, args.bind)
        if args.q_len is None:  # a neighbourhood's canvas, say, whole
            args.q_len = pattern.layout.n if pattern.layout is not None else 128
        if getattr(args, "kv_len", 0) is None:
            args.kv_len = args.q_len
        return COMMANDS[args.verb](pattern, args)
    except (ac.DSLError, ac.PatternError, InputError) as e:
        print(f"attncc {args.verb}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`attncc show ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Missing as e:
        print(f"attncc {args.verb}: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a failure inside attncc or the user's code: say what, without a traceback
        print(f"attncc {args.verb}: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
