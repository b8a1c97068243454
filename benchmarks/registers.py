"""Registers, spills and shared memory of attncc's generated kernels for a GPU architecture, on any
machine (no GPU needed) — a developer's probe, not a test of speed.

    python benchmarks/registers.py [--patterns swa1024,causal] [--kind backward|forward|decode]
                                   [--tiles 128,64,8,3] [--dkdv 64,128,8,3] [--dq 128,64,8,3]
                                   [--splits 1] [--arch 90] [--head-dim 128] [--loops]

Each pattern's kernels are generated at B1 H2 N8192 D128 (--head-dim) bf16 (decode: Hq 32 / Hkv 8, one query,
dense keys; --tiles its BLOCK_M packed rows, e.g. 16,64,4,3, and --splits its kv splits). The
sizes only set Triton's specialisations, which match the suite's (every stride and length
divisible by 16). The kernels are compiled by
Triton for sm_{arch}a through the generated launcher itself (its launches turned into compile-only
warm-ups against a stand-in driver), and each kernel's PTX is assembled again by Triton's bundled
ptxas -v for its figures. On the H200 (2026-12-02) the dK/dV kernel at 64x128/8/3 reported 255
registers with spills and 164,864 bytes of shared memory; this probe gives the same on a CPU.
--loops also disassembles each kernel (Triton's bundled nvdisasm) and counts the instructions of
each loop body, the most frequent opcodes beside: a static measure of what a change to a template
or to the mask's printing costs per tile (the FULL loop comes first, then the PARTIAL one).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

# compiled kernels only: under TRITON_INTERPRET triton.language's own jit helpers, which the
# generated kernels call, would be the interpreter's
os.environ.pop("TRITON_INTERPRET", None)
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from attncc.compiler.codegen import TileConfig  # noqa: E402
from attncc.runtime.choices import BackwardTiles  # noqa: E402
from attncc.runtime.inputs import Shapes  # noqa: E402
from attncc.runtime.kernel import META_CACHE, kernel_module  # noqa: E402
from benchmarks.patterns import build  # noqa: E402

B, H, N, D = 1, 2, 8192, 128
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


class _CompileOnly:
    """A stand-in for Triton's active driver: device 0, stream 0, the target architecture."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def compiled_kernels(launch, arch: int) -> list[tuple[str, object]]:
    """(name, CompiledKernel) of every kernel `launch()` would launch, compiled for sm_{arch}a, none run."""
    jit = triton.runtime.jit.JITFunction
    real_run, seen = jit.run, []

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        seen.append((self.__name__, kernel))
        return kernel
    previous = driver._active  # None until a driver was first needed (none exists on a CPU-only machine)
    driver.set_active(_CompileOnly(arch))
    jit.run = compile_only
    try:
        launch()
    finally:
        jit.run = real_run
        driver._active = previous
    return seen


def ptxas_figures(kernel, arch: int) -> dict:
    """registers, spill_stores, spill_loads (bytes) from ptxas -v, shared (bytes) from Triton."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        report = subprocess.run([PTXAS, f"-arch=sm_{arch}a", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                                capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return {"registers": int(regs.group(1)), "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2)), "shared": int(kernel.metadata.shared)}


def sass(kernel) -> str:
    """The kernel's SASS, by nvdisasm from its cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        return subprocess.run([os.path.join(os.path.dirname(PTXAS), "nvdisasm"), "-c", path],
                              capture_output=True, text=True, check=True).stdout


