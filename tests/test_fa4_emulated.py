"""The fa4 backend's wiring on CPU, with FlashAttention-4 replaced by tests/fa4_emulator.py (its
documented semantics, the generated hooks run through tests/cute_shim.py): outputs, LSE and
gradients against the float64 reference for dense, causal, block-sparse, buffer-reading, GQA and
empty-row patterns; the backward's routing; what kern.source and kern.config say."""
from __future__ import annotations

import math

import pytest
import torch

import attncc as ac
import cute_shim
import fa4_emulator
from attncc.runtime import cache, fa4, sliver
from attncc.runtime.choices import KernelChoice, check_options, choose_backward_tiles
from attncc.runtime.fold import fold_for
from attncc.runtime.inputs import check_qkv
from attncc.runtime.kernel import Kernel


@pytest.fixture(autouse=True)
def emulated(monkeypatch):
    monkeypatch.setattr(fa4, "_FA", [fa4_emulator.namespace()])
    monkeypatch.setattr(fa4, "_HOOKS", {})
    monkeypatch.setattr(fa4, "_CALLS", cache.LRU(64))
    with cute_shim.installed():
        yield


def fa4_kernel(pattern, q, k, v, **options):
    """A Kernel on the fa4 backend (choose_backend would refuse CPU tensors), folded where
    runtime/fold.py folds the call."""
    s = check_qkv(q, k, v)
    options = check_options(options)
    fold = fold_for(pattern, s, options)
    choice = KernelChoice(fa4.TILE, choose_backward_tiles(s, q.dtype, q.device, options), "fa4",
                          deterministic=options.get("deterministic", True),
                          fa4_native=options.get("fa4_native", True), fold=fold)
    return Kernel(pattern.kernel_pattern if fold is None else fold.pattern, s, q.device, 1 / math.sqrt(s.D), choice,
                  q.dtype)


def inputs(B=1, Hq=1, Hkv=1, N=136, D=16, seed=0):  # two 128-row tiles, the second ragged
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, N, D, generator=g) for h in (Hq, Hkv, Hkv))


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


