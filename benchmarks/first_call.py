"""First-call latency: a never-seen pattern in a new process, with a cold and then a warm disk cache.

    python benchmarks/first_call.py [--N 8192] [--patterns swa1024,document] [--backend fa4]

Each pattern runs in two fresh processes sharing fresh attncc and Triton cache directories: the
first finds them cold (trace, block mask, codegen, Triton compile), the second warm (BENCHMARKS.md's
goal: under 0.5 s; FA4's own compile cache lives in attncc's cache directory, so `--backend fa4`
measures it too: cold = CuTe-DSL compile, warm = FA4 loading its compiled kernel). One Python
bytecode cache serves the run (PYTHONPYCACHEPREFIX, filled first by a call with throwaway caches):
every module a call imports has its bytecode, as after pip's install, where a read-only
site-packages or PYTHONDONTWRITEBYTECODE (as on the device machine) would recompile their sources
in every process. The time is from the call to the synchronised result, after `import attncc` and
input creation (reported separately). bf16, B=4 H=16 D=128 on CUDA.
With --profile, the warm call's cProfile is printed and, where $OUT is set, saved there
(first_call-<pattern>-<backend>.prof, for pstats).
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(name: str, N: int, profile: bool, backend: str) -> dict:
    t0 = time.perf_counter()
    import torch

    sys.path.insert(0, str(ROOT))
    import attncc as ac  # noqa: F401
    from benchmarks.patterns import build

    imported = time.perf_counter() - t0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    B, H, D = (4, 16, 128) if device == "cuda" else (1, 2, 32)
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=torch.bfloat16) for _ in range(3))
    pattern = build(name, N, H, device).attncc
    if device == "cuda":
        torch.cuda.synchronize()
    profiler = cProfile.Profile() if profile else None
    t1 = time.perf_counter()
    if profiler:
        profiler.enable()
    ac.attention(q, k, v, pattern, kernel_options={"backend": backend})
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t1
    if profiler:
        profiler.disable()
        stats = pstats.Stats(profiler, stream=sys.stderr)
        stats.sort_stats("cumulative").print_stats(30)
        if os.environ.get("OUT"):
            stats.dump_stats(os.path.join(os.environ["OUT"], f"first_call-{name}-{backend}.prof"))
    return {"pattern": name, "import_s": imported, "first_call_s": elapsed,
            "bytecode_written": not sys.dont_write_bytecode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--N", type=int, default=8192)
    ap.add_argument("--patterns", default="causal,swa1024,document,softcap")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of each warm first call")
    ap.add_argument("--backend", default="triton", help="kernel_options backend (triton, fa4, auto)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.N, args.profile, args.backend)))
        return
    rows = []
    bytecode = tempfile.TemporaryDirectory()
    for i, name in enumerate(args.patterns.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, ATTNCC_CACHE_DIR=f"{tmp}/attncc", TRITON_CACHE_DIR=f"{tmp}/triton",
                       PYTHONPYCACHEPREFIX=bytecode.name)
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            cmd = [sys.executable, __file__, "--child", name, "--N", str(args.N), "--backend", args.backend]
            if i == 0:  # the bytecode, with caches thrown away
                subprocess.run(cmd, env=dict(env, ATTNCC_CACHE_DIR=f"{tmp}/x", TRITON_CACHE_DIR=f"{tmp}/y"),
                               check=True, capture_output=True)
            runs = []
            for which in ("cold", "warm"):
                done = subprocess.run(cmd + ["--profile"] * (args.profile and which == "warm"),
                                      env=env, check=True, capture_output=True, text=True)
                runs.append(json.loads(done.stdout))
                if args.profile and which == "warm":
                    print(f"== cProfile of the warm first call, {name}\n{done.stderr}")
        rows.append((name, runs[0], runs[1]))
    print("| pattern | import attncc | first call, cold caches | first call, warm disk caches |")
    print("|---|---:|---:|---:|")
    for name, cold, warm in rows:
        print(f"| {name} | {warm['import_s']:.2f} s | {cold['first_call_s']:.2f} s | {warm['first_call_s']:.3f} s |")


if __name__ == "__main__":
    main()
