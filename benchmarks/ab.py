"""A/B of attncc's forward against an earlier version of itself, both in one process, interleaved
(base, this, base, this per pattern; the better of each pair), bf16 at the main shape.

    python benchmarks/ab.py --extract REV        # here: git archive REV's attncc to .ab/attncc_base
    python benchmarks/ab.py [--patterns swa1024,document,...] [--backward]   # on the GPU (carry .ab)
    python benchmarks/ab.py --decode [causal:1:1,sinks:16:8,...]            # decode rows instead

Run-to-run spread on the H200 is about 5%: a fresh process's first measurements (idle clocks) run
low, so the GPU is warmed first and each version is timed twice. Both are forced onto attncc's own
kernel (never the cuDNN dispatch). --backward times forward+backward (3.5x the forward's FLOPs)
and checks that both versions' gradients agree. --decode times paged and packed decode calls instead
(rows pattern:B:Q_LEN at an 8K-token cache, Hq 32 / Hkv 8, D 128, benchmarks/decode.py's masks,
pages and effective bandwidth; CUDA-graph replays, the better of two per version; --smoke: 128-token
caches on CPU, run with TRITON_INTERPRET=1).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, ".ab")


def extract(rev: str) -> None:
    """REV's attncc package as .ab/attncc_base (its imports are relative, so the rename works)."""
    shutil.rmtree(BASE, ignore_errors=True)
    os.makedirs(BASE)
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "attncc"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", BASE], input=archive, check=True)
    os.rename(os.path.join(BASE, "attncc"), os.path.join(BASE, "attncc_base"))
    print(f"{rev} -> {BASE}/attncc_base")


def patterns(ac, N: int, H: int, device) -> dict:
    from benchmarks.patterns import document_lengths

    ids = ac.patterns.lengths_to_ids(document_lengths(N), device=device)
    try:
        document = ac.patterns.document(ids=ids)
    except TypeError:  # a base revision from before document(lengths, offsets, causal, ids)
        document = ac.patterns.document(ids)
    return {"swa1024": ac.patterns.sliding_window(1024), "document": document,
            "dilated": ac.patterns.dilated(2048, 4, seq_len=N), "prefixlm2048": ac.patterns.prefix_lm(2048),
            "natten2d": ac.patterns.natten2d(64, 128, 17), "natten3d": ac.patterns.neighborhood((8, 32, 32), (5, 9, 9)),
            "alibi": ac.patterns.alibi(H, device=device), "softcap": ac.patterns.softcap(30.0),
            "causal": ac.patterns.causal()}


DECODE_ROWS = "causal:1:1,causal:1:8,sinks:1:1,sinks:1:8,document:1:1,document:1:8,causal:16:8,document:16:8"