CASES = {
    "causal": (lambda: ac.patterns.causal(), {}),
    "softcap": (lambda: ac.Pattern() & ac.patterns.softcap(5.0, causal=False), {}),
    "swa": (lambda: ac.patterns.sliding_window(70), {}),
    "document": (lambda: ac.patterns.document(lengths=[90, 30, 16]), {}),
    "alibi_gqa": (lambda: ac.patterns.alibi(2), {"Hq": 2, "Hkv": 1}),
    "empty_rows": (lambda: ac.Pattern(lambda b, h, q, kv: (q - kv >= 40) & (q - kv < 100)), {}),
    # FA4's own local / varlen masks (runtime/fa4.Native): bands on slices, segments folded
    "prefix_lm": (lambda: ac.patterns.prefix_lm(50), {}),
    "sinks": (lambda: ac.patterns.sinks(3, 40), {}),  # its sink columns: attncc's sliver kernel (interpreter)
    "sinks_gqa_batch": (lambda: ac.patterns.sinks(5, 30), {"B": 2, "Hq": 2, "Hkv": 1, "N": 131}),
    "document_gqa_batch": (lambda: ac.patterns.document(lengths=[60, 1, 75]), {"B": 2, "Hq": 2, "Hkv": 1}),
    "chunked_odd": (lambda: ac.patterns.chunked(48), {"N": 131}),
    "swa_softcap": (lambda: ac.patterns.sliding_window(30) & ac.patterns.softcap(5.0, causal=False), {}),
    "dilated": (lambda: ac.patterns.dilated(40, 3), {}),
    # residue classes mod 4 as heads of one call (runtime/fold.py): FA4's own local window, on views
    "dilated_folded": (lambda: ac.patterns.dilated(40, 4) & ac.patterns.softcap(5.0, causal=False),
                       {"B": 2, "Hq": 2, "Hkv": 2}),
    "dilated_folded_gqa": (lambda: ac.patterns.dilated(40, 4) & ac.patterns.causal(), {"B": 2, "Hq": 4, "Hkv": 2}),
}
NATIVE = {"swa": "local", "document": "varlen", "document_gqa_batch": "varlen", "chunked_odd": "varlen",
          "swa_softcap": "local", "prefix_lm": "block-sparse", "sinks": "block-sparse",
          "sinks_gqa_batch": "block-sparse", "empty_rows": "block-sparse", "dilated_folded": "local",
          "dilated_folded_gqa": "local"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_lse_and_gradients_match_reference(name):
    make, shape = CASES[name]
    pattern = make()
    q, k, v = inputs(**shape)
    kern = fa4_kernel(pattern, q, k, v)
    out, lse = kern(q, k, v, return_lse=True)
    ref, ref_lse = ac.reference(q, k, v, pattern, return_lse=True)
    live = torch.isfinite(ref_lse)
    assert rel(out, ref) < 1e-5 and rel(lse[live], ref_lse[live]) < 1e-5
    assert torch.equal(torch.isfinite(lse), live) and (out[~live] == 0).all()
    w = torch.randn_like(out)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ours = torch.autograd.grad((kern(*leaves) * w).sum(), leaves)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad((ac.reference(*leaves64, pattern) * w.double()).sum(), leaves64)
    for a, b in zip(ours, want):
        assert rel(a, b) < 1e-4, (name, rel(a, b))
    assert (kern.config["fa4_kernel"], "fa4_native" in kern.config) == (
        (NATIVE[name], True) if name in NATIVE else (kern.config["fa4_kernel"], False)), kern.config


@pytest.mark.parametrize("make, Q, KV", [(lambda: ac.patterns.causal(), 100, 136),
                                         (lambda: ac.patterns.sliding_window(30), 136, 100),
                                         (lambda: ac.patterns.prefix_lm(20), 100, 136)],
                         ids=["causal-100x136", "swa-136x100", "prefix_lm-100x136"])
def test_bands_with_different_lengths(make, Q, KV):
    """Absolute indices with Q != KV: bands trimmed to their live rows and columns, FA4's windows
    re-aligned to its bottom-right convention; rows and keys outside every band get zeros."""
    pattern = make()
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 2, Q, 16, generator=g), torch.randn(1, 2, KV, 16, generator=g), \
        torch.randn(1, 2, KV, 16, generator=g)
    kern = fa4_kernel(pattern, q, k, v)
    assert "fa4_native" in kern.config and kern.config["backward"] == "fa4"
    w = torch.randn(1, 2, Q, 16, generator=g)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = kern(*leaves)
    ours = torch.autograd.grad((out * w).sum(), leaves)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    ref = ac.reference(*leaves64, pattern)
    want = torch.autograd.grad((ref * w.double()).sum(), leaves64)
    assert rel(out, ref) < 1e-5
    for a, b in zip(ours, want):
        assert rel(a, b) < 1e-4


def test_fa4_native_false_keeps_the_hooks_and_block_lists():
    q, k, v = inputs()
    pattern = ac.patterns.sliding_window(70)
    kern = fa4_kernel(pattern, q, k, v, fa4_native=False)
    assert kern.config["fa4_kernel"] == "block-sparse" and "fa4_native" not in kern.config
    assert kern.config["backward"].startswith("triton (FA4's block-sparse backward is not deterministic")
    assert rel(kern(q, k, v), ac.reference(q, k, v, pattern)) < 1e-5
    with pytest.raises(ValueError, match="fa4_native"):
        check_options({"fa4_native": "no"})


def assembled(pieces, n=10):
    """_assemble as _native_backward drives it: the first-covering pieces written in place."""
    total = torch.full((1, 2, n, 3), float("nan"), dtype=torch.bfloat16)
    direct = fa4._first_covers([sl for sl, _ in pieces])
    for (sl, p), d in zip(pieces, direct):
        if d:
            total[:, :, sl] = p
    return fa4._assemble(total, [(sl, None if d else p.clone()) for (sl, p), d in zip(pieces, direct)])


