"""The sliver-band backward (runtime/sliver.py) in Triton's interpreter: a band's dq, dk, dv against
the float64 reference of the pattern that is that band, with GQA, ragged row blocks, windows
bounded on either side, Q != KV, a gradient of the LSE, bf16 and a strided dq view."""
from __future__ import annotations

import pytest
import torch

import attncc as ac
from attncc.compiler import bands, cost
from attncc.compiler.bands import Band
from attncc.runtime import sliver


def band_pattern(band: Band) -> ac.Pattern:
    def mask(b, h, q, kv):
        inside = (q >= band.q0) & (q < band.q1) & (kv >= band.k0) & (kv < band.k1)
        if band.lo is not None:
            inside = inside & (kv - q >= band.lo)
        if band.hi is not None:
            inside = inside & (kv - q <= band.hi)
        return inside
    return ac.Pattern(mask)


CASES = {  # band, (B, Hq, Hkv, Q, KV, D), dtype, with a gradient of the lse
    "sinks-columns": (Band(0, 200, 0, 4, None, 0), (1, 2, 2, 200, 200, 16), torch.float32, False),
    "gqa-window": (Band(7, 190, 30, 70, -120, 5), (2, 4, 2, 190, 160, 32), torch.float32, True),
    "unbounded-bf16": (Band(3, 140, 0, 17, None, None), (1, 2, 1, 150, 90, 24), torch.bfloat16, False),
    "right-only": (Band(0, 131, 60, 124, 1, None), (1, 1, 1, 131, 131, 64), torch.float32, True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_sliver_gradients_match_the_reference(name):
    band, (B, Hq, Hkv, Q, KV, D), dtype, with_dlse = CASES[name]
    assert bands.is_sliver(band)
    g = torch.Generator().manual_seed(len(name))
    q = torch.randn(B, Hq, Q, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, KV, D, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(B, Hq, Q, D, generator=g, dtype=torch.float64)
    dlse = torch.randn(B, Hq, Q, generator=g, dtype=torch.float64) if with_dlse else None
    pattern = band_pattern(band)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = ac.reference(*leaves, pattern, return_lse=True)
    loss = (out * dout).sum() + ((torch.where(lse.isfinite(), lse, 0) * dlse).sum() if with_dlse else 0)
    want = torch.autograd.grad(loss, leaves)
    rows = band.q1 - band.q0
    full_dq = torch.full((B, Hq, Q + 5, D), float("nan"), dtype=dtype)  # a strided view of a larger tensor
    dq = full_dq[:, :, 2:2 + rows]
    cast = (lambda t: t.to(dtype))  # noqa: E731
    dk, dv = sliver.backward(cast(q), cast(k), cast(v), cast(out.detach()), cast(dout), lse.detach().float(),
                             None if dlse is None else dlse.float(), band, D ** -0.5, dq)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
    assert dk.dtype == dv.dtype == torch.float32 and dk.shape == (B, Hkv, band.k1 - band.k0, D)
    assert rel(dq, want[0][:, :, band.q0:band.q1]) < tol
    assert rel(dk, want[1][:, :, band.k0:band.k1]) < tol and rel(dv, want[2][:, :, band.k0:band.k1]) < tol
    assert full_dq[:, :, :2].isnan().all() and full_dq[:, :, 2 + rows:].isnan().all()  # nothing outside written
    outside = torch.ones(Q, dtype=torch.bool)
    outside[band.q0:band.q1] = False
    assert (want[0][:, :, outside] == 0).all()  # the band is all the pattern: other rows have no gradient


def test_sinks_backward_runs_the_sliver_kernel_and_is_modelled_so():
    """sinks' sink columns (4 keys) are a sliver; the window band is not. The model predicts the
    sliver as one pass over its rows' q, out, dout and dq, deterministic or not."""
    sink, window = Band(0, 8192, 0, 4, None, 0), Band(4, 8192, 4, 8192, -1024, 0)
    assert sliver.runs(sink, has_score_mod=False) and not sliver.runs(sink, has_score_mod=True)
    assert not bands.is_sliver(window)
    h200 = cost.load_profile("h200")
    alone = cost.simulate_fa4_backward([(sink,)], 4, 16, 16, 128, h200, slivers=True)
    assert alone == pytest.approx(8192 * 16 * 4 * 4 * 128 * 2 / (h200.hbm_tbps * 1e12) * 1e3)
    assert alone == cost.simulate_fa4_backward([(sink,)], 4, 16, 16, 128, h200, deterministic=False, slivers=True)
    assert alone < cost.simulate_fa4_backward([(sink,)], 4, 16, 16, 128, h200) / 4
