"""Context parallelism: one long sequence over W GPUs (NCCL) against one GPU — a benchmark, not a test.

    python benchmarks/context_parallel.py [--world 2] [--tokens 131072,524288] [--patterns causal,document]
                                          [--reps 3] [--out-dir DIR] [--smoke]

Spawns W ranks (NCCL, NVLink multicast off: NCCL_NVLS_ENABLE=0). Per pattern and length (B1 H16
D128 bf16): rank 0 times ac.attention on the whole sequence (forward; forward+backward), then every
rank runs ac.context_parallel_attention on its ShardPlan shard with comm "ring", "all-gather"
(the baseline) and "auto" (the cost model's pick). A time is the slowest rank's median over --reps
after one warm-up; scaling efficiency = t(1 GPU) / (W * t(W GPUs)). Every context-parallel output
and gradient is checked against the one-GPU call first (relative error in the table). --smoke: 2
ranks on gloo, tiny float32 shapes on CPU in Triton's interpreter (the times mean nothing).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import attncc as ac  # noqa: E402
from attncc.runtime.inputs import check_qkv  # noqa: E402
from attncc.runtime.parallel import choose_comm  # noqa: E402
from benchmarks.report import write_table  # noqa: E402

COMMS = ("ring", "all-gather", "auto")


def make_pattern(name: str, N: int, device) -> ac.Pattern:
    """causal, or causal documents of seeded random lengths (64 on average over N)."""
    if name == "causal":
        return ac.patterns.causal()
    if name == "document":
        g = torch.Generator().manual_seed(0)
        cuts = torch.randperm(N - 1, generator=g)[:63].sort().values + 1
        bounds = torch.cat([torch.tensor([0]), cuts, torch.tensor([N])])
        return ac.patterns.document(offsets=bounds, device=device)
    raise ValueError(f"unknown pattern {name!r} (causal, document)")


def slowest_ms(fn, reps: int, device) -> float:
    """The slowest rank's median time of fn() over reps runs, after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    ms = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    return float(ms)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def one_gpu(q, k, v, dout, pattern, reps: int, device, rank: int):
    """(fwd ms, fwd+bwd ms, [out, dq, dk, dv]) of ac.attention on rank 0, the tensors broadcast."""
    def forward():
        return ac.attention(q, k, v, pattern)

    def train():
        q.grad = k.grad = v.grad = None
        torch.autograd.backward(ac.attention(q, k, v, pattern), dout)

    fwd = slowest_ms(forward if rank == 0 else lambda: None, reps, device)
    both = slowest_ms(train if rank == 0 else lambda: None, reps, device)
    want = [forward().detach(), q.grad, k.grad, v.grad] if rank == 0 else [torch.empty_like(q) for _ in range(4)]
    for t in want:
        dist.broadcast(t, 0)
    return fwd, both, want


def context_parallel(q, k, v, dout, pattern, plan, comm: str, reps: int, device, rank: int, want: list):
    """(fwd ms, fwd+bwd ms, worst relative error over out, dq, dk, dv and ranks)."""
    local = [plan.shard(x, rank).detach().requires_grad_() for x in (q, k, v)]
    dout_local = plan.shard(dout, rank)

    def forward():
        return ac.context_parallel_attention(*local, pattern, plan, comm=comm)

    def train():
        for t in local:
            t.grad = None
        torch.autograd.backward(forward(), dout_local)

    fwd, both = slowest_ms(forward, reps, device), slowest_ms(train, reps, device)
    got = [forward().detach()] + [t.grad for t in local]
    err = torch.tensor([max(rel(g, plan.shard(w, rank)) for g, w in zip(got, want))], dtype=torch.float64)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    return fwd, both, float(err)