def test_band_gradients_assemble_exactly():
    """Uncovered tokens zero, single cover copied, overlaps summed in float32 and rounded once
    (three covers: tokens 5-6), whichever pieces were written in place."""
    g = torch.Generator().manual_seed(5)
    spans = [slice(0, 10), slice(2, 7), slice(5, 9)]
    pieces = [(sl, torch.randn(1, 2, sl.stop - sl.start, 3, generator=g).bfloat16()) for sl in spans]
    want = torch.zeros(1, 2, 10, 3, dtype=torch.float64)
    for sl, piece in pieces:
        want[:, :, sl] += piece.double()
    assert fa4._first_covers(spans) == [True, False, False]
    assert torch.equal(assembled(pieces), want.bfloat16())
    gaps = [pieces[1], pieces[2]]  # tokens 0-1 and 9 uncovered; 2-6 written in place, 5-8 buffered
    assert fa4._first_covers([sl for sl, _ in gaps]) == [True, False]
    got = assembled(gaps)
    assert torch.equal(got, (want - pieces[0][1].double()).bfloat16()) and (got[:, :, [0, 1, 9]] == 0).all()
    assert fa4._first_covers([slice(0, 4), slice(4, 10)]) == [True, True]


def test_narrow_bands_stay_native():
    """sinks' 4 sink columns at the main shape: a sliver band (attncc's sliver kernel computes its
    gradients) beside the window's FA4 backward (a side stream), predicted faster than the Triton
    backward."""
    s = check_qkv(*(torch.empty(4, 16, 8192, 128, device="meta") for _ in range(3)))
    sink, window = fa4.native_plan(ac.patterns.sinks(4, 1024), s, "cpu").bands
    assert (sink.q0, sink.q1, sink.k0, sink.k1, sink.lo, sink.hi) == (0, 8192, 0, 4, None, 0)
    assert (window.q0, window.q1, window.k0, window.k1, window.lo, window.hi) == (4, 8192, 4, 8192, -1024, 0)
    assert sliver.runs(sink, has_score_mod=False) and not sliver.runs(window, has_score_mod=False)


