"""Backend choice (runtime/choices.choose_backend) and the fa4 backend's refusals, without a GPU:
FA4 absent, float32, large head dims, old GPUs, an operator with no CuTe lowering; what
`attncc show --target` prints. FA4 itself runs in tests/test_fa4_gpu.py."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

import attncc as ac
from attncc.dsl import ops
from attncc.runtime import choices, fa4
from attncc.runtime.inputs import Shapes

S = Shapes(B=1, Hq=2, Hkv=2, Q=300, KV=300, D=64, Dv=64)
CUDA_BF16 = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device=torch.device("cuda"))
# the same, with its block masks built on the CPU (the measured rule reads them)
CUDA_LISTS_ON_CPU = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device=torch.device("cpu"))


@pytest.fixture
def fa4_ok(monkeypatch):
    monkeypatch.setattr(fa4, "refusal", lambda pattern, s, q: None)


def test_fa4_is_refused_with_its_reason():
    swa = ac.patterns.sliding_window(64)
    on = lambda **kw: fa4.refusal_on(kw.pop("pattern", swa), kw.pop("s", S), kw.pop("cap", (9, 0)),  # noqa: E731
                                     kw.pop("dtype", torch.bfloat16), "cpu", assume_installed=True)
    assert on() is None
    assert "SM90" in on(cap=(8, 0)) and "sm_80" in on(cap=(8, 0))
    assert "sm_100" in on(cap=(10, 0))  # Blackwell: FA4's SM100 kernels were never checked against attncc's lists
    assert "float32" in on(dtype=torch.float32)
    assert "up to 128" in on(s=dataclasses.replace(S, D=256, Dv=256))
    assert "multiples of 8" in on(s=dataclasses.replace(S, D=60, Dv=60))
    assert fa4.refusal(swa, S, torch.zeros(1)) == "fa4 runs on CUDA tensors only"


def test_fa4_absent_is_a_reason(monkeypatch):
    monkeypatch.setattr(fa4, "_FA", ["FlashAttention-4 is not importable (ModuleNotFoundError: x)"])
    why = fa4.refusal_on(ac.patterns.causal(), S, (9, 0), torch.bfloat16, "cpu")
    assert "not importable" in why
    assert fa4.refusal_on(ac.patterns.causal(), S, (9, 0), torch.bfloat16, "cpu", assume_installed=True) is None


def test_an_operator_without_a_cute_lowering_is_a_reason(monkeypatch):
    row = ops.TABLE["tanh"]
    monkeypatch.setitem(ops.TABLE, "tanh", dataclasses.replace(row, cute=None))
    why = fa4.refusal_on(ac.patterns.softcap(20.0), S, (9, 0), torch.bfloat16, "cpu", assume_installed=True)
    assert "no CuTe lowering" in why and "'tanh'" in why


def test_auto_prefers_fa4_where_it_measured_faster(fa4_ok, monkeypatch):
    choose = lambda pattern, q=CUDA_LISTS_ON_CPU, s=S, layout=None: choices.choose_backend(  # noqa: E731
        pattern, s, q, {}, False, layout)
    assert choose(ac.patterns.causal()) == "fa4"                       # FA4's causal kernel
    assert choose(ac.patterns.alibi(2)) == "fa4"                       # the same, with a score mod
    assert choose(ac.patterns.softcap(20.0)) == "fa4"                  # tanh too
    assert choose(ac.patterns.sliding_window(64)) == "fa4"             # block-sparse
    natten = ac.patterns.natten2d(8, 16, 3)
    assert natten.layout is not None
    assert choose(natten.kernel_pattern, s=Shapes(1, 2, 2, 128, 128, 64, 64), layout=natten.layout) == "triton"
    forced = choices.choose_backend(ac.patterns.softcap(20.0), S, CUDA_BF16, {"backend": "fa4"}, False)
    assert forced == "fa4"
    monkeypatch.setattr(fa4, "refusal", lambda pattern, s, q: "fa4 is not installed")
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    assert choose(ac.patterns.causal(), q=CUDA_BF16) == "sdpa-cudnn"
    assert choose(ac.patterns.alibi(2)) == "triton"
    assert choose(ac.patterns.causal(), q=torch.zeros(1)) == "triton"  # CPU: the interpreter


def test_forcing_a_backend_that_cannot_run_says_why(monkeypatch):
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    with pytest.raises(ValueError, match="backend='fa4' cannot run this call: fa4 runs on CUDA tensors only"):
        ac.attention(q, k, v, ac.patterns.causal(), kernel_options={"backend": "fa4"})
    with pytest.raises(ValueError, match="backend='sdpa-cudnn' cannot run this call: it runs plain full"):
        ac.attention(q, k, v, ac.patterns.softcap(5.0), kernel_options={"backend": "sdpa-cudnn"})
    with pytest.raises(ValueError, match="must be one of"):
        ac.attention(q, k, v, ac.patterns.causal(), kernel_options={"backend": "attncc"})
    forced = choices.choose_backend(ac.patterns.softcap(5.0), S, CUDA_BF16, {"backend": "triton"}, False)
    assert forced == "triton"


def test_cpu_calls_name_the_triton_backend():
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    kern = ac.compile(ac.patterns.sliding_window(8), q, k, v)
    assert kern.config["backend"] == "triton" and "@triton.jit" in kern.source


def test_show_target_prints_the_hooks_and_the_call(capsys):
    from attncc.cli import main

    # a prefix-LM at the main shape's 8192 tokens, 16 heads, D=128: block-sparse with long rows, where fa4
    # measured faster
    assert main(["show", "param W = 2048\nmask = kv < W or q >= kv\nscore = score * 0.5", "--target", "h200",
                 "--q-len", "8192", "--heads", "16", "--head-dim", "128"]) == 0
    out = capsys.readouterr().out
    assert "backend: fa4" in out and "def mask_mod(" in out and "def score_mod(" in out
    assert "p_W = aux_scalars[0]" in out and "_flash_attn_fwd" in out
    # a 2-D neighbourhood in its brick layout: fa4 could run it, but Triton gathers the rows in place
    assert main(["show", "attncc.patterns:natten2d(64, 64, 7)", "--target", "h200", "--q-len", "4096",
                 "--heads", "16", "--head-dim", "64"]) == 0  # (a tiny call: a host time decides, cost.Profile.ranking)
    out = capsys.readouterr().out
    assert "backend: triton (not fa4: the cost model or the layout rule" in out and "@triton.jit" in out
    assert main(["show", "mask = q >= kv", "--target", "h100", "--head-dim", "256"]) == 0
    out = capsys.readouterr().out
    assert "backend: sdpa-cudnn (not fa4:" in out and "@triton.jit" in out


def test_compile_for_a_target_describes_the_kernel_on_any_machine():
    q, k, v = (torch.empty(4, 16, 8192, 128, dtype=torch.bfloat16, device="meta") for _ in range(3))
    kern = ac.compile(ac.patterns.sliding_window(1024), q, k, v, target="h200")
    assert kern.config["backend"] == "fa4" and kern.config["target"] == "h200"
    assert "def mask_mod(" in kern.source and kern.predicted_ms > 0
    forced = ac.compile(ac.patterns.sliding_window(1024), q, k, v, target="h200", kernel_options={"backend": "triton"})
    assert (forced.config["BLOCK_M"], forced.config["BLOCK_N"]) == (64, 64) and "@triton.jit" in forced.source
    assert forced.config["tma"] is False  # pointer loads at D <= 128, as kern.config on the GPU says
    assert forced.block_mask.BLOCK_M == 64
    natten = ac.patterns.natten2d(64, 128, 17)
    gathered = ac.compile(natten, q, k, v, target="h200")
    assert gathered.config["backend"] == "triton" and "The natural index of kernel position p" in gathered.source
    assert (gathered.config["dkdv_tiles"], gathered.config["dq_tiles"]) == ((32, 64, 4, 3), (64, 64, 4, 2))
    with pytest.raises(ValueError, match="describes a run on the NVIDIA H200"):
        kern(q, k, v)
    with pytest.raises(ValueError, match="target must be one of"):
        ac.compile(None, q, k, v, target="a100")
    with pytest.raises(ValueError, match="meta tensors, which a kernel cannot run on"):  # no target: nothing to run on
        ac.compile(None, q, k, v)
    q32 = torch.empty(4, 16, 8192, 128, device="meta")  # float32: the profiles model 16-bit calls only
    assert ac.compile(None, q32, q32, q32, target="h200").predicted_ms is None