def rank_main(rank: int, world: int, args, directory: str) -> None:
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{directory}/rendezvous",
                            rank=rank, world_size=world)
    H, D, dtype = (16, 128, torch.bfloat16) if cuda else (1, 16, torch.float32)
    rows = []
    for name in args.patterns.split(","):
        for N in (int(n) for n in args.tokens.split(",")):
            pattern = make_pattern(name, N, device)
            g = torch.Generator(device=device).manual_seed(N)
            q, k, v, dout = (torch.randn(1, H, N, D, device=device, dtype=dtype, generator=g) for _ in range(4))
            q, k, v = (x.requires_grad_() for x in (q, k, v))
            plan = ac.ShardPlan(pattern, N, N, world, device=device)
            fwd1, both1, want = one_gpu(q, k, v, dout, pattern, args.reps, device, rank)
            row = {"pattern": name, "tokens": N, "one_fwd_ms": fwd1, "one_fwd_bwd_ms": both1,
                   "balance": float(plan.load.max() / plan.load.mean()), "ring_steps": plan.ring_steps,
                   "auto_picks": choose_comm(plan, check_qkv(q, k, v), dtype, device, backward=True)}
            for comm in COMMS:
                fwd, both, err = context_parallel(q, k, v, dout, pattern, plan, comm, args.reps, device, rank, want)
                row[comm] = {"fwd_ms": fwd, "fwd_bwd_ms": both, "rel_err": err,
                             "fwd_eff": fwd1 / (world * fwd), "fwd_bwd_eff": both1 / (world * both)}
            rows.append(row)
            if rank == 0:
                print(table_lines(rows[-1:], world)[-1], flush=True)
    if rank == 0:
        lines = [f"# context parallelism, {world} x {torch.cuda.get_device_name(0) if cuda else 'CPU (smoke)'}", "",
                 f"- torch {torch.__version__}, attncc {ac.__version__}; command: `{' '.join(sys.argv)}`",
                 "- times: the slowest rank's median; efficiency = t(1) / (W t(W)); rel err: worst of out, dq, "
                 "dk, dv against the one-device call", ""] + table_lines(rows, world)
        write_table(args.out_dir, f"context_parallel_{world}", rows, lines)
        print("\n".join(lines))
    dist.destroy_process_group()


def table_lines(rows: list[dict], world: int) -> list[str]:
    head = (["pattern", "tokens", "balance", "ring steps", "1 device fwd / fwd+bwd ms"]
            + [f"{c} fwd / fwd+bwd ms (eff.)" for c in COMMS] + ["auto picks", "worst rel err"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["pattern"], str(r["tokens"]), f"{r['balance']:.3f}", f"{r['ring_steps']}/{world}",
                 f"{r['one_fwd_ms']:.1f} / {r['one_fwd_bwd_ms']:.1f}"]
        cells += [f"{r[c]['fwd_ms']:.1f} ({r[c]['fwd_eff']:.0%}) / {r[c]['fwd_bwd_ms']:.1f} ({r[c]['fwd_bwd_eff']:.0%})"
                  for c in COMMS]
        cells += [r["auto_picks"], f"{max(r[c]['rel_err'] for c in COMMS):.2g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None, start_method: str = "spawn") -> list[dict]:
    """Run the benchmark; returns rank 0's rows (read back from --out-dir, or a temporary one)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--tokens", default="131072,524288")
    p.add_argument("--patterns", default="causal,document")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--smoke", action="store_true", help="2 ranks on gloo, tiny shapes on CPU")
    args = p.parse_args(argv)
    if args.smoke:
        args.world, args.tokens, args.reps = 2, "100", 1
    elif torch.cuda.device_count() < args.world:
        raise SystemExit(f"needs {args.world} GPUs, found {torch.cuda.device_count()} (--smoke runs on CPU)")
    with tempfile.TemporaryDirectory() as directory:
        args.out_dir = args.out_dir or directory
        mp.start_processes(rank_main, args=(args.world, args, directory), nprocs=args.world,
                           start_method=start_method)
        import json

        with open(os.path.join(args.out_dir, f"context_parallel_{args.world}.json")) as f:
            return json.load(f)


def check_on_gpus(world: int, tokens: int) -> None:
    """The GPU test: W ranks over NCCL equal one GPU (bf16: relative error under 2e-2)."""
    rows = main(["--world", str(world), "--tokens", str(tokens), "--reps", "1"])
    for r in rows:
        for comm in COMMS:
            assert r[comm]["rel_err"] < 2e-2, (r["pattern"], comm, r[comm]["rel_err"])


if __name__ == "__main__":
    main()