def loop_bodies(text: str) -> list[tuple[int, collections.Counter]]:
    """(instructions, opcode counts) of each loop in SASS `text`: from a label to a branch back to it."""
    lines = text.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^\s*(\.L\w+):", line))}
    found = []
    for i, line in enumerate(lines):
        m = re.search(r"\bBRA\b.*?(\.L\w+)", line)
        if not (m and labels.get(m.group(1), i) < i):
            continue
        ops = collections.Counter()
        for body_line in lines[labels[m.group(1)]:i + 1]:
            op = re.search(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", body_line)
            if op:
                ops[op.group(1)] += 1
        if sum(ops.values()) > 1:
            found.append((sum(ops.values()), ops))
    return found


def tiles(text: str) -> TileConfig:
    return TileConfig(*(int(x) for x in text.split(",")))


def probe(name: str, kind: str, forward_tiles: TileConfig, backward_tiles: BackwardTiles, arch: int,
          splits: int = 1, loops: bool = False, D: int = D) -> list[dict]:
    """One row per kernel of `name`'s `kind` module at head dim D."""
    cpu = torch.device("cpu")
    natural = build(name, N, H).attncc
    pattern, rows = natural.kernel_pattern, natural.layout  # a token layout: the Triton kernels gather its rows
    s = Shapes(B, H, H, N, N, D, D)
    q, k, v, out, dout = (torch.randn(B, H, N, D, dtype=torch.bfloat16) for _ in range(5))
    lse = torch.zeros(B, H, N)
    if kind == "decode":
        from attncc.runtime.decode import build_meta

        q = torch.randn(B, 32, 1, D, dtype=torch.bfloat16)
        k, v = (torch.randn(B, 8, N, D, dtype=torch.bfloat16) for _ in range(2))
        pattern = build(name, N, 32).attncc.kernel_pattern
        meta = build_meta(pattern, Shapes(B, 32, 8, 1, N, D, D), forward_tiles, cpu, splits, None)
        module = kernel_module(pattern, forward_tiles, meta.plan, interpret=False, kind="decode")
        launch = lambda: module.forward(q, k, v, meta, 0.088, meta.buffers)  # noqa: E731
    elif kind == "forward":
        _, meta = META_CACHE.get(pattern, s, forward_tiles, cpu)
        module = kernel_module(pattern, forward_tiles, meta.plan, interpret=False, layout=rows)
        launch = lambda: module.forward(q, k, v, meta, 0.088, meta.buffers, tma=False)  # noqa: E731
    else:
        _, dq_meta = META_CACHE.get(pattern, s, backward_tiles.dq, cpu)
        dkdv_meta = META_CACHE.backward(pattern, s, backward_tiles.dkdv, cpu)
        module = kernel_module(pattern, backward_tiles, dkdv_meta.plan, interpret=False, kind="backward",
                               layout=rows)
        launch = lambda: module.backward(q, k, v, out, lse, dout, None, dq_meta, dkdv_meta, 0.088,  # noqa: E731
                                         dq_meta.buffers)
    return [{"pattern": name, "kernel": kernel_name, **ptxas_figures(kernel, arch),
             **({"loops": loop_bodies(sass(kernel))} if loops else {})}
            for kernel_name, kernel in compiled_kernels(launch, arch)]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patterns", default="swa1024")
    ap.add_argument("--kind", choices=("forward", "backward", "decode"), default="backward")
    ap.add_argument("--tiles", type=tiles, default=None, help="the forward's (128,64,8,3) or decode's (16,64,4,3)")
    ap.add_argument("--splits", type=int, default=1, help="the decode kernel's kv splits")
    ap.add_argument("--dkdv", type=tiles, default=TileConfig(64, 128, 8, 3))
    ap.add_argument("--dq", type=tiles, default=TileConfig(128, 64, 8, 3))
    ap.add_argument("--arch", type=int, default=90, help="compute capability, 90 for Hopper (sm_90a)")
    ap.add_argument("--head-dim", type=int, default=D, help="the head dim of q, k and v")
    ap.add_argument("--loops", action="store_true", help="count each loop's instructions in the SASS")
    args = ap.parse_args(argv)
    forward = args.tiles or (TileConfig(16, 64, 4, 3) if args.kind == "decode" else TileConfig(128, 64, 8, 3))
    rows = [row for name in args.patterns.split(",")
            for row in probe(name, args.kind, forward, BackwardTiles(args.dkdv, args.dq), args.arch, args.splits,
                             args.loops, args.head_dim)]
    config = {"forward": forward, "decode": f"{forward}, {args.splits} splits",
              "backward": f"dkdv {args.dkdv}, dq {args.dq}"}[args.kind]
    print(f"sm_{args.arch}a, {args.kind}, D={args.head_dim}, {config}\n\n| pattern | kernel | registers | spill stores / loads (bytes) "
          "| shared memory (bytes) |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['pattern']} | {r['kernel']} | {r['registers']} | {r['spill_stores']} / {r['spill_loads']} | "
              f"{r['shared']} |")
    if args.loops:
        print("\n| pattern | kernel | loop | instructions | most frequent |\n|---|---|---:|---:|---|")
        for r in rows:
            for i, (n, ops) in enumerate(r["loops"]):
                top = ", ".join(f"{op} {c}" for op, c in ops.most_common(6))
                print(f"| {r['pattern']} | {r['kernel']} | {i} | {n} | {top} |")
    return rows


if __name__ == "__main__":
    main()
