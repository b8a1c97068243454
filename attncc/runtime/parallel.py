"""Context parallelism: one sequence's attention across the ranks of a torch.distributed group.

Rank r holds its ShardPlan shard (compiler/sharding.py) of q [B, Hq, n_r, D] and k, v
[B, Hkv, m_r, D|Dv]. Its queries meet each kv shard s they need in an ordinary attncc call on the
pattern rewritten to see the plan's positions (int32 buffers cp_q_pos [n_r] and cp_kv_pos [m_s]
replace q and kv, as runtime/sequences.py does for packed sequences; with a token layout the
shards and positions are in its kernel order and the pattern is its kernel_pattern); the partial
outputs merge by LSE (sequences.merge_splits), in float32, in the fixed shard order
s = (r - t) mod W, t = 0, 1, ...

K and V (packed as one [B, Hkv, m, D + Dv] tensor) move by torch.distributed (gloo on CPU, NCCL on
GPUs), the way compiler/cost.context_parallel_ms predicts cheaper:
- ring: at step t rank r computes shard (r - t) mod W while passing the shard it holds to rank
  r + 1 (batch_isend_irecv); steps past the farthest shard any rank needs are not run;
- all-gather: every shard at once (padded to the longest), the own shard computed meanwhile.
Either way a rank skips the shards its queries never see (plan.work[r, s] == 0).

Backward, exact and deterministic: each shard's share is attncc's backward kernel run with the
global out and LSE (dS = P (dP - delta) with P = exp(S - LSE) needs nothing else); dQ sums the
shares in the forward's order; dK/dV partial sums (float32) travel with their shard around the
ring, or go to their owner in one exchange, summed in the same order (the owner's share first,
then ranks s + 1, s + 2, ...): both ways give bitwise-equal gradients. Gradients of a pattern's
learnable buffers are not supported here.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from ..compiler import cost
from ..compiler.domain import check_domain
from ..compiler.evaluate import token_mask
from ..compiler.sharding import ShardPlan
from ..dsl import ir
from ..dsl.pattern import Pattern
from .api import as_pattern, prepare_kernel
from .cache import LRU
from .inputs import Shapes, check_qkv, check_scale
from .kernel import pattern_key
from .sequences import merge_splits, remap_positions

MODES = ("auto", "ring", "all-gather")
_SCORES_CHECKED = LRU(64)  # the score domains context_parallel_attention proved, by plan, pattern and sizes
_BACKWARD_FACTOR = 2.5  # backward compute / forward compute (FlashAttention-2's ratio)


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern | None,
                               plan: ShardPlan, group=None, *, scale: float | None = None,
                               return_lse: bool = False, comm: str = "auto", kernel_options: dict | None = None):
    """This rank's share of attention over the whole sequence: q [B, Hq, n_r, D], k, v
    [B, Hkv, m_r, D|Dv] are `plan.shard` of the full tensors for this rank of `group` (None: the
    default group) -> out [B, Hq, n_r, Dv] in q's dtype (and lse float32 [B, Hq, n_r]), what
    `plan.shard(ac.attention(q, k, v, pattern), rank)` would be. Every rank of the group calls it
    (and its backward) together with the same plan. comm: "auto" (the cost model's choice),
    "ring" or "all-gather". A plan of one rank runs without torch.distributed.
    """
    pattern = as_pattern(pattern)
    if not isinstance(plan, ShardPlan):
        raise ValueError(f"plan must be an attncc.ShardPlan, got {type(plan).__name__}")
    if pattern.layout != plan.layout:
        raise ValueError(f"the pattern's token layout ({pattern.layout}) is not the plan's ({plan.layout}); build "
                         "the plan from this pattern")
    if not _same_mask(pattern, plan.pattern):
        raise ValueError("the pattern's mask is not the one the plan was built for (its kv-shard skipping would be "
                         "wrong); build the plan from this pattern (a different score mod is fine)")
    changed = [n for n, version in plan.mask_versions.items() if plan.pattern.buffers[n]._version != version]
    if changed:
        raise ValueError(f"the mask's buffers {changed} were written since the plan was built (its kv-shard "
                         "skipping would be wrong); build the plan again")
    if comm not in MODES:
        raise ValueError(f"comm must be one of {MODES}, got {comm!r}")
    if not isinstance(return_lse, bool):
        raise ValueError(f"return_lse must be a bool, got {return_lse!r}")
    rank, peer = _rank_in(plan, group)
    try:
        s = _check_shards(q, k, v, plan, rank)
        refused = None
    except ValueError as e:  # said to the other ranks first, so none waits for this one in the ring
        refused = e
    _agree(plan, group, q.device if isinstance(q, torch.Tensor) else torch.device("cpu"), refused is None)
    if refused is not None:
        raise refused
    # the score over the whole sequence, as every rank sees it: one rank's refusal (or none) is all
    # ranks'; once per plan, pattern (buffers by version) and sizes, not on every layer's call
    checked = (plan.fingerprint, pattern_key(pattern), s.B, s.Hq, str(q.device))
    if _SCORES_CHECKED.get(checked) is None:
        check_domain(pattern, (pattern.score,), s.B, s.Hq, plan.Q_LEN, plan.KV_LEN, q.device)
        _SCORES_CHECKED.put(checked, pattern)  # the key holds buffer ids: the entry keeps them alive
    grads = [name for name, t in pattern.buffers.items() if t is not None and t.requires_grad]
    if grads and torch.is_grad_enabled():
        raise ValueError(f"context parallelism does not give gradients to the pattern's buffers {grads}")
    if comm == "auto":
        comm = choose_comm(plan, s, q.dtype, q.device, backward=any(t.requires_grad for t in (q, k, v)))
    call = _Call(plan, pattern.kernel_pattern, rank, peer, group, comm, check_scale(scale, s.D),
                 dict(kernel_options or {}))
    out, lse = _ContextParallel.apply(q, k, v, call)
    return (out, lse) if return_lse else out


def _check_shards(q, k, v, plan: ShardPlan, rank: int) -> Shapes:
    """This rank's q, k, v against the plan (ValueError), and their sizes."""
    s = check_qkv(q, k, v)
    for name, t, kind in (("q", q, "q"), ("k", k, "kv"), ("v", v, "kv")):
        if t.shape[2] != plan.tokens(rank, kind):
            raise ValueError(f"{name} has {t.shape[2]} tokens at dim 2; rank {rank} of the plan owns "
                             f"{plan.tokens(rank, kind)} (pass plan.shard({name}, {rank}))")
    for name, size, used in (("B", s.B, plan.B), ("H", s.Hq, plan.H)):
        if used is not None and size != used:
            raise ValueError(f"the mask reads {name.lower()}: the plan was built for {name}={used}, q has {size}")
    return s


def _agree(plan: ShardPlan, group, device: torch.device, ok: bool) -> None:
    """ValueError on every rank unless every rank of the group holds the same plan and took its
    inputs (`ok`: this one did); one all-gather of 8 bytes a rank and call (a plan of one rank:
    nothing). Plans that give each rank as many tokens but at other positions exchanged K/V read at
    the wrong positions: wrong numbers, then a hang in the backward."""
    if plan.world_size == 1:
        return
    mine = torch.tensor([plan.fingerprint if ok else 0], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(plan.world_size)]
    dist.all_gather(every, mine, group=group)
    if not ok:  # this rank raises its own error
        return
    seen = [int(t) for t in every]
    refused = [r for r, f in enumerate(seen) if f == 0]
    if refused:
        raise ValueError(f"rank(s) {refused} refused their inputs (see that rank's error); no rank went on")
    other = [r for r, f in enumerate(seen) if f != plan.fingerprint]
    if other:
        raise ValueError(f"rank(s) {other} hold another plan than this rank's: every rank must call with the same "
                         "ShardPlan (the same pattern, lengths, world size, chunk and tolerance)")


def predict_ms(plan: ShardPlan, s: Shapes, dtype: torch.dtype, profile: cost.Profile,
               backward: bool = False) -> dict[str, float]:
    """{"ring": ms, "all-gather": ms} for a call of full shapes s (cost.context_parallel_ms): the
    forward, plus the backward when `backward`; a live chunk tile at the profile's Triton rate."""
    from ..compiler.codegen import TileConfig

    reads = (s.B if plan.B is None else 1) * (s.Hq if plan.H is None else 1)  # (b, h) the work stands for
    tflops = profile.rate("triton", TileConfig(plan.chunk, plan.chunk, 4, 1))
    tile_ms = 2.0 * (s.D + s.Dv) * plan.chunk ** 2 * reads / (tflops * 1e12) * 1e3
    longest = max(plan.tokens(r, "kv") for r in range(plan.world_size))
    link = profile.link_tbps * 1e12 / 1e3  # bytes per ms
    hop_ms = longest * s.B * s.Hkv * (s.D + s.Dv) * torch.finfo(dtype).bits / 8 / link
    total = cost.context_parallel_ms(plan.work * tile_ms, hop_ms, plan.ring_steps)
    if backward:
        back = cost.context_parallel_ms(plan.work * tile_ms * _BACKWARD_FACTOR, hop_ms, plan.ring_steps,
                                        grad_hop_ms=hop_ms * 32 / torch.finfo(dtype).bits)
        total = {mode: ms + back[mode] for mode, ms in total.items()}
    return total


def choose_comm(plan: ShardPlan, s: Shapes, dtype: torch.dtype, device: torch.device, backward: bool) -> str:
    """The cheaper of "ring" and "all-gather" by `predict_ms` on the device's profile (ties: ring)."""
    from .calibrate import profile_for

    ms = predict_ms(plan, s, dtype, profile_for(device), backward)
    return "ring" if ms["ring"] <= ms["all-gather"] else "all-gather"


def explain_text(plan: ShardPlan, s: Shapes, dtype: torch.dtype, profile: cost.Profile) -> str:
    """plan.describe() and the predicted ring / all-gather times, for `ac.explain(..., plan=)`."""
    if not isinstance(plan, ShardPlan):
        raise ValueError(f"plan must be an attncc.ShardPlan, got {type(plan).__name__}")
    if (plan.Q_LEN, plan.KV_LEN) != (s.Q, s.KV):
        raise ValueError(f"the plan is for Q_LEN={plan.Q_LEN}, KV_LEN={plan.KV_LEN}; q, k have {s.Q}, {s.KV}")
    lines = [plan.describe()]
    for what, backward in (("forward", False), ("forward+backward", True)):
        ms = predict_ms(plan, s, dtype, profile, backward)
        pick = min(ms, key=lambda m: (ms[m], m != "ring"))
        lines.append(f"  {what}: ring {ms['ring']:.3g} ms, all-gather {ms['all-gather']:.3g} ms predicted "
                     f"(link {profile.link_tbps} TB/s) -> {pick}")
    return "\n".join(lines)


def _same_mask(a: Pattern, b: Pattern) -> bool:
    """Whether a and b have the same token mask, params and buffers it reads included."""
    mask = token_mask(a)
    if mask != token_mask(b):
        return False
    same = lambda x, y: x is y or (x.shape == y.shape and torch.equal(x.cpu(), y.cpu()))  # noqa: E731
    return (all(a.params[n] == b.params[n] for n in ir.params_of(mask))
            and all(same(a.buffers[n], b.buffers[n]) for n in ir.buffers_of(mask)))


def _rank_in(plan: ShardPlan, group) -> tuple[int, Callable[[int], int]]:
    """(this process's rank in group, group rank -> global rank)."""
    if not dist.is_available() or not dist.is_initialized():
        if plan.world_size == 1:
            return 0, lambda r: r
        raise ValueError(f"the plan has {plan.world_size} ranks but torch.distributed is not initialized; call "
                         "torch.distributed.init_process_group ('gloo' on CPU, 'nccl' on GPUs) in every rank first")
    size = dist.get_world_size(group)
    if size != plan.world_size:
        raise ValueError(f"the process group has {size} ranks, the plan {plan.world_size}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the group")
    if group is None:
        return rank, lambda r: r
    return rank, lambda r: dist.get_global_rank(group, r)


@functools.lru_cache(maxsize=256)
def _shard_pattern(pattern: Pattern, plan: ShardPlan, rank: int, shard: int, device: torch.device) -> Pattern:
    """`pattern` as rank's queries see kv shard `shard`: q and kv read their positions in the plan."""
    buffers = {"cp_q_pos": plan.positions(rank, "q", device), "cp_kv_pos": plan.positions(shard, "kv", device)}
    q, kv = ir.load("cp_q_pos", (ir.Var("q"),)), ir.load("cp_kv_pos", (ir.Var("kv"),))
    return remap_positions(pattern, ir.Var("b"), q, kv, ir.TRUE, buffers, "context-parallel calls")


@dataclass
class _Call:
    """One context-parallel call's fixed parts, shared by its forward and backward."""
    plan: ShardPlan
    pattern: Pattern
    rank: int
    peer: Callable[[int], int]
    group: object
    comm: str
    scale: float
    options: dict

    @property
    def order(self) -> list[int]:
        """The kv shards this rank meets, in the order it meets them (ring distance 0, 1, ...)."""
        W = self.plan.world_size
        return [(self.rank - t) % W for t in range(self.plan.ring_steps)]

    def live(self, shard: int) -> bool:
        return bool(self.plan.work[self.rank, shard] > 0)

    def kernel(self, shard: int, q, k, v):
        pattern = _shard_pattern(self.pattern, self.plan, self.rank, shard, q.device)
        return prepare_kernel(pattern, q, k, v, self.scale, self.options)

    # -- communication
    def shift(self, t: torch.Tensor, shard: int):
        """Send t to rank + 1 and receive kv shard `shard`'s tensor of t's kind from rank - 1:
        (the receive buffer, the pending works)."""
        W = self.plan.world_size
        into = t.new_empty(*t.shape[:2], self.plan.tokens(shard, "kv"), t.shape[3])
        return into, self.exchange([(t, (self.rank + 1) % W)], [(into, (self.rank - 1) % W)])

    def exchange(self, sends: list, recvs: list) -> list:
        """Post sends [(tensor, to rank)] and receives [(buffer, from rank)] together."""
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.peer(r), self.group) for t, r in sends]
        ops += [dist.P2POp(dist.irecv, t, self.peer(r), self.group) for t, r in recvs]
        return dist.batch_isend_irecv(ops) if ops else []

    def gather(self, kv: torch.Tensor):
        """All ranks' kv shards, padded to the longest: (list of W tensors, the pending work)."""
        longest = max(self.plan.tokens(r, "kv") for r in range(self.plan.world_size))
        padded = torch.nn.functional.pad(kv, (0, 0, 0, longest - kv.shape[2])).contiguous()
        into = [torch.empty_like(padded) for _ in range(self.plan.world_size)]
        return into, dist.all_gather(into, padded, group=self.group, async_op=True)

    def shards(self, k: torch.Tensor, v: torch.Tensor):
        """Yield (shard, k_s, v_s) in `order`, moving them by the call's mode."""
        kv, D = torch.cat([k, v], -1), k.shape[3]
        order = self.order
        gathered, pending = self.gather(kv) if self.comm == "all-gather" and len(order) > 1 else (None, None)
        for t, shard in enumerate(order):
            if self.comm == "ring" and t + 1 < len(order):
                into, works = self.shift(kv, order[t + 1])
            if t and gathered is not None:
                if t == 1:
                    pending.wait()  # once: a gloo work waits once only
                kv = gathered[shard][:, :, :self.plan.tokens(shard, "kv")]
            yield shard, kv[..., :D].contiguous(), kv[..., D:].contiguous()  # contiguous for every backend
            if self.comm == "ring" and t + 1 < len(order):
                for w in works:
                    w.wait()
                kv = into

    # -- the two passes
    def forward(self, q, k, v):
        out, lse = None, None
        for shard, ks, vs in self.shards(k, v):
            if not self.live(shard):
                continue
            kernel, s = self.kernel(shard, q, ks, vs)
            o, l = kernel.forward(q, ks, vs, s)
            if out is None:
                out, lse = o.float(), l
            else:
                out, lse = merge_splits(torch.stack([out, o.float()], 1).flatten(0, 1),
                                        torch.stack([lse, l], 1).flatten(0, 1), 2)
        if out is None:  # no key anywhere for these queries
            out = q.new_zeros(*q.shape[:3], v.shape[3])
            lse = torch.full(q.shape[:3], -torch.inf, device=q.device)
        return out.to(q.dtype), lse

    def backward(self, q, k, v, out, lse, dout, dlse):
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        width = k.shape[3] + v.shape[3]
        shares, pending, order = {}, [], self.order
        for t, (shard, ks, vs) in enumerate(self.shards(k, v)):
            share = None
            if self.live(shard):
                kernel, s = self.kernel(shard, q, ks, vs)
                dq_s, dk_s, dv_s = kernel.backward(q, ks, vs, out, lse, dout, dlse, s)
                dq += dq_s.float()
                share = torch.cat([dk_s, dv_s], -1).float()
            if self.comm == "all-gather":
                shares[shard] = share
                continue
            if t == 0:
                acc = torch.zeros(*k.shape[:3], width, device=q.device)
            for w in pending:  # this shard's partial sums, from rank - 1 (a gloo work waits once only)
                w.wait()
            pending = []
            if share is not None:
                acc += share
            if t + 1 < len(order):
                acc, pending = self.shift(acc, order[t + 1])
        dkv = self.home(acc, width) if self.comm == "ring" else self.collect(shares, k, width)
        D = k.shape[3]
        return dq.to(q.dtype), dkv[..., :D].to(k.dtype), dkv[..., D:].to(v.dtype)

    def home(self, acc: torch.Tensor, width: int) -> torch.Tensor:
        """The ring's last partial sums (shard rank - T) sent to their owner; ours received."""
        T, W = self.plan.ring_steps - 1, self.plan.world_size
        if T == 0:
            return acc
        mine = acc.new_empty(*acc.shape[:2], self.plan.tokens(self.rank, "kv"), width)
        for w in self.exchange([(acc, (self.rank - T) % W)], [(mine, (self.rank + T) % W)]):
            w.wait()
        return mine

    def collect(self, shares: dict, k: torch.Tensor, width: int) -> torch.Tensor:
        """All-gather mode: each share sent to its shard's owner; ours summed in ring order (our
        own share first, then those of ranks + 1, + 2, ...)."""
        W, rank = self.plan.world_size, self.rank
        sends = [(t, s) for s, t in shares.items() if s != rank and t is not None]
        senders = [(rank + t) % W for t in range(1, W) if self.plan.work[(rank + t) % W, rank] > 0]
        new = lambda: torch.zeros(*k.shape[:3], width, device=k.device)  # noqa: E731
        received = {r: new() for r in senders}
        for w in self.exchange(sends, [(t, r) for r, t in received.items()]):
            w.wait()
        total = shares.get(rank)
        total = new() if total is None else total
        for r in senders:
            total += received[r]
        return total


class _ContextParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, call: _Call):
        out, lse = call.forward(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        return (*ctx.call.backward(q, k, v, out, lse, dout, dlse), None)
