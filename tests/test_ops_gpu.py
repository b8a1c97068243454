"""Every operator, and the operator semantics the interpreter tests pin down, compiled for the GPU
(run with `pytest -m gpu`): the same kernels as tests/test_ops.py, but through ptxas rather than
Triton's interpreter, whose float rounding and libdevice calls can differ."""
import pytest
import torch

import attncc as ac
from attncc.dsl import ir, ops
from attncc.testing import compare, compare_grads
from gpu_util import qkv
from test_ops import as_mask, sample

pytestmark = pytest.mark.gpu
OURS = {"backend": "triton"}
q, kv, score = ir.Var("q"), ir.Var("kv"), ir.Var("score")


@pytest.mark.parametrize("name", sorted(ops.TABLE))
def test_every_operator_in_a_compiled_kernel(name):
    node = sample(name)
    if ir.kind_of(node) == "bool":
        pat = ac.Pattern.from_ir(mask=ir.op("or", node, ir.op("eq", q, kv)))
    else:
        pat = ac.Pattern.from_ir(score=ir.op("add", score, ir.op("mul", ir.const(0.1), node)))
    # 200 tokens: the sample's operands grow with q, and past ~900 tokens exp / exp2 add up to 1e15 to
    # a row's float32 scores, which then hold nothing of q.k (float64's reference still does)
    compare(pat, *qkv(1, 4, 2, 200, 64, dtype=torch.float32), kernel_options=OURS)
    if name == "pow":  # a deciding ** takes the exponents whose float64 result torch and the kernels share
        node = ir.op("pow", node.args[0], ir.const(0.5))
    compare(ac.Pattern.from_ir(mask=as_mask(node)), *qkv(1, 4, 2, 999, 64), kernel_options=OURS)


EDGE = {  # each pinned on CPU by a test that failed before its fix (24th session)
    "sqrt-squares": lambda: ac.Pattern(lambda b, h, q, kv: (kv ** 0.5 == (kv ** 0.5) // 1) | (q == kv)),
    "floordiv-by-zero": lambda: ac.Pattern(score_mod=lambda s, b, h, q, kv: torch.where(s // (s * 0.0) > 0, s, 3 * s)),
    "tanh-near-zero": lambda: ac.patterns.softcap(1000.0),
    "tanh-nearer-zero": lambda: ac.Pattern(score_mod=lambda s, b, h, q, kv: 1e6 * torch.tanh(s * 1e-6)),
    "per-program-mask": lambda: ac.Pattern(lambda b, h, q, kv: h % 3 != 1),
    "per-program-score": lambda: ac.Pattern(score_mod=lambda s, b, h, q, kv: h * 0.5 - b),
    "bool-sum-is-or": lambda: ac.Pattern(lambda b, h, q, kv: (q >= kv) + (kv % 3 == 0)),
    "bool-product-is-and": lambda: ac.Pattern(lambda b, h, q, kv: (q >= kv) * (kv % 3 != 0) | (q == kv)),
}


@pytest.mark.parametrize("name", sorted(EDGE))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_operator_edge_cases_forward_and_backward(name, dtype):
    pat = EDGE[name]()
    q_, k_, v_ = qkv(2, 6, 3, 1031, 64, dtype=dtype)
    compare(pat, q_, k_, v_, kernel_options=OURS)
    compare_grads(pat, q_, k_, v_, kernel_options=OURS)
