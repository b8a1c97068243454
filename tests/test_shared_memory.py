"""Kernels Triton refuses for want of shared memory or registers (runtime/kernel.after_resource_refusal):
how much a kernel needs depends on the pattern's expressions (on the H200 global_tokens' 64x128
forward at 3 stages needed 240 KiB of 227; on the H100 ptxas failed to allocate registers for
D=256 forwards with a token layout), so tiles the automatic choice picked retry with one stage
fewer (shared memory) or more warps, then fewer keys per tile (registers), and tiles
kernel_options forced fail with an error naming them. Triton's interpreter has neither: these
tests refuse launches themselves, then check the retried kernel against ac.reference."""
from __future__ import annotations

import pytest
import torch
from triton.runtime.errors import OutOfResources, PTXASError

import attncc as ac
from attncc.compiler.codegen import BackwardTiles, TileConfig
from attncc.runtime import cache, choices, kernel
from test_sequences import dense_sequence, oracle, paged_inputs, rel


@pytest.fixture
def refuse(monkeypatch, isolated_refusals):
    """refuse(name, n, registers=False): the next n launches of generated functions called `name`
    raise Triton's shared-memory OutOfResources (as a kernel too large for the GPU does at its first
    launch), or with `registers` ptxas' register allocation failure (as its compilation does)."""
    left, kind = {}, {}
    real = kernel.launch

    def launch(interpret, fn, *args, **kwargs):
        if left.get(fn.__name__, 0) > 0:
            left[fn.__name__] -= 1
            if kind[fn.__name__]:
                raise PTXASError("ptxas fatal   : (C7600) Register allocation failed with register count of '255'.")
            raise OutOfResources(245760, 232448, "shared memory")
        return real(interpret, fn, *args, **kwargs)

    monkeypatch.setattr(kernel, "launch", launch)

    def arm(name: str, n: int, registers: bool = False):
        left[name], kind[name] = n, registers
        return left
    return arm


@pytest.fixture
def staged(monkeypatch):
    """The interpreter's tiles with 3 stages (the interpreter ignores stages; the CPU table has 1)."""
    choose, backward, decode = choices.choose_tiles, choices.choose_backward_tiles, choices.choose_decode_tiles

    def three(t: TileConfig) -> TileConfig:
        return TileConfig(t.BLOCK_M, t.BLOCK_N, t.num_warps, 3)

    def three_backward(*args) -> BackwardTiles:
        tiles = backward(*args)
        return BackwardTiles(three(tiles.dkdv), three(tiles.dq))
    monkeypatch.setattr(choices, "choose_tiles", lambda *a: three(choose(*a)))
    monkeypatch.setattr(choices, "choose_backward_tiles", three_backward)
    monkeypatch.setattr(choices, "choose_decode_tiles", lambda *a: three(decode(*a)))


def inputs(requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 45, 16, generator=g) for _ in range(3))
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def test_an_automatic_forward_refused_for_shared_memory_retries_with_fewer_stages(refuse, staged):
    q, k, v = inputs()
    pattern = ac.patterns.sliding_window(9)
    kern = ac.compile(pattern, q, k, v)
    assert kern.config["num_stages"] == 3
    left = refuse("forward", 2)
    out = kern(q, k, v)
    assert kern.config["num_stages"] == 1 and left["forward"] == 0
    assert rel(out, ac.reference(q, k, v, pattern)) < 1e-5
    assert rel(kern(q, k, v), ac.reference(q, k, v, pattern)) < 1e-5  # the smaller kernel stays


def test_forced_tiles_refused_for_shared_memory_name_the_options(refuse):
    q, k, v = inputs()
    kern = ac.compile(ac.patterns.causal(), q, k, v, kernel_options={"num_stages": 3})
    refuse("forward", 1)
    with pytest.raises(ValueError, match=r"kernel_options set \(\(32, 32, 4, 3\).*shared memory.*fewer stages"):
        kern(q, k, v)


def test_a_refusal_at_one_stage_is_an_error_not_a_loop(refuse, staged):
    q, k, v = inputs()
    kern = ac.compile(ac.patterns.causal(), q, k, v)
    refuse("forward", 10)
    with pytest.raises(ValueError, match="the smallest kernel.*shared memory"):
        kern(q, k, v)


def test_a_forward_refused_for_registers_retries_with_more_warps_then_fewer_keys(refuse, staged):
    q, k, v = inputs()
    pattern = ac.patterns.sliding_window(9)
    kern = ac.compile(pattern, q, k, v)
    assert (kern.config["BLOCK_N"], kern.config["num_warps"]) == (32, 4)
    left = refuse("forward", 2, registers=True)
    out = kern(q, k, v)
    assert left["forward"] == 0 and (kern.config["BLOCK_N"], kern.config["num_warps"], kern.config["num_stages"]) \
        == (16, 8, 3)
    assert rel(out, ac.reference(q, k, v, pattern)) < 1e-5
    refuse("forward", 10, registers=True)
    with pytest.raises(ValueError, match="the smallest kernel.*need more registers"):
        kern(q, k, v)
    forced = ac.compile(pattern, q, k, v, kernel_options={"num_warps": 4})
    refuse("forward", 1, registers=True)
    with pytest.raises(ValueError, match=r"kernel_options set.*registers.*more warps"):
        forced(q, k, v)


def test_a_backward_refused_for_registers_retries_both_kernels(refuse, staged):
    q, k, v = inputs(requires_grad=True, seed=4)
    pattern = ac.patterns.causal()
    kern = ac.compile(pattern, q, k, v)
    dout = torch.randn(1, 2, 45, 16, generator=torch.Generator().manual_seed(5))
    left = refuse("backward", 1, registers=True)
    grads = torch.autograd.grad(kern(q, k, v), (q, k, v), dout)
    assert left["backward"] == 0 and kern.config["dkdv_tiles"][2] == 8 and kern.config["dq_tiles"][2] == 8
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(ac.reference(qd, kd, vd, pattern), (qd, kd, vd), dout.double())
    assert all(rel(g, w) < 1e-5 for g, w in zip(grads, want))