def decode_ab(attncc, attncc_base, rows: str, KV: int = 8192, smoke: bool = False) -> None:
    """Paged and packed decode calls of both versions, interleaved, as TB/s of live KV bytes
    (smoke: tiny shapes on CPU, in Triton's interpreter; the times mean nothing)."""
    import importlib

    import torch
    from benchmarks.decode import bandwidth, live_keys, native_mask, packed_copy, paged_copy, timed

    dev = torch.device("cpu" if smoke else "cuda")
    Hq, Hkv, D = (4, 2, 16) if smoke else (32, 8, 128)
    dtype = torch.float32 if smoke else torch.bfloat16
    kernels = {m: importlib.import_module(f"{m.__name__}.runtime.decode").DecodeKernel for m in (attncc, attncc_base)}
    gpu = "CPU" if smoke else torch.cuda.get_device_name()
    print(f"{gpu} torch {torch.__version__}: decode at KV {KV}, TB/s of live KV bytes")
    print("| row | splits | paged base | paged this | this/base | packed base | packed this | this/base |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for spec in rows.split(","):
        name, B, q_len = spec.split(":")[0], *map(int, spec.split(":")[1:])
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(B, Hq, q_len, D, device=dev, dtype=dtype, generator=g)
        k, v = (torch.randn(B, Hkv, KV, D, device=dev, dtype=dtype, generator=g) for _ in range(2))
        native = native_mask(name, KV, dev)
        nbytes = B * Hkv * live_keys(native, q_len, KV, dev) * 2 * D * k.element_size()
        table, caches = paged_copy(k, v, g)
        lens = torch.full((B,), KV, dtype=torch.int32, device=dev)
        packed, cu = packed_copy(q, k, v)
        calls = {}
        for m in (attncc_base, attncc):
            pat = m.Pattern(native, name=name)
            paged = m.compile(pat, q, *caches, page_table=table, kv_lens=lens, kernel_options={"decode": True})
            pk = kernels[m](pat, *packed, **cu)
            calls[m] = {"paged": lambda paged=paged: paged(q, *caches, page_table=table, kv_lens=lens),
                        "packed": lambda pk=pk: pk(*packed, **cu), "splits": paged.config["kv_splits"]}
        best = {}
        for m in (attncc_base, attncc, attncc_base, attncc):
            for col in ("paged", "packed"):
                tbps = bandwidth(timed(calls[m][col], dev)[0], nbytes)
                best[m, col] = max(best.get((m, col), 0.0), tbps)
        cells = []
        for col in ("paged", "packed"):
            same = torch.equal(calls[attncc_base][col](), calls[attncc][col]())
            base, this = best[attncc_base, col], best[attncc, col]
            cells += [f"{base:.2f}", f"{this:.2f}", f"{this / base:.3f}{'' if same else ' (outputs differ)'}"]
        print(f"| {name} B{B} Q{q_len} | {calls[attncc]['splits']} | " + " | ".join(cells) + " |", flush=True)
        del q, k, v, caches, packed, calls
        if not smoke:
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--extract", metavar="REV", help="prepare .ab/attncc_base from git revision REV and exit")
    ap.add_argument("--patterns", default="swa1024,document,dilated,prefixlm2048,alibi,softcap,causal,natten2d,natten3d")
    ap.add_argument("--backward", action="store_true", help="time forward+backward instead of the forward")
    ap.add_argument("--base-dir", default=BASE, help="the folder holding attncc_base (default .ab)")
    ap.add_argument("--decode", nargs="?", const=DECODE_ROWS, default=None, metavar="ROWS",
                    help=f"decode rows pattern:B:Q_LEN instead of the forward (default {DECODE_ROWS})")
    ap.add_argument("--smoke", action="store_true", help="with --decode: tiny shapes on CPU (Triton's interpreter)")
    args = ap.parse_args()
    if args.extract:
        return extract(args.extract)
    import torch
    import triton

    sys.path[:0] = [args.base_dir, ROOT]
    import attncc
    import attncc_base
    if args.decode:
        return decode_ab(attncc, attncc_base, args.decode, KV=128 if args.smoke else 8192, smoke=args.smoke)
    from benchmarks.patterns import build, count_live_pairs

    B, H, N, D = 4, 16, 8192, 128
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    dout = torch.randn(B, H, N, D, device=dev, dtype=torch.bfloat16, generator=g)
    if args.backward:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), warmup=500, rep=500)
    versions = {"base": (attncc_base, patterns(attncc_base, N, H, dev)), "this": (attncc, patterns(attncc, N, H, dev))}
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} B={B} H={H} N={N} D={D}")
    flops = 4 * D * (3.5 if args.backward else 1.0)
    print(f"{'forward+backward' if args.backward else 'forward'}, effective TFLOP/s")
    print("| pattern | base | this | this/base |\n|---|---:|---:|---:|")
    for name in args.patterns.split(","):
        live = count_live_pairs(build(name, N, H, device=dev).mask_mod, 1, 1, N, N, device=dev)[0] * B * H
        best, grads = {}, {}
        for which in ("base", "this", "base", "this"):
            ac, pats = versions[which]

            def fn():
                out = ac.attention(q, k, v, pats[name], kernel_options={"backend": "triton"})
                if args.backward:
                    return torch.autograd.grad(out, (q, k, v), dout)
                return out
            grads[which] = fn()
            ms = triton.testing.do_bench(fn, warmup=100, rep=400)
            best[which] = max(best.get(which, 0.0), flops * live / (ms * 1e-3) / 1e12)
        same = all(torch.equal(a, b) for a, b in zip(grads["base"], grads["this"])) if args.backward else \
            torch.equal(grads["base"], grads["this"])
        print(f"| {name} | {best['base']:.0f} | {best['this']:.0f} | {best['this'] / best['base']:.3f} |"
              f"{'' if same else ' outputs differ'}", flush=True)


if __name__ == "__main__":
    main()
