"""Context parallelism (compiler/sharding.py, runtime/parallel.py): ranks as spawned processes on
gloo, kernels in Triton's interpreter, against single-process ac.attention (outputs, LSE and
gradients of q, k, v); the balance of plans on 1M-token block maps (no kernels run)."""
from __future__ import annotations

import functools
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attncc as ac
from attncc.compiler.cost import context_parallel_ms
from attncc.compiler.sharding import balanced_owner, imbalance

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, before the forkserver starts


def _random_pattern(N: int) -> ac.Pattern:
    """Random 32x32 blocks of a random element mask, soft-capped scores (seeded: every rank the same)."""
    g = torch.Generator().manual_seed(7)
    blocks = torch.rand(-(-N // 32), -(-N // 32), generator=g) < 0.4
    keep = torch.rand(N, N, generator=g) < 0.7
    return ac.Pattern(lambda b, h, q, kv: blocks[q // 32, kv // 32] & keep[q, kv],
                      lambda s, b, h, q, kv: 20.0 * torch.tanh(s / 20.0), name="random")


# name -> (N, Hq, Hkv, pattern factory): odd lengths, GQA and a score mod in the random case
CASES = {
    "causal": (203, 1, 1, lambda N: ac.patterns.causal()),
    "document": (250, 1, 1, lambda N: ac.patterns.document([70, 37, 100, 43])),
    "sliding_window": (229, 1, 1, lambda N: ac.patterns.sliding_window(40)),
    "random": (200, 2, 1, _random_pattern),
    "neighborhood": (240, 1, 1, lambda N: ac.patterns.neighborhood((12, 20), (5, 7))),  # 4x4 bricks: planned in them
}


# 64x64 tiles: a quarter of the interpreted programs of the default 32x32 ones at these lengths
OPTIONS = {"BLOCK_M": 64, "BLOCK_N": 64, "dkdv_tiles": (64, 64, 4, 1), "dq_tiles": (64, 64, 4, 1)}


def case(name: str):
    """(pattern, q, k, v, dout) float32, the same in every process."""
    N, Hq, Hkv, make = CASES[name]
    g = torch.Generator().manual_seed(len(name))
    q, dout = (torch.randn(1, Hq, N, 16, generator=g) for _ in range(2))
    k, v = (torch.randn(1, Hkv, N, 16, generator=g) for _ in range(2))
    return make(N), q, k, v, dout


def _rank_main(rank: int, world: int, directory: str, jobs: list) -> None:
    """One rank: every (case, comm) job's out, lse, dq, dk, dv saved to directory/rank<r>.pt."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=world)
    results = {}
    for name, comm in jobs:
        pattern, q, k, v, dout = case(name)
        plan = ac.ShardPlan(pattern, q.shape[2], k.shape[2], world)
        local = [plan.shard(x, rank).requires_grad_() for x in (q, k, v)]
        out, lse = ac.context_parallel_attention(*local, pattern, plan, comm=comm, return_lse=True,
                                                 kernel_options=OPTIONS)
        (out * plan.shard(dout, rank)).sum().backward()
        results[name, comm] = [out.detach(), lse.detach(), *(t.grad for t in local)]
    torch.save(results, f"{directory}/rank{rank}.pt")
    dist.destroy_process_group()


def _disagreeing_rank(rank: int, world: int, directory: str) -> None:
    """Rank 1 plans with another tolerance (contiguous shards, rank 0's zigzag), then rank 1 passes
    a q of the wrong length: each rank saves the error each call gave it."""
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=world)
    pattern, q, k, v, _ = case("causal")
    errors = []
    for tolerance, bad_rank in ((100.0, None), (None, 1)):
        plan = ac.ShardPlan(pattern, q.shape[2], k.shape[2], world,
                            **({"tolerance": tolerance} if tolerance and rank == 1 else {}))
        local = [plan.shard(x, rank) for x in (q, k, v)]
        if rank == bad_rank:
            local[0] = local[0][:, :, 1:]
        try:
            ac.context_parallel_attention(*local, pattern, plan, kernel_options=OPTIONS)
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    torch.save(errors, f"{directory}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ranks_that_disagree_all_raise_before_any_exchange():
    """Plans that differ between ranks (the same token counts at other positions: wrong numbers,
    then a hang in the backward) and one rank's bad input (the others waited in the ring) give an
    error on every rank."""
    mp.get_context("forkserver").set_forkserver_preload(["attncc.runtime.kernel", __name__])
    with tempfile.TemporaryDirectory() as directory:
        mp.start_processes(_disagreeing_rank, args=(2, directory), nprocs=2, start_method="forkserver")
        errors = [torch.load(f"{directory}/rank{r}.pt") for r in range(2)]
    assert "rank(s) [1] hold another plan" in errors[0][0] and "rank(s) [0] hold another plan" in errors[1][0]
    assert "rank(s) [1] refused their inputs" in errors[0][1] and "q has 58 tokens" in errors[1][1]


def run_ranks(world: int, jobs: list) -> dict:
    """{(case, comm): [out, lse, dq, dk, dv] unsharded to natural order} from `world` processes,
    forked from a fresh server process that has imported attncc's runtime once (torch._dynamo
    alone takes seconds to import in each spawned process)."""
    mp.get_context("forkserver").set_forkserver_preload(["attncc.runtime.kernel", __name__])
    with tempfile.TemporaryDirectory() as directory:
        mp.start_processes(_rank_main, args=(world, directory, jobs), nprocs=world, start_method="forkserver")
        ranks = [torch.load(f"{directory}/rank{r}.pt") for r in range(world)]
    merged = {}
    for name, comm in jobs:
        pattern, q, k, _, _ = case(name)
        plan = ac.ShardPlan(pattern, q.shape[2], k.shape[2], world)
        parts = zip(*(r[name, comm] for r in ranks))
        merged[name, comm] = [plan.unshard(list(part)) for part in parts]
        merged[name, comm][1] = merged[name, comm][1][..., None]  # the LSE [B, H, N], as single_process keeps it
    return merged


@functools.cache
def single_process(name: str) -> list:
    """[out, lse, dq, dk, dv] of one ac.attention call on the whole sequence."""
    pattern, q, k, v, dout = case(name)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = ac.attention(q, k, v, pattern, return_lse=True, kernel_options=OPTIONS)
    (out * dout).sum().backward()
    return [out.detach(), lse.detach()[..., None], q.grad, k.grad, v.grad]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error; entries that are -inf (the LSE of rows with no live key) must match exactly."""
    assert torch.equal(a.isinf(), b.isinf()) and not a.isnan().any()
    a, b = (torch.where(x.isinf(), 0.0, x).double() for x in (a, b))
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(2, [(name, "ring") for name in CASES] + [(name, "all-gather") for name in ("document", "random")])


@pytest.fixture(scope="module")
def four_ranks():
    return run_ranks(4, [(name, "auto") for name in CASES] + [("document", "ring"), ("document", "all-gather")])


def check_equal_to_single_process(got: list, name: str) -> None:
    for what, g, want in zip(("out", "lse", "dq", "dk", "dv"), got, single_process(name)):
        assert g.shape == want.shape and g.dtype == want.dtype, (what, g.shape, want.shape)
        assert rel(g, want) < 1e-5, (name, what, rel(g, want))


@pytest.mark.parametrize("name, comm", [(name, "ring") for name in sorted(CASES)]
                         + [("document", "all-gather"), ("random", "all-gather")])
def test_two_ranks_equal_one_process(two_ranks, name, comm):
    check_equal_to_single_process(two_ranks[name, comm], name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_four_ranks_equal_one_process(four_ranks, name):
    check_equal_to_single_process(four_ranks[name, "auto"], name)


def test_ring_and_all_gather_give_bitwise_equal_results(two_ranks, four_ranks):
    for results, names in ((two_ranks, ["document", "random"]), (four_ranks, ["document"])):
        for name in names:
            for ring, gathered in zip(results[name, "ring"], results[name, "all-gather"]):
                assert torch.equal(ring, gathered), name


def test_plan_of_one_rank_runs_without_torch_distributed():
    pattern, q, k, v, _ = case("causal")
    plan = ac.ShardPlan(pattern, q.shape[2], k.shape[2], 1)
    out = ac.context_parallel_attention(plan.shard(q, 0), plan.shard(k, 0), plan.shard(v, 0), pattern, plan,
                                        kernel_options=OPTIONS)
    assert rel(plan.unshard([out]), single_process("causal")[0]) < 1e-6


# ----------------------------------------------------------------------------------------------
# Plans: balance, contiguity, the work matrix, shard / unshard, errors.

def _document_lengths(N: int, seed: int, low: int, high: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < N:
        n = min(int(torch.randint(low, high, (1,), generator=g)), N - total)
        lengths.append(n)
        total += n
    return lengths


MILLION = 1 << 20
LARGE = {
    "causal": lambda: ac.patterns.causal(),
    "document": lambda: ac.patterns.document(_document_lengths(MILLION, 0, 100, 120_000)),
}


@functools.cache
def large_pattern(name: str) -> ac.Pattern:
    return LARGE[name]()


@functools.cache
def live_tiles(name: str) -> int:
    """Live 128x128 tiles of the 1M-token pattern, counted from its BlockMask."""
    bm = ac.create_block_mask(large_pattern(name), None, None, MILLION, MILLION, block_size=128)
    return int(bm.full_kv_num.sum()) + int(bm.partial_kv_num.sum())


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("name", sorted(LARGE))
def test_plans_at_a_million_tokens_are_balanced(name, world):
    pattern = large_pattern(name)
    plan = ac.ShardPlan(pattern, MILLION, MILLION, world)
    assert plan.chunk == 128 and float(plan.load.max()) <= 1.05 * float(plan.load.mean())
    assert int(plan.work.sum()) == live_tiles(name)
    owned = sorted(t for r in range(world) for run in plan.q_runs[r] for t in run)
    assert owned[0] == 0 and owned[-1] == MILLION and sum(plan.tokens(r) for r in range(world)) == MILLION
    if name == "causal":  # zigzag: LPT over 2W equal segments
        assert all(len(runs) <= 2 for runs in plan.q_runs) and plan.ring_steps == world


def test_a_sliding_window_keeps_contiguous_shards_and_needs_only_its_neighbour():
    plan = ac.ShardPlan(ac.patterns.sliding_window(4096), MILLION, MILLION, 8)
    assert [len(runs) for runs in plan.q_runs] == [1] * 8 and plan.ring_steps == 2
    assert [runs[0][0] for runs in plan.q_runs] == [r * MILLION // 8 for r in range(8)]
    needs = (plan.work > 0).int()
    assert torch.equal(needs, (torch.eye(8) + torch.diag(torch.ones(7), -1)).int())


def test_work_matrix_equals_a_dense_count():
    N, world = 300, 3
    pattern = _random_pattern(N)
    plan = ac.ShardPlan(pattern, N, N, world, chunk=16)
    classes = ac.create_block_mask(pattern, None, None, N, N, block_size=16).to_dense()[0, 0]
    owner = torch.empty(classes.shape[0], dtype=torch.long)
    for r, runs in enumerate(plan.q_runs):
        for a, b in runs:
            owner[a // 16:-(-b // 16)] = r
    live = (classes > 0).double()
    one_hot = torch.nn.functional.one_hot(owner, world).double()
    assert torch.equal(plan.work, one_hot.T @ live @ one_hot)
    assert plan.ring_steps == 1 + max((r - s) % world for r in range(world) for s in range(world) if plan.work[r, s])


def test_lpt_balances_and_numbers_ranks_in_token_order():
    work = torch.arange(64, dtype=torch.float64)  # causal-like rows
    owner = balanced_owner(work, 4, 1.001)
    load = torch.zeros(4, dtype=torch.float64).index_add_(0, owner, work)
    assert imbalance(load) <= 1.001 and owner[0] == 0
    firsts = [int((owner == r).nonzero()[0]) for r in range(4)]
    assert firsts == sorted(firsts)
    empty = balanced_owner(torch.zeros(10), 4, 1.02)  # no work at all: every rank still owns tokens
    assert sorted(set(empty.tolist())) == [0, 1, 2, 3]


def test_shard_and_unshard_round_trip_and_cross_attention_lengths():
    plan = ac.ShardPlan(ac.patterns.causal(), 150, 230, 3, chunk=16)
    q, kv = torch.randn(2, 3, 150, 8), torch.randn(2, 1, 230, 8)
    assert torch.equal(plan.unshard([plan.shard(q, r) for r in range(3)]), q)
    assert torch.equal(plan.unshard([plan.shard(kv, r) for r in range(3)]), kv)
    assert [len(runs) for runs in plan.kv_runs] == [1, 1, 1]  # keys: contiguous equal shards
    for r in range(3):
        assert torch.equal(plan.shard(q, r)[:, :, :, 0], q[:, :, plan.positions(r).long(), 0])


def test_a_token_layout_is_planned_in_its_kernel_order():
    pattern = ac.patterns.neighborhood((12, 20), (5, 7))
    plan = ac.ShardPlan(pattern, 240, 240, 3)
    assert plan.layout == pattern.layout and "kernel order" in plan.describe()
    x = torch.randn(1, 2, 240, 4)
    parts = [plan.shard(x, r) for r in range(3)]
    assert torch.equal(plan.unshard(parts), x)
    for r in range(3):  # rank r's shard: its kernel positions' natural rows
        assert torch.equal(parts[r], x[:, :, pattern.layout.perm[plan.positions(r).long()]])
    row_major = ac.ShardPlan(pattern.with_layout(None), 240, 240, 3)
    assert plan.work.sum() < row_major.work.sum()  # compact bricks: fewer live tiles (91 against 105)
    with pytest.raises(ValueError, match="permutes 240 tokens"):
        ac.ShardPlan(pattern, 240, 250, 3)
    with pytest.raises(ValueError, match="token layout"):
        ac.context_parallel_attention(x, x, x, pattern.with_layout(None), ac.ShardPlan(pattern, 240, 240, 1))


def test_context_parallel_cost_model():
    neighbours = (torch.eye(4) + torch.diag(torch.ones(3), -1)).double() * 5  # a window: own shard, rank - 1's
    ms = context_parallel_ms(neighbours, 10.0, 2)
    assert ms == {"ring": 15.0, "all-gather": 35.0}  # ring: one hop (10), then a step; all-gather: 3 hops
    local = context_parallel_ms(torch.eye(3, dtype=torch.float64), 100.0, 1, grad_hop_ms=1.0)
    assert local == {"ring": 1.0, "all-gather": 1.0}  # every rank needs its own shard only
    work = torch.tensor([[45.0, 0.0], [10.0, 36.0]], dtype=torch.float64)
    for grad in (None, 2.0):
        for ms in context_parallel_ms(work, 1.0, 2, grad).values():
            assert ms >= float(work.sum(1).max())  # never faster than the busiest rank's compute


def test_explain_reports_the_plan():
    plan = ac.ShardPlan(ac.patterns.causal(), 4096, 4096, 2)
    q = torch.empty(1, 16, 4096, 128, device="meta", dtype=torch.bfloat16)
    text = ac.explain(ac.patterns.causal(), q, q, q, target="h200", plan=plan)
    assert "rank 0:" in text and "rank 1:" in text and "max/mean" in text
    assert "forward: ring" in text and "forward+backward: ring" in text
    assert plan.describe() in text


def test_bad_inputs_are_refused_clearly(tmp_path):
    causal = ac.patterns.causal()
    with pytest.raises(ValueError, match="fewer than the 4 ranks"):
        ac.ShardPlan(causal, 100, 100, 4, chunk=64)
    with pytest.raises(ValueError, match="block predicate"):
        ac.ShardPlan(ac.Pattern(block_mask_mod=lambda b, h, qb, kb: qb >= kb), 256, 256, 2)
    with pytest.raises(ValueError, match="pass H"):
        ac.ShardPlan(ac.Pattern(lambda b, h, q, kv: q - kv <= h * 8), 256, 256, 2)
    plan = ac.ShardPlan(causal, 100, 100, 2)
    x = torch.randn(1, 2, 100, 16)
    with pytest.raises(ValueError, match="x has 99 tokens at dim 2; this plan is for Q_LEN=100"):
        plan.shard(x[:, :, :99], 0)
    with pytest.raises(ValueError, match="rank must be an int in 0..1"):
        plan.shard(x, 2)
    with pytest.raises(ValueError, match="own"):
        plan.unshard([plan.shard(x, 0), plan.shard(x, 0)])
    local = plan.shard(x, 0)
    with pytest.raises(ValueError, match="torch.distributed is not initialized"):
        ac.context_parallel_attention(local, local, local, causal, plan)
    one = ac.ShardPlan(causal, 100, 100, 1)
    with pytest.raises(ValueError, match="q has 99 tokens at dim 2; rank 0 of the plan owns 100"):
        ac.context_parallel_attention(x[:, :, :99], x, x, causal, one)
    with pytest.raises(ValueError, match="not the one the plan was built for"):
        ac.context_parallel_attention(x, x, x, ac.patterns.sliding_window(8), one)
    with pytest.raises(ValueError, match="comm must be one of"):
        ac.context_parallel_attention(x, x, x, causal, one, comm="p2p")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="the process group has 1 ranks, the plan 2"):
            ac.context_parallel_attention(local, local, local, causal, plan)
    finally:
        dist.destroy_process_group()


def test_a_stale_plan_and_a_score_undefined_somewhere_are_refused_by_every_rank():
    """A mask buffer written in place after planning voids the plan's kv-shard skipping (2 ranks:
    error 0.7, silently); a score mod undefined at some position is refused over the whole
    sequence, in natural positions, before any rank communicates (only the owning rank raised)."""
    ids = torch.arange(256) // 64
    pattern = ac.patterns.document(ids=ids)
    plan = ac.ShardPlan(pattern, 256, 256, 1)
    x = torch.randn(1, 1, 256, 16)
    ac.context_parallel_attention(x, x, x, pattern, plan)
    ids.zero_()
    with pytest.raises(ValueError, match=r"the mask's buffers \['doc'\] were written since the plan was built"):
        ac.context_parallel_attention(x, x, x, pattern, plan)
    table = torch.zeros(150)
    scored = ac.Pattern(lambda b, h, q, kv: q >= kv, lambda s, b, h, q, kv: s + table[q])
    y = torch.randn(1, 1, 199, 16)
    with pytest.raises(ac.PatternError, match="index q of buffer 'table' must stay inside dim 0 of size 150"):
        ac.context_parallel_attention(y, y, y, scored, ac.ShardPlan(scored, 199, 199, 1))


def test_the_benchmark_runs_in_smoke_mode(tmp_path):
    from benchmarks import context_parallel

    rows = context_parallel.main(["--smoke", "--patterns", "document", "--out-dir", str(tmp_path)],
                                 start_method="forkserver")
    assert [(r["pattern"], r["tokens"]) for r in rows] == [("document", 100)]
    assert all(rows[0][c]["rel_err"] < 1e-5 and rows[0][c]["fwd_ms"] > 0 for c in context_parallel.COMMS)
    assert (tmp_path / "context_parallel_2.md").read_text().count("| document | 100 |") == 1


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_over_nccl_equal_one_gpu():
    from benchmarks.context_parallel import check_on_gpus

    check_on_gpus(world=2, tokens=8192)


def test_the_whole_sequence_score_check_runs_once_per_plan_pattern_and_version(monkeypatch):
    from attncc.runtime import parallel

    table = torch.zeros(300)
    pattern = ac.Pattern(lambda b, h, q, kv: q >= kv, lambda s, b, h, q, kv: s + table[q])
    plan, y, calls = ac.ShardPlan(pattern, 199, 199, 1), torch.randn(1, 1, 199, 16), []
    real = parallel.check_domain
    monkeypatch.setattr(parallel, "check_domain", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    for _ in range(3):  # a model's layers: one check
        ac.context_parallel_attention(y, y, y, pattern, plan)
    table[0] = 1.0  # a new version of the score's buffer: checked again
    ac.context_parallel_attention(y, y, y, pattern, plan)
    assert len(calls) == 2
