"""Property testing of patterns against the float64 oracle.

`check_pattern(pat)` runs the compiled kernel on random inputs of random shapes (odd lengths,
Q_LEN != KV_LEN, GQA, several head dims) and compares output, LSE and gradients (q, k, v and the
pattern's float buffers) with `attncc.reference`, and the block classification with the dense mask;
beside each example a serving step (`compare_decode`: paged or packed, the decode kernel).
Hypothesis strategies for users' own tests: `patterns()` (random IR patterns: affine and modular
masks with a score mod; attncc's own tests call it `random_patterns`), `shapes()` and `inputs()`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from .compiler import evaluate
from .compiler.blockmask import EMPTY, FULL
from .dsl import ir
from .dsl.pattern import Pattern
from .patterns._checks import count, flag
from .runtime.inputs import kernel_head_dim

SHRINK_SECONDS = 30.0  # how long check_pattern looks for a smaller failing example
# relative error bounds of ||out - ref|| / ||ref|| per input dtype (DESIGN.md section 7)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
GRAD_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}


@dataclass
class CheckReport:
    """What check_pattern ran: one row per call (shape, dtype, errors; a serving step's row names
    its "decode" mode, paged or packed)."""
    pattern: Pattern
    rows: list = field(default_factory=list)

    def __str__(self) -> str:
        worst = max((r["out_err"] for r in self.rows), default=float("nan"))
        steps = sum("decode" in r for r in self.rows)
        return (f"{len(self.rows) - steps} examples and {steps} serving steps passed for {self.pattern!r}; "
                f"worst relative error {worst:.2e}")


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """||a - b|| / ||b||, the denominator at least floor * sqrt(numel) (an RMS of `floor`)."""
    denom = max(b.norm().item(), floor * b.numel() ** 0.5)
    return (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()


def compare(pattern: Pattern, q, k, v, scale=None, kernel_options: dict | None = None) -> dict:
    """Run the kernel (`kernel_options` as for ac.attention, e.g. {"backend": "fa4"}) and the
    oracle on (q, k, v); return errors; raise AssertionError on mismatch.

    NaN must sit exactly where the oracle has it (a NaN input or score at a live position); rows
    with no live key must be zeros with lse = -inf; the rest within TOLERANCE[dtype] (relative
    errors; lse's absolute where its values are below 1 in magnitude).
    """
    from .runtime.api import attention, reference

    out, lse = attention(q, k, v, pattern, scale=scale, return_lse=True, kernel_options=kernel_options)
    ref, ref_lse = reference(q, k, v, pattern, scale=scale, return_lse=True)
    row = {"q": tuple(q.shape), "k": tuple(k.shape), "dtype": str(q.dtype)}
    return _against_oracle(pattern, out, lse, ref, ref_lse, q.dtype, row)


def _against_oracle(pattern: Pattern, out, lse, ref, ref_lse, dtype, row: dict) -> dict:
    """`row` with the errors of (out, lse) against the oracle's (ref, ref_lse); AssertionError on
    a mismatch (the rules of `compare`)."""
    tol = TOLERANCE[dtype]
    where = f"for {pattern!r} with {row}"
    for name, got, want in (("output", out, ref), ("lse", lse, ref_lse)):
        if not torch.equal(torch.isnan(got), torch.isnan(want)):
            raise AssertionError(f"NaN in the {name} at {int(torch.isnan(got).sum())} places, in the oracle's at "
                                 f"{int(torch.isnan(want).sum())} {where}")
    empty = torch.isinf(ref_lse) & (ref_lse < 0)
    if not torch.equal(torch.isinf(lse.double()) & (lse < 0), empty):
        raise AssertionError(f"rows with no live key differ from the reference (lse must be -inf exactly there) {where}")
    if empty.any() and out.double()[empty].nan_to_num().abs().max() > 0:
        raise AssertionError(f"a row with no live key has a non-zero output {where}")
    finite = ~torch.isnan(ref)
    out_err = _rel(out.double()[finite], ref[finite])
    ok_lse = ~empty & ~torch.isnan(ref_lse)
    # lse's error is absolute where |lse| < 1: an error in lse is a relative error of every softmax
    # weight of its row, and a row of one score near 0 has an lse near 0 (rounding alone is then
    # a large relative error: fuzzing found lse -2.1e-4, off by 5e-11)
    lse_err = _rel(lse.double()[ok_lse], ref_lse[ok_lse], floor=1.0) if ok_lse.any() else 0.0
    row = {**row, "out_err": out_err, "lse_err": lse_err}
    if not (out_err <= tol and lse_err <= tol):
        raise AssertionError(f"{pattern!r}: relative error out {out_err:.2e}, lse {lse_err:.2e} > {tol:.0e} for {row}")
    return row


def compare_decode(pattern: Pattern, q, k, v, kv_lens: list[int], packed: bool = False, page_size: int = 16,
                   scale=None, seed: int = 0, kernel_options: dict | None = None) -> dict:
    """A serving step, checked as `compare` checks a call: q [S, Hq, Q_LEN, D] the last Q_LEN
    queries of S sequences whose keys and values are k, v [S, Hkv, >= max(kv_lens), D|Dv] up to
    kv_lens[s] (each 0 or at least Q_LEN), run by ac.attention from paged caches (pages of
    `page_size` keys, shuffled in a pool) or, `packed`, from the sequences concatenated
    (cu_seqlens; an empty sequence then has no queries). The oracle: `reference` on each sequence
    whole, its earlier queries random, at batch index s (the pattern's b is the sequence)."""
    from .runtime.api import attention, reference

    S, Hq, Q_LEN, D = q.shape
    Hkv, Dv, dev = k.shape[1], v.shape[3], q.device
    if (len(kv_lens) != S or any(n != 0 and n < Q_LEN for n in kv_lens) or not 0 < max(kv_lens) <= k.shape[2]):
        raise ValueError(f"kv_lens {kv_lens} must be S = {S} lengths, each 0 or in [Q_LEN = {Q_LEN}, "
                         f"{k.shape[2]}], not all 0")
    gen = torch.Generator().manual_seed(seed)
    ref = torch.zeros(S, Hq, Q_LEN, Dv, dtype=torch.float64, device=dev)
    ref_lse = torch.full((S, Hq, Q_LEN), -torch.inf, dtype=torch.float64, device=dev)
    for b, n in enumerate(kv_lens):
        if n:
            whole = torch.randn(b + 1, Hq, n, D, generator=gen).to(dev, q.dtype)
            whole[b, :, n - Q_LEN:] = q[b]
            o, lse = reference(whole, k[:b + 1, :, :n], v[:b + 1, :, :n], pattern, scale=scale, return_lse=True)
            ref[b], ref_lse[b] = o[b, :, n - Q_LEN:], lse[b, :, n - Q_LEN:]
    live = [b for b, n in enumerate(kv_lens) if n]
    if packed:
        cu = lambda lens: torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)  # noqa: E731
        out, lse = attention(torch.cat([q[b] for b in live], 1)[None],
                             *(torch.cat([t[b, :, :kv_lens[b]] for b in live], 1)[None] for t in (k, v)),
                             pattern, scale=scale, return_lse=True, kernel_options=kernel_options,
                             cu_seqlens_q=cu([Q_LEN if n else 0 for n in kv_lens]), cu_seqlens_k=cu(kv_lens))
        # [1, Hq, len(live) * Q_LEN, ...] -> [len(live), Hq, Q_LEN, ...]
        out, lse = (t[0].unflatten(1, (len(live), Q_LEN)).transpose(0, 1) for t in (out, lse))
        ref, ref_lse = ref[live], ref_lse[live]
    else:
        pages = [-(-n // page_size) for n in kv_lens]
        pool = torch.randperm(sum(pages) + 1, generator=gen).tolist()  # one page never used
        table = torch.full((S, max(1, max(pages))), -1, dtype=torch.int32)
        caches = [torch.randn(len(pool), page_size, Hkv, d, generator=gen).to(dev, q.dtype) for d in (D, Dv)]
        for b, n in enumerate(kv_lens):
            for j in range(pages[b]):
                table[b, j] = page = pool.pop()
                m = min(page_size, n - j * page_size)
                for cache, t in zip(caches, (k, v)):
                    cache[page, :m] = t[b, :, j * page_size:j * page_size + m].transpose(0, 1)
        out, lse = attention(q, *caches, pattern, scale=scale, return_lse=True, kernel_options=kernel_options,
                             page_table=table.to(dev), kv_lens=torch.tensor(kv_lens, dtype=torch.int32, device=dev))
    row = {"decode": "packed" if packed else "paged", "q": tuple(q.shape), "kv_lens": list(kv_lens),
           "dtype": str(q.dtype)}
    return _against_oracle(pattern, out, lse, ref, ref_lse, q.dtype, row)


def compare_grads(pattern: Pattern, q, k, v, scale=None, seed: int = 0, kernel_options: dict | None = None) -> dict:
    """Gradients of sum(out * w) + sum(lse * w' over live rows) for random weights w, w', by
    attncc's kernels and by float64 autograd through the oracle: for q, k, v and each float
    buffer of the pattern (taken as learnable). Returns errors; AssertionError on a mismatch
    (NaN where the oracle has none, or a relative error above GRAD_TOLERANCE[dtype])."""
    from .runtime.api import attention, reference

    learnable = [n for n, t in pattern.buffers.items() if t is not None and t.is_floating_point()]
    gen = torch.Generator().manual_seed(seed)
    w_out = torch.randn(*q.shape[:3], v.shape[3], generator=gen).to(q.device)
    w_lse = torch.randn(*q.shape[:3], generator=gen).to(q.device)

    def grads(cast, run):
        leaves = [cast(t).detach().requires_grad_() for t in (q, k, v)]
        bufs = {n: cast(pattern.buffers[n]).detach().requires_grad_() for n in learnable}
        out, lse = run(*leaves, pattern.bind(**bufs) if bufs else pattern)
        acc = torch.float64 if out.dtype == torch.float64 else torch.float32  # the oracle's, or ours
        loss = (out.to(acc) * w_out.to(acc)).sum() + torch.where(torch.isinf(lse), 0.0, lse * w_lse.to(acc)).sum()
        return torch.autograd.grad(loss, leaves + list(bufs.values()), allow_unused=True)

    ours = grads(lambda t: t, lambda q, k, v, p: attention(q, k, v, p, scale=scale, return_lse=True,
                                                           kernel_options=kernel_options))
    want = grads(lambda t: t.double(), lambda q, k, v, p: reference(q, k, v, p, scale=scale, return_lse=True))
    tol = GRAD_TOLERANCE[q.dtype]
    row = {}
    for name, a, b in zip(["q", "k", "v"] + learnable, ours, want):
        if b is None:
            continue
        if a is None:
            raise AssertionError(f"no gradient for d{name} from attncc's kernels where the oracle has one, for "
                                 f"{pattern!r}, q {tuple(q.shape)}")
        finite = ~torch.isnan(b)
        if torch.isnan(a).logical_and(finite).any():
            raise AssertionError(f"NaN in d{name} where the oracle has none for {pattern!r}, q {tuple(q.shape)}")
        row[f"d{name}_err"] = err = _rel(a.double()[finite], b[finite])
        if not err <= tol:
            raise AssertionError(f"{pattern!r}: d{name} relative error {err:.2e} > {tol:.0e}, q {tuple(q.shape)}, "
                                 f"k {tuple(k.shape)}")
    return row


def check_classification(pattern: Pattern, B: int, H: int, Q: int, KV: int, block: tuple[int, int]) -> None:
    """AssertionError unless every FULL tile of create_block_mask is wholly live and every EMPTY
    tile wholly dead in the dense mask (PARTIAL may be either: it is checked per pair)."""
    from .runtime.api import create_block_mask, create_mask

    dense = create_mask(pattern, B, H, Q, KV)
    classes = create_block_mask(pattern, B, H, Q, KV, block).to_dense()
    BM, BN = block
    pad = torch.nn.functional.pad(dense.int(), (0, -KV % BN, 0, -Q % BM), value=-1)
    tiles = pad.view(B, H, -(-Q // BM), BM, -(-KV // BN), BN).permute(0, 1, 2, 4, 3, 5).flatten(-2)
    real = tiles >= 0
    any_live = ((tiles == 1) & real).any(-1)
    all_live = ((tiles == 1) | ~real).all(-1)
    if (any_live & (classes == EMPTY)).any():
        raise AssertionError(f"an EMPTY tile of {pattern!r} holds live pairs (tiles {block}, Q {Q}, KV {KV})")
    if (~all_live & (classes == FULL)).any():
        raise AssertionError(f"a FULL tile of {pattern!r} holds dead pairs (tiles {block}, Q {Q}, KV {KV})")


@st.composite
def shapes(draw, max_len: int = 160, head_dims=(16, 24, 32, 64), max_q: int | None = None,
           max_kv: int | None = None, max_heads: int = 6, max_batch: int = 2, length: int | None = None):
    """(B, Hq, Hkv, Q_LEN, KV_LEN, D): odd lengths, cross lengths and GQA included.

    max_q / max_kv (default max_len), max_heads and max_batch cap what is drawn (check_pattern
    caps them to what the pattern's buffers cover); `length` fixes Q_LEN = KV_LEN (a layout's)."""
    max_q, max_kv = max_q or max_len, max_kv or max_len
    hkv = draw(st.sampled_from([h for h in (1, 2) if h <= max_heads]))
    group = draw(st.sampled_from([g for g in (1, 2, 3) if hkv * g <= max_heads]))
    if length is not None:
        q_len = kv_len = length
    else:
        q_len = draw(st.integers(1, max_q))
        kv_len = draw(st.one_of(st.just(min(q_len, max_kv)), st.integers(1, max_kv)))
    return draw(st.integers(1, max_batch)), hkv * group, hkv, q_len, kv_len, draw(st.sampled_from(head_dims))


_random_shapes = shapes  # check_pattern's `shapes` argument shadows the strategy's name


@st.composite
def inputs(draw, shape: tuple | None = None, dtype: torch.dtype = torch.float32, device="cpu",
           max_len: int = 160) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) of normal random values: q [B, Hq, Q_LEN, D], k and v [B, Hkv, KV_LEN, D] of
    `shape` = (B, Hq, Hkv, Q_LEN, KV_LEN, D), or of a shape drawn by `shapes(max_len)`."""
    B, Hq, Hkv, Q, KV, D = shape if shape is not None else draw(_random_shapes(max_len))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return tuple(torch.randn(*dims, generator=gen).to(device, dtype) for dims in ((B, Hq, Q, D), (B, Hkv, KV, D),
                                                                                    (B, Hkv, KV, D)))


def _listed_shapes(given_shapes) -> list[tuple[int, ...]]:
    """check_pattern's `shapes` given as a list of (B, Hq, Hkv, Q_LEN, KV_LEN, D), checked."""
    listed = [tuple(x) for x in given_shapes]
    for x in listed:
        if len(x) != 6 or not all(isinstance(n, int) and n >= 1 for n in x) or x[1] % x[2] or not kernel_head_dim(x[5]):
            raise ValueError(f"shapes must be (B, Hq, Hkv, Q_LEN, KV_LEN, D) of positive ints with Hq a multiple "
                             f"of Hkv and D in 16..256 (the kernels' head dims), got {x!r}")
    if not listed:
        raise ValueError("shapes is empty")
    return listed


def check_pattern(pattern: Pattern, shapes=None, dtypes=None, max_examples: int = 10, grad: bool = True, *,
                  device=None, max_len: int = 160, head_dims=(16, 24, 32, 64), seed: int = 0,
                  kernel_options: dict | None = None, decode: bool = True) -> CheckReport:
    """Property-test `pattern`: kernel vs `attncc.reference` on random shapes and inputs: output
    and LSE, with `grad` the gradients of q, k, v and of the pattern's float buffers (each taken as
    learnable), and the block classification (FULL / EMPTY tiles) against the dense mask. With
    `decode` each example also runs a serving step (`compare_decode`: up to 8 queries at the end
    of each of B sequences of random lengths up to KV_LEN, from paged caches or packed, which the
    split-KV decode kernel reads), unless the pattern has block predicates (which such calls refuse)
    or `kernel_options` force a backend other than Triton (which the decode kernel is).

    shapes: None (random: odd lengths, Q_LEN != KV_LEN, GQA, head dims `head_dims`, lengths up to
    `max_len`), a list of (B, Hq, Hkv, Q_LEN, KV_LEN, D), or a hypothesis strategy of them.
    dtypes: the input dtypes drawn from (default float32; bf16 / fp16 at their tolerances).

    Runs on `device` (default: CUDA if available, else CPU through Triton's interpreter, where keep
    `max_len` small). A pattern with a token layout is tested both in natural order at random
    lengths and in its layout at the layout's length. Lengths, heads and batch are capped to what the pattern's buffers cover
    (a document-id buffer of 100 tokens: lengths up to 100). Raises AssertionError naming the
    smallest failing example of each distinct failure; returns a CheckReport. `kernel_options`
    go to every ac.attention call (e.g. {"backend": "fa4"} to test the FlashAttention-4 path).
    """
    from .compiler.domain import check_domain
    from .dsl.trace import PatternError
    from .runtime.api import as_pattern

    pattern = as_pattern(pattern)
    max_examples, max_len = count("max_examples", max_examples, 1), count("max_len", max_len, 1)
    grad = flag("grad", grad)
    # serving steps test the decode kernel, which runs where no other backend is forced
    decode = (flag("decode", decode) and not pattern.has_block_mask
              and (kernel_options or {}).get("backend", "auto") in ("auto", "triton"))
    head_dims = tuple(head_dims)
    if not head_dims or not all(kernel_head_dim(d) for d in head_dims):
        raise ValueError(f"head_dims must be ints in 16..256 (the kernels' head dims), got {head_dims!r}")
    dtypes = (torch.float32,) if dtypes is None else tuple(dtypes)
    if not dtypes or any(d not in TOLERANCE for d in dtypes):
        raise ValueError(f"dtypes must be some of {sorted(map(str, TOLERANCE))}, got {dtypes!r}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = (kernel_options or {}).get("backend")
    if backend in ("fa4", "sdpa-cudnn") and torch.device(device).type != "cuda":
        raise ValueError(f"kernel_options backend={backend!r} runs on CUDA only; check_pattern runs on {device}")
    roots = (evaluate.token_mask(pattern), pattern.score)

    def defined(B, H, Q, KV) -> bool:
        try:
            check_domain(pattern, roots, B, H, Q, KV)
        except PatternError:
            return False
        return True

    if not defined(1, 1, 1, 1):
        check_domain(pattern, roots, 1, 1, 1, 1)  # raises: the pattern is undefined at any size
    caps = {"max_q": _largest(lambda n: defined(1, 1, n, 1), max_len),
            "max_kv": _largest(lambda n: defined(1, 1, 1, n), max_len),
            "max_heads": _largest(lambda n: defined(1, n, 1, 1), 6),
            "max_batch": _largest(lambda n: defined(n, 1, 1, 1), 2)}
    report = CheckReport(pattern)
    first_failure: list[float] = []
    failing: set = set()
    layout = pattern.layout
    natural = pattern if layout is None else pattern.with_layout(None)
    if shapes is not None:  # the given shapes; those of a layout's length run in the layout
        drawn = shapes
        if not isinstance(shapes, st.SearchStrategy):
            listed = _listed_shapes(shapes)
            undefined = [x for x in listed if not defined(x[0], x[1], x[3], x[4])]
            if undefined:
                raise ValueError(f"{pattern!r} is not defined at shapes {undefined} (its buffers are too short)")
            drawn = st.sampled_from(listed)
        cases = drawn.map(lambda x: (x, layout is not None and x[3] == x[4] == layout.n))
    else:
        cases = _random_shapes(max_len, head_dims, **caps).map(lambda shape: (shape, False))
        if layout is not None:
            in_layout = _random_shapes(max_len, head_dims, **{**caps, "max_q": None, "max_kv": None},
                                       length=layout.n)
            cases = st.one_of(cases, in_layout.map(lambda shape: (shape, True)))

    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=cases, dtype=st.sampled_from(list(dtypes)), data_seed=st.integers(0, 2**31 - 1))
    def run(case, dtype, data_seed):
        shape, use_layout = case
        pat = pattern if use_layout else natural
        B, Hq, Hkv, Q, KV, D = shape
        # shrinking runs the kernel again and again: stop it after SHRINK_SECONDS (the smallest
        # failing example found by then is the one reported)
        late = first_failure and time.monotonic() - first_failure[0] > SHRINK_SECONDS
        assume(not late or (case, dtype, data_seed) in failing)
        assume(defined(B, Hq, Q, KV))
        gen = torch.Generator().manual_seed(data_seed ^ seed)
        q = torch.randn(B, Hq, Q, D, generator=gen).to(device, dtype)
        k = torch.randn(B, Hkv, KV, D, generator=gen).to(device, dtype)
        v = torch.randn(B, Hkv, KV, D, generator=gen).to(device, dtype)
        try:
            row = compare(pat, q, k, v, kernel_options=kernel_options)
            if grad:
                row.update(compare_grads(pat, q, k, v, seed=data_seed, kernel_options=kernel_options))
            check_classification(pat.kernel_pattern, B, Hq, Q, KV, (16, 32))
            report.rows.append({**row, "layout": use_layout})
            if decode and defined(B, Hq, KV, KV):  # a serving step (its queries at positions up to KV - 1)
                report.rows.append(_serving_step(pat, Hq, k, v, gen, data_seed, kernel_options))
        except Exception:
            first_failure[:] = first_failure or [time.monotonic()]
            failing.add((case, dtype, data_seed))
            raise

    try:
        run()
    except BaseExceptionGroup as group:  # several distinct failures, each already shrunk
        raise AssertionError(_failures(pattern, list(group.exceptions))) from None
    except Exception as e:  # noqa: BLE001 — one failure: the same report, whatever it raised
        raise AssertionError(_failures(pattern, [e])) from None
    return report


def _serving_step(pattern: Pattern, Hq: int, k, v, gen: torch.Generator, data_seed: int, kernel_options) -> dict:
    """check_pattern's serving step beside an example whose keys are k, v [B, Hkv, KV, D]: 1-8
    queries (by data_seed) at the end of B sequences of lengths 0 or in [Q_LEN, KV] (one of KV),
    paged or packed (by data_seed's parity): compare_decode."""
    B, _, KV, D = k.shape
    Q_LEN = 1 + data_seed % min(8, KV)
    lens = [0 if int(torch.randint(5, (), generator=gen)) == 0 else int(torch.randint(Q_LEN, KV + 1, (), generator=gen))
            for _ in range(B)]
    lens[int(torch.randint(B, (), generator=gen))] = KV  # one sequence at the longest length
    q = torch.randn(B, Hq, Q_LEN, D, generator=gen).to(k.device, k.dtype)
    return compare_decode(pattern, q, k, v, lens, packed=bool(data_seed & 1), seed=data_seed,
                          kernel_options=kernel_options)


def _largest(ok, top: int) -> int:
    """The largest n in [1, top] with ok(n), ok being monotone (true up to some n); 1 if none."""
    lo, hi = 1, top
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def _failures(pattern: Pattern, errors: list[BaseException]) -> str:
    """Each failure with its smallest falsifying example (from Hypothesis' notes on it)."""
    lines = [f"check_pattern found {len(errors)} distinct failure{'s' if len(errors) > 1 else ''} of {pattern!r}:"]
    for i, e in enumerate(errors, 1):
        lines.append(f"{i}. {type(e).__name__}: {e}")
        lines += [f"   {note}" for note in getattr(e, "__notes__", ()) for note in note.splitlines()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Random patterns for attncc's own property tests.

_Q, _KV, _H = ir.Var("q"), ir.Var("kv"), ir.Var("h")


@st.composite
def affine_masks(draw, depth: int = 2) -> ir.Node:
    """Random boolean IR over q, kv (and h): affine comparisons, modular terms, and/or/not."""
    if depth == 0 or draw(st.booleans()):
        a, c = draw(st.sampled_from([(1, -1), (1, 0), (0, 1), (2, -1), (1, -2), (-1, 1)]))
        d = draw(st.integers(-40, 40))
        lhs = ir.op("add", ir.op("add", ir.op("mul", ir.const(a), _Q), ir.op("mul", ir.const(c), _KV)), ir.const(d))
        kind = draw(st.sampled_from(["cmp", "cmp", "mod", "abs", "head"]))
        if kind == "mod":
            m = draw(st.integers(2, 5))
            return ir.op("eq", ir.op("mod", lhs, ir.const(m)), ir.const(draw(st.integers(0, m - 1))))
        if kind == "abs":
            return ir.op("le", ir.op("abs", ir.op("sub", _Q, _KV)), ir.const(draw(st.integers(0, 48))))
        if kind == "head":
            return ir.op("ge", ir.op("sub", _Q, ir.op("mul", _H, ir.const(draw(st.integers(1, 20))))), _KV)
        return ir.op(draw(st.sampled_from(["ge", "gt", "le", "lt"])), lhs, ir.const(0))
    how = draw(st.sampled_from(["and", "or", "not"]))
    if how == "not":
        return ir.op("not", draw(affine_masks(depth - 1)))
    return ir.op(how, draw(affine_masks(depth - 1)), draw(affine_masks(depth - 1)))


_SCORE = ir.Var("score")
SCORE_MODS = {
    "none": _SCORE,
    "softcap": ir.op("mul", ir.const(5.0), ir.op("tanh", ir.op("truediv", _SCORE, ir.const(5.0)))),
    "alibi": ir.op("add", _SCORE, ir.op("mul", ir.op("truediv", ir.const(1.0), ir.op("add", _H, ir.const(2))),
                                        ir.op("sub", _KV, _Q))),
    "relpos": ir.op("add", _SCORE, ir.op("mul", ir.const(0.01), ir.op("abs", ir.op("sub", _Q, _KV)))),
}


@st.composite
def random_patterns(draw) -> Pattern:
    """A random Pattern: an affine/modular mask and one of SCORE_MODS."""
    mask = draw(affine_masks())
    score = SCORE_MODS[draw(st.sampled_from(sorted(SCORE_MODS)))]
    return Pattern.from_ir(mask=mask, score=score)


patterns = random_patterns  # the public name (DESIGN: hypothesis strategies for random patterns)
