"""Decode: a few new queries per sequence against a long KV cache, as effective bandwidth (bytes of
the keys and values the call must read / time), beside the device's copy bandwidth, FlexAttention's
decode backend and SDPA, in one process — a benchmark, not a test.

    python benchmarks/decode.py [--batches 1,16,64] [--kv 8192,32768,131072] [--q-lens 1,8]
                                [--patterns causal,sinks,document] [--splits auto] [--out-dir DIR] [--smoke]

Per row (Hq 32 / Hkv 8, D 128, bf16): attncc's split-KV decode kernel on a paged cache (page_size
64, read in place) with the splits the cost model picks ("paged"), and on the dense cache for each
--splits value ("auto" or a forced S), and on the same sequences packed ("packed": cu_seqlens,
read in place as pages of one-token stride); FlexAttention (torch.compile'd flex_attention with
kernel_options BACKEND="TRITON_DECODE" where this torch has it, else its default dispatch, which
sends short queries to flex_decoding); SDPA (causal only: lower-right causal for Q_LEN > 1). The
queries are each sequence's last Q_LEN tokens. Bytes counted: the keys live for some query of the
sequence (causal: all; sinks: 4 + the 1024-key window; document: the last document), times
B * Hkv * 2 * D * 2 bytes. copy: a torch copy of a 4 GiB tensor (read + write bytes / time). Every
attncc output is checked against FlexAttention's (on CPU the float64 oracle) before it is timed.
Times: CUDA graphs where the callable captures (triton.testing.do_bench_cudagraph), else
do_bench; the table says which. --smoke: tiny shapes on CPU (the times mean nothing).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import attncc as ac  # noqa: E402
from attncc.runtime.calibrate import time_ms  # noqa: E402
from attncc.runtime.decode import DecodeKernel  # noqa: E402
from benchmarks.report import write_table  # noqa: E402

PAGE_SIZE = 64
SINKS, WINDOW = 4, 1024


def native_mask(name: str, kv: int, device):
    """mask_mod over positions within the sequence (queries at its last positions)."""
    if name == "causal":
        def native(b, h, q, k):
            return q >= k
    elif name == "sinks":
        def native(b, h, q, k):
            return (q >= k) & ((k < SINKS) | (q - k <= WINDOW))
    elif name == "document":
        ids = ac.patterns.lengths_to_ids([kv // 4, kv // 2, kv - kv // 4 - kv // 2], device=device)

        def native(b, h, q, k):
            return (ids[q] == ids[k]) & (q >= k)
    else:
        raise ValueError(f"unknown decode pattern {name!r}")
    return native


def bandwidth(ms: float, nbytes: int) -> float:
    return nbytes / (ms * 1e-3) / 1e12  # TB/s


def timed(fn, device, rep: int = 50) -> tuple[float, str]:
    """(ms, how): a CUDA graph of fn replayed (for `rep` ms) where it captures, else triton's do_bench."""
    if device.type == "cuda":
        import triton

        fn()
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=rep), "graph"
        except Exception:  # noqa: BLE001 — a callable that cannot be captured is timed plainly
            torch.cuda.synchronize()
    return time_ms(fn, device), "plain"


def flex_decode(device):
    """(fn(q, k, v, block_mask), label): torch.compile'd flex_attention forced onto its decode
    backend where torch has the option, else its default dispatch; (None, None) on CPU."""
    if device.type != "cuda":
        return None, None
    from torch.nn.attention.flex_attention import flex_attention

    import torch._dynamo

    # one specialisation per row's shapes: past dynamo's default limit (8) it would fall back to
    # flex's eager dense math, which materialises B*Hq*Q_LEN*KV scores (out of memory at 128K)
    torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 4096
    compiled = torch.compile(flex_attention, dynamic=False)
    forced = {"BACKEND": "TRITON_DECODE"}
    probe = torch.randn(1, 8, 1, 64, device=device, dtype=torch.bfloat16)
    kv = torch.randn(1, 8, 256, 64, device=device, dtype=torch.bfloat16)
    try:
        compiled(probe, kv, kv, kernel_options=forced)
    except Exception:  # noqa: BLE001 — no BACKEND option in this torch
        return (lambda q, k, v, bm: compiled(q, k, v, block_mask=bm, enable_gqa=True)), "flex (default)"
    return (lambda q, k, v, bm: compiled(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=forced)), \
        "flex (TRITON_DECODE)"


def live_keys(native, q_len: int, kv: int, device) -> int:
    """Keys live for some query of a sequence of kv keys whose last q_len tokens are the queries."""
    q = torch.arange(kv - q_len, kv, device=device)[:, None]
    k = torch.arange(kv, device=device)[None, :]
    zero = torch.zeros((), dtype=torch.long, device=device)
    return int(native(zero, zero, q, k).any(0).sum())