@pytest.mark.parametrize("name", ["prefix_lm", "document_gqa_batch", "sinks_gqa_batch"])
def test_native_backward_through_lse(name):
    """A loss reading the LSE too: each band's (and the varlen call's) dlse share is exact."""
    make, shape = CASES[name]
    pattern = make()
    q, k, v = inputs(**shape)
    kern = fa4_kernel(pattern, q, k, v)
    assert kern.config["backward"] == "fa4" and "fa4_native" in kern.config
    w = torch.randn(q.shape[:3], dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = kern(*leaves, return_lse=True)
    ours = torch.autograd.grad(out.sum() + (lse * w.float()).sum(), leaves)
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    out64, lse64 = ac.reference(*leaves64, pattern, return_lse=True)
    want = torch.autograd.grad(out64.sum() + (lse64 * w).sum(), leaves64)
    for a, b in zip(ours, want):
        assert rel(a, b) < 1e-4, (name, rel(a, b))


def test_the_backward_is_routed_by_what_fa4_does_well():
    q, k, v = inputs()
    assert fa4_kernel(ac.patterns.causal(), q, k, v).config["backward"] == "fa4"
    assert fa4_kernel(ac.patterns.sliding_window(70), q, k, v).config["backward"] == "fa4"  # FA4's own window
    assert fa4_kernel(ac.patterns.prefix_lm(50), q, k, v).config["backward"] == "fa4"  # two bands
    sparse = fa4_kernel(ac.patterns.dilated(40, 3), q, k, v)  # no band: only the block-sparse backward
    assert sparse.config["backward"].startswith("triton (FA4's block-sparse backward is not deterministic")
    assert fa4_kernel(ac.patterns.dilated(40, 3), q, k, v, deterministic=False).config["backward"] == "fa4"
    # backward_source is the file of the backward that runs: attncc's Triton kernels, or FA4's hooks
    assert "@triton.jit" in sparse.backward_source and "aux_scalars" not in sparse.backward_source
    banded = fa4_kernel(ac.patterns.prefix_lm(50), q, k, v)
    assert banded.backward_source == banded.source and "aux_scalars" in banded.source
    qg, kg, vg = inputs(Hq=2, Hkv=1)
    assert "GQA" in fa4_kernel(ac.patterns.alibi(2), qg, kg, vg).config["backward"]
    assert fa4_kernel(ac.patterns.causal(), qg, kg, vg).config["backward"] == "fa4"  # reads no h


def test_the_cost_model_picks_the_faster_backward(monkeypatch):
    """Where FA4's own backward can run, the one the profile predicts faster runs (both exact)."""
    import dataclasses

    from attncc.compiler import cost
    from attncc.runtime import calibrate

    q, k, v = inputs(N=200)

    def profile(backend, slower):  # the H200's D=128 figures, as the test's head dim class, one backward slower
        h200 = dataclasses.replace(cost.load_profile("h200").at_head_dim(128), head_dim=cost.head_dim_class(q.shape[-1]))
        spec = h200.backends[backend]["backward"]
        rates = spec["tflops"]
        rates = {k: r / slower for k, r in rates.items()} if isinstance(rates, dict) else rates / slower
        backends = {**h200.backends, backend: {**h200.backends[backend], "backward": {**spec, "tflops": rates}}}
        return dataclasses.replace(h200, backends=backends)

    pattern = ac.patterns.prefix_lm(50)
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad((ac.reference(*leaves64, pattern) * w.double()).sum(), leaves64)
    for backend, runs in (("fa4", "triton (attncc's Triton backward is predicted faster"), ("triton", "fa4")):
        monkeypatch.setattr(calibrate, "profile_for", lambda device, p=profile(backend, 1000.0): p)
        kern = fa4_kernel(pattern, q, k, v)
        assert kern.config["backward"].startswith(runs)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        ours = torch.autograd.grad((kern(*leaves) * w).sum(), leaves)
        assert max(rel(a, b) for a, b in zip(ours, want)) < 1e-4


def test_source_config_and_runtime_params():
    q, k, v = inputs()
    kern = fa4_kernel(ac.patterns.sliding_window(70), q, k, v)
    assert kern.config["backend"] == "fa4" and kern.config["fa4_kernel"] == "local"
    assert kern.config["fa4_native"] == "q [0, 136) x kv [0, 136) local window (70, 0)"
    assert "The forward (instead of the call above) and the backward call FA4" in kern.source
    assert "def mask_mod(" in kern.source and "p_W = aux_scalars[0]" in kern.source and "_flash_attn_fwd" in kern.source
    dense = fa4_kernel(ac.patterns.causal(), q, k, v)
    assert dense.config["fa4_kernel"] == "causal" and "block_sparse_tensors=None (FA4's own causal kernel)" in dense.source
    for W in (10, 130):  # a new value: new block lists and scalars, the same hooks module
        pat = ac.patterns.sliding_window(W)
        assert rel(fa4_kernel(pat, q, k, v)(q, k, v), ac.reference(q, k, v, pat)) < 1e-5
    assert len(fa4._HOOKS) == 1  # sliding_window's, for every W; causal runs FA4's own kernel, no hooks
    assert fa4_kernel(ac.patterns.prefix_lm(50), q, k, v).config["fa4_kernel"] == "block-sparse"


def test_buffers_travel_as_addresses_and_in_place_updates_are_read():
    """alibi's slopes reach FA4 as an address and a stride among aux_scalars;
    an in-place update of the buffer (a learnable buffer's optimizer step) is what the next call
    reads."""
    q, k, v = inputs(Hq=2, Hkv=1)
    pattern = ac.patterns.alibi(2)
    kern = fa4_kernel(pattern, q, k, v)
    call = fa4.prepare(pattern.kernel_pattern, check_qkv(q, k, v), q.device)
    assert [s.T for s in call.aux_scalars] == ["i64", "i32"]
    assert "aux_scalars=0 param(s), 1 buffer address(es) with their strides (runtime values)" in kern.source
    assert rel(kern(q, k, v), ac.reference(q, k, v, pattern)) < 1e-5
    pattern.buffers["slope"].mul_(3.0)
    assert rel(kern(q, k, v), ac.reference(q, k, v, pattern)) < 1e-5