def test_other_launch_errors_pass_through(monkeypatch, staged):
    q, k, v = inputs()
    kern = ac.compile(ac.patterns.causal(), q, k, v)

    def broken(interpret, fn, *args, **kwargs):
        raise OutOfResources(300, 255, "registers")
    monkeypatch.setattr(kernel, "launch", broken)
    with pytest.raises(OutOfResources, match="registers"):
        kern(q, k, v)
    assert kern.config["num_stages"] == 3


def test_a_refused_backward_retries_both_kernels_with_fewer_stages(refuse, staged):
    q, k, v = inputs(requires_grad=True, seed=1)
    pattern = ac.patterns.document(lengths=[20, 25])
    kern = ac.compile(pattern, q, k, v)
    dout = torch.randn(1, 2, 45, 16, generator=torch.Generator().manual_seed(2))
    left = refuse("backward", 1)
    grads = torch.autograd.grad(kern(q, k, v), (q, k, v), dout)
    assert left["backward"] == 0 and kern.config["dkdv_tiles"][3] == 2 and kern.config["dq_tiles"][3] == 2
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(ac.reference(qd, kd, vd, pattern), (qd, kd, vd), dout.double())
    assert all(rel(g, w) < 1e-5 for g, w in zip(grads, want))


def test_a_refused_decode_kernel_retries_with_fewer_stages(refuse, staged):
    lens = [37, 70]
    q, kc, vc, table, kv_lens = paged_inputs(lens, Q_LEN=2, Hq=4, Hkv=2, page_size=16, num_pages=12, seed=3)
    pattern = ac.patterns.sinks(3, 20)
    kern = ac.compile(pattern, q, kc, vc, page_table=table, kv_lens=kv_lens)
    assert kern.config["kernel"] == "decode" and kern.config["num_stages"] == 3
    refuse("forward", 1)
    out = kern(q, kc, vc, page_table=table, kv_lens=kv_lens)
    assert kern.config["num_stages"] == 2
    for b, n in enumerate(lens):
        want, _ = oracle(q[b], dense_sequence(kc, table, b, n), dense_sequence(vc, table, b, n), pattern)
        assert rel(out[b], want) < 1e-5


def test_a_refusal_is_recorded_so_a_later_kernel_never_tries_those_tiles_again(refuse, staged, monkeypatch,
                                                                                  isolated_refusals):
    """ptxas' failures are not cached by Triton (about 10 s per process for a D=256 kernel): the
    refusal is recorded beside the module in the attncc cache (cache.record_refusal), and a later
    Kernel of the same tiles skips them without compiling or launching."""
    q, k, v = inputs()
    pattern = ac.patterns.sliding_window(9)
    refuse("forward", 1, registers=True)
    first = ac.compile(pattern, q, k, v)
    first(q, k, v)
    assert first.config["num_warps"] == 8
    launched = []
    real = kernel.launch

    def watch(interpret, fn, *args, **kwargs):
        launched.append(fn.__module__)
        return real(interpret, fn, *args, **kwargs)
    monkeypatch.setattr(kernel, "launch", watch)
    isolated_refusals()  # as in a new process: only the disk remembers
    again = ac.compile(pattern, q, k, v)  # a new Kernel: starts at the chosen tiles
    assert again.config["num_warps"] == 4
    assert rel(again(q, k, v), ac.reference(q, k, v, pattern)) < 1e-5
    assert again.config["num_warps"] == 8 and len(launched) == 1  # only the 8-warp module ran
    refused = kernel.kernel_module(again.pattern, choices.choose_tiles(*[again._shapes, q.dtype, q.device, {}]),
                                   again._meta.plan, interpret=True)
    assert cache.refusal_of(refused) == "registers" and refused.__name__ not in launched
    forced = ac.compile(pattern, q, k, v, kernel_options={"num_warps": 4})
    with pytest.raises(ValueError, match="kernel_options set.*recorded in the attncc cache.*registers"):
        forced(q, k, v)


def test_a_forward_refused_for_registers_takes_the_simulators_next_candidate(refuse, monkeypatch):
    """Tiles the simulator chose retry, after a register refusal, at its next-ranked candidate (on the
    H100 dilated's D=256 pick 128x64/8/2 was refused; shrunk to 128x32/8/2 it ran 1.07x slower than
    64x32/4/2, the best measured); with none left, smaller tiles as before."""
    ranked = [TileConfig(32, 32, 4, 1), TileConfig(16, 16, 4, 1), TileConfig(32, 16, 4, 1)]
    monkeypatch.setattr(choices, "ranked_candidates", lambda *a, **kw: [("triton", t) for t in ranked])
    q, k, v = inputs()
    pattern = ac.patterns.sliding_window(9)
    kern = ac.compile(pattern, q, k, v)
    assert kern.tiles == ranked[0]
    left = refuse("forward", 1, registers=True)
    out = kern(q, k, v)
    assert left["forward"] == 0 and kern.tiles == ranked[1]
    assert rel(out, ac.reference(q, k, v, pattern)) < 1e-5
    again = ac.compile(pattern, q, k, v)
    refuse("forward", 2, registers=True)  # ranked[0] recorded (no launch), ranked[1] and [2] refused, then shrunk
    assert rel(again(q, k, v), ac.reference(q, k, v, pattern)) < 1e-5
    assert again.tiles == TileConfig(32, 16, 8, 1)