def copy_tbps(device) -> float:
    src = torch.empty(1 << 31 if device.type == "cuda" else 1 << 20, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return bandwidth(time_ms(lambda: dst.copy_(src), device), 2 * src.numel() * src.element_size())


def paged_copy(k: torch.Tensor, v: torch.Tensor, g: torch.Generator):
    """(page_table int32 [B, pages], [k_cache, v_cache] [B * pages, PAGE_SIZE, Hkv, D]): the same
    keys and values in pages, sequence b's in a shuffled set of them (the tail of its last page 0)."""
    B, Hkv, KV, D = k.shape
    pages = -(-KV // PAGE_SIZE)
    table = torch.randperm(B * pages, device=k.device, generator=g).int().view(B, pages)
    caches = []
    for t in (k, v):
        cache = t.new_zeros(B * pages, PAGE_SIZE, Hkv, t.shape[3])
        for b in range(B):  # one sequence at a time: a padded copy of the whole cache would not fit
            padded = torch.nn.functional.pad(t[b].transpose(0, 1), (0, 0, 0, 0, 0, pages * PAGE_SIZE - KV))
            cache[table[b].long()] = padded.unflatten(0, (pages, PAGE_SIZE))
        caches.append(cache)
    return table, caches


def packed_copy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[list, dict]:
    """([q, k, v] with the B sequences concatenated, [1, H, B * len, D], {cu_seqlens_q, cu_seqlens_k}
    int32 [B + 1]): the dense batch as one packed call."""
    B, q_len, kv = q.shape[0], q.shape[2], k.shape[2]
    cu = lambda n: torch.arange(0, (B + 1) * n, n, dtype=torch.int32, device=q.device)  # noqa: E731
    return [t.transpose(0, 1).flatten(1, 2)[None] for t in (q, k, v)], dict(cu_seqlens_q=cu(q_len),
                                                                            cu_seqlens_k=cu(kv))


def error_line(e: Exception) -> str:
    """The informative line of an exception's text: inductor ends its messages with advice on
    logging, the cause sits on the last line naming an error before it."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip() and "TORCHDYNAMO_VERBOSE" not in x]
    named = [x for x in lines if "Error" in x]
    return f"{type(e).__name__}: {(named or lines or [''])[-1][:160]}"


def run_row(name, B, KV, q_len, splits, device, dtype, flex) -> dict:
    Hq, Hkv, D = (32, 8, 128) if device.type == "cuda" else (4, 2, 16)
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, Hq, q_len, D, device=device, dtype=dtype, generator=g)
    k, v = (torch.randn(B, Hkv, KV, D, device=device, dtype=dtype, generator=g) for _ in range(2))
    native = native_mask(name, KV, device)
    offset = KV - q_len

    def dense_mask(b, h, q, k):  # the dense call: query i is index i, at position KV - q_len + i
        return native(b, h, q + offset, k)
    pattern = ac.Pattern(dense_mask, name=name)
    nbytes = B * Hkv * live_keys(native, q_len, KV, device) * 2 * D * k.element_size()
    row = {"pattern": name, "B": B, "KV": KV, "Q_LEN": q_len, "live_MB": nbytes / 1e6}
    want = ac.reference(q[:1], k[:1], v[:1], pattern) if flex is None else None
    if flex is not None:
        from torch.nn.attention.flex_attention import create_block_mask

        bm = create_block_mask(dense_mask, None, None, q_len, KV, device=device)
        try:
            row["flex_tbps"] = bandwidth(timed(lambda: flex(q, k, v, bm), device)[0], nbytes)
        except Exception as e:  # noqa: BLE001 — flex's failure is a result of the row, not the end of the run
            row["flex_error"] = error_line(e)
        want = ac.reference(q[:1], k[:1], v[:1], pattern) if "flex_error" in row else flex(q, k, v, bm)[:1].double()
    if name == "causal" and device.type == "cuda":
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(q_len, KV) if q_len > 1 else None
        row["sdpa_tbps"] = bandwidth(timed(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=True), device)[0], nbytes)

    def measure(label, kern, *args, **kwargs):
        err = ((kern(*args, **kwargs)[:1].double() - want).norm() / want.norm()).item()
        if err > 2e-2:
            row[label] = f"FAILED (rel err {err:.1e})"
            return
        ms, how = timed(lambda: kern(*args, **kwargs), device)
        row[f"{label}_tbps"], row["timing"] = bandwidth(ms, nbytes), how

    for S in splits:  # the dense cache
        options = {"decode": True} | ({} if S == "auto" else {"kv_splits": S})
        kern = ac.compile(pattern, q, k, v, kernel_options=options)
        row[f"attncc_{S}_splits"] = kern.config["kv_splits"]
        measure(f"attncc_{S}", kern, q, k, v)
    if device.type == "cuda" and 4 * k.numel() * k.element_size() > 0.9 * torch.cuda.mem_get_info()[1]:
        row["paged"], row["paged_splits"] = "skipped (the dense and paged caches together exceed memory)", "—"
        row["packed"], row["packed_splits"] = "skipped", "—"
        return row
    # the same sequences packed (cu_seqlens): read in place by the decode kernel
    if not fits(2 * k.numel() * k.element_size(), device):
        row["packed"], row["packed_splits"] = "skipped (no memory for the packed copy)", "—"
        return _paged_columns(row, name, native, q, k, v, g, device, measure)
    (qp, kp, vp), lens = packed_copy(q, k, v)
    kern = DecodeKernel(ac.Pattern(native, name=name), qp, kp, vp, **lens)
    err = ((kern(qp, kp, vp, **lens)[0, :, :q_len].double() - want[0]).norm() / want.norm()).item()  # sequence 0
    if err > 2e-2:
        row["packed"] = f"FAILED (rel err {err:.1e})"
    else:
        row["packed_tbps"] = bandwidth(timed(lambda: kern(qp, kp, vp, **lens), device)[0], nbytes)
    row["packed_splits"] = kern.config["kv_splits"]
    qp = kp = vp = kern = None
    return _paged_columns(row, name, native, q, k, v, g, device, measure)


def fits(nbytes: int, device) -> bool:
    """Whether `nbytes` more fit in the GPU's free memory (after returning the allocator's cached
    blocks), with 5% to spare; always on CPU."""
    if device.type != "cuda":
        return True
    gc.collect()
    torch.cuda.empty_cache()
    return nbytes * 1.05 < torch.cuda.mem_get_info(device)[0]


def _paged_columns(row, name, native, q, k, v, g, device, measure) -> dict:
    """The paged column of run_row: the same cache in pages of PAGE_SIZE, read in place."""
    if not fits(2 * k.numel() * k.element_size(), device):
        row["paged"], row["paged_splits"] = "skipped (no memory for the paged copy)", "—"
        return row
    B, KV = k.shape[0], k.shape[2]
    table, caches = paged_copy(k, v, g)  # the dense cache stays alive beside it: peak = both
    lens = torch.full((B,), KV, dtype=torch.int32, device=device)
    kern = ac.compile(ac.Pattern(native, name=name), q, *caches, page_table=table, kv_lens=lens,
                      kernel_options={"decode": True})
    row["paged_splits"] = kern.config["kv_splits"]
    measure("paged", kern, q, *caches, page_table=table, kv_lens=lens)
    return row


def table_lines(rows: list[dict], splits: list, flex_label: str, title: str) -> list[str]:
    """The markdown table of run_row's rows (dense columns for each of `splits`), flex's failures below."""
    fmt = lambda x: f"{x:.2f}" if isinstance(x, float) else ("—" if x is None else str(x))  # noqa: E731
    dense = [f"attncc dense {S}" for S in splits]
    head = ["pattern", "B", "KV", "Q_LEN", "live MB", "copy", "attncc paged (S)", "attncc packed (S)", *dense, flex_label,
            "sdpa", "paged / flex", "paged / copy", "timing"]
    lines = [title, "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        paged, flex_tbps = r.get("paged_tbps"), r.get("flex_tbps")
        cells = [r["pattern"], r["B"], r["KV"], r["Q_LEN"], f"{r['live_MB']:.1f}", fmt(r["copy_tbps"]),
                 f"{fmt(paged if paged is not None else r.get('paged'))} ({r['paged_splits']})",
                 f"{fmt(r.get('packed_tbps', r.get('packed')))} ({r.get('packed_splits', '—')})",
                 *[f"{fmt(r.get(f'attncc_{S}_tbps', r.get(f'attncc_{S}')))} ({r[f'attncc_{S}_splits']})"
                   for S in splits],
                 "failed" if "flex_error" in r else fmt(flex_tbps), fmt(r.get("sdpa_tbps")),
                 f"{paged / flex_tbps:.2f}×" if isinstance(paged, float) and flex_tbps else "—",
                 f"{paged / r['copy_tbps']:.0%}" if isinstance(paged, float) else "—", r.get("timing", "—")]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines + [f"- flex failed at {r['pattern']} B{r['B']} KV{r['KV']} Q_LEN {r['Q_LEN']}: {r['flex_error']}"
                    for r in rows if "flex_error" in r]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--kv", default="8192,32768,131072")
    ap.add_argument("--q-lens", default="1,8")
    ap.add_argument("--patterns", default="causal,sinks,document")
    ap.add_argument("--splits", default="auto", help="dense rows: 'auto' (the cost model) and/or forced S values")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Triton's interpreter)")
    args = ap.parse_args(argv)
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batches, kvs, q_lens = (ints(args.batches), ints(args.kv), ints(args.q_lens)) if not args.smoke \
        else ([1], [96], [1])
    splits = [x if x == "auto" else int(x) for x in args.splits.split(",")]
    flex, flex_label = flex_decode(device)
    copy = copy_tbps(device)
    rows = []
    for name in args.patterns.split(","):
        for B in batches:
            for KV in kvs:
                for ql in q_lens:
                    rows.append(run_row(name, B, KV, ql, splits, device, dtype, flex) | {"copy_tbps": copy})
                    print({k: round(x, 3) if isinstance(x, float) else x for k, x in rows[-1].items()}, flush=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = table_lines(rows, splits, flex_label or "flex",
                        f"Effective bandwidth, TB/s (live KV bytes / time) on {gpu}, torch {torch.__version__}")
    print("\n".join(lines))
    write_table(args.out_dir, "decode", rows, lines)
    return rows


if __name__ == "__main__":
    main()
