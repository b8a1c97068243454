"""Block-mask construction: attncc's symbolic classifier against FlexAttention's create_block_mask.

For each pattern and N (Q_LEN = KV_LEN = N, tiles 128x128, B = H = None) it measures, in one
process: attncc's build (classes, counts, contiguity flags; index lists built on first use),
attncc with all four index lists materialised, torch's create_block_mask evaluated eagerly
("plain") and under torch.compile (first call, which compiles, and a warm call). Peak memory
is the growth over the call: RSS sampled every 0.5 ms on CPU (after malloc_trim, so freed
memory is not reused unseen), the allocator's peak on CUDA.
Where FlexAttention ran, the two block maps are compared tile by tile. Prints a markdown table.

    python benchmarks/blockmask.py                          # CPU, N = 8K, 32K, 128K, 1M
    python benchmarks/blockmask.py --device cuda --flex-plain-max 131072 --flex-compiled-max 1048576
    python benchmarks/blockmask.py --patterns natten2d --kernel-order --block 64,32   # the map kernels run

--kernel-order builds the block map in the kernels' token order (`pattern.kernel_pattern`: a
pattern's layout composed in, natten2d's 16x8 bricks), which FlexAttention has no counterpart of:
its columns stay empty.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import create_block_mask as flex_create_block_mask

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import attncc as ac  # noqa: E402
from benchmarks import patterns as bp  # noqa: E402

PATTERNS = ("causal", "swa1024", "document", "natten2d")
try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:
    _LIBC = None


class PeakMemory:
    """Peak growth of memory (bytes) while the block runs: RSS sampled on CPU, allocator on CUDA."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peak = 0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def _sample(self):
        while not self._stop.is_set():
            self._max = max(self._max, self._rss())
            time.sleep(0.0005)

    def __enter__(self):
        gc.collect()
        if not self.cuda and _LIBC is not None:
            _LIBC.malloc_trim(0)   # hand freed memory back, so growth counts every page touched
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = self._max = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self._max = max(self._max, self._rss())
            self._stop.set()
            self._thread.join()
            self.peak = self._max - self._base


def timed(fn, device: torch.device):
    """(result, seconds, peak bytes) of one call."""
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return out, seconds, mem.peak


def canvas(n: int) -> tuple[int, int, int]:
    """A rows x cols canvas of n tokens (cols the power of two nearest sqrt(n)), 17x17 windows."""
    cols = 1 << (n.bit_length() // 2)
    if n % cols:
        raise ValueError(f"natten2d needs N divisible by {cols}, got {n}")
    return n // cols, cols, 17


def _block(text: str) -> tuple[int, int]:
    sizes = tuple(int(x) for x in text.split(","))
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"a tile size is N or BM,BN, got {text!r}")
    return (sizes[0], sizes[-1])


def fmt_ms(seconds) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:,.1f}"


def fmt_mib(nbytes) -> str:
    return "—" if nbytes is None else f"{max(nbytes, 0) / 2**20:,.0f}"


def run_one(name: str, n: int, args, device: torch.device) -> dict:
    sizes = bp.Sizes(canvas=canvas(n)) if name == "natten2d" else bp.BENCH
    pat = bp.build(name, n, 1, device, sizes)
    row = {"pattern": name, "N": n}
    pattern = pat.attncc.kernel_pattern if args.kernel_order else pat.attncc
    build = lambda: ac.create_block_mask(pattern, None, None, n, n, block_size=args.block, device=device)

    def build_all():
        m = build()
        return m, (m.full_kv_idx, m.partial_kv_idx, m.full_q_idx, m.partial_q_idx)
    for key, fn in (("build", build), ("all", build_all)):
        fn()   # warm-up: imports, allocator, kernels
        runs = [timed(fn, device) for _ in range(args.repeat)]
        row[key], row[key + "_mem"] = statistics.median(r[1] for r in runs), max(r[2] for r in runs)
    bm = build()
    row["sparsity"] = bm.sparsity()
    ours = bm.to_dense()
    del bm

    agree = []
    for kind, limit, compile_ in (("plain", args.flex_plain_max, False), ("compiled", args.flex_compiled_max, True)):
        row[kind] = row[kind + "_mem"] = row[kind + "_warm"] = None
        if n > limit or args.kernel_order:
            continue
        create = torch.compile(flex_create_block_mask) if compile_ else flex_create_block_mask
        call = lambda: create(pat.mask_mod, None, None, n, n, device=device, BLOCK_SIZE=args.block)  # (BM, BN)
        torch._dynamo.reset()   # the first compiled call pays for its compilation, as a user's would
        try:
            fb, row[kind], row[kind + "_mem"] = timed(call, device)
            if compile_:
                fb, row[kind + "_warm"], _ = timed(call, device)
        except (RuntimeError, MemoryError) as e:
            print(f"# {name} N={n} flex {kind}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
            continue
        agree.append(torch.equal(ac.BlockMask.from_flex(fb).to_dense(), ours))
        del fb
    row["agree"] = "—" if not agree else "yes" if all(agree) else "NO"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="8192,32768,131072,1048576")
    parser.add_argument("--patterns", default=",".join(PATTERNS))
    parser.add_argument("--block", type=_block, default=(128, 128), help="tile size, N or BM,BN (default 128)")
    parser.add_argument("--kernel-order", action="store_true",
                        help="the block map in the kernels' token order (a layout composed in); no flex columns")
    parser.add_argument("--repeat", type=int, default=3, help="timed attncc builds (median), each column")
    parser.add_argument("--flex-plain-max", type=int, default=16384,
                        help="largest N for the eager create_block_mask (it materialises the N x N mask)")
    parser.add_argument("--flex-compiled-max", type=int, default=131072,
                        help="largest N for create_block_mask(_compile=True) (it evaluates N x N pairs)")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = [run_one(name, int(n), args, device)
            for name in args.patterns.split(",") for n in args.sizes.split(",")]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    order = ", kernel token order" if args.kernel_order else ""
    print(f"Block-mask construction, {gpu}, torch {torch.__version__}, tiles {args.block[0]}x{args.block[1]}{order}, "
          f"B = H = None; {time.strftime('%Y-%m-%d')}. Times in ms, peak memory growth in MiB.\n")
    print("| pattern | N | sparsity | attncc build | attncc + all index lists | attncc peak MiB "
          "| flex plain | flex plain MiB | flex compiled 1st call | flex compiled warm | flex compiled MiB | same map |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|")
    for r in rows:
        print(f"| {r['pattern']} | {r['N']:,} | {r['sparsity']:.1%} | {fmt_ms(r['build'])} | {fmt_ms(r['all'])} | "
              f"{fmt_mib(r['all_mem'])} | {fmt_ms(r['plain'])} | {fmt_mib(r['plain_mem'])} | "
              f"{fmt_ms(r['compiled'])} | {fmt_ms(r['compiled_warm'])} | {fmt_mib(r['compiled_mem'])} | {r['agree']} |")


if __name__ == "__main__":
    main()
