"""attncc's backward of a sliver band (compiler/bands.is_sliver: a band of a few keys, such as sinks'
sink columns), run beside FA4's band calls in place of FA4's own call for that band, which walks
every query tile with one program per 128-key tile (H200, sinks' 4 sink columns at B4 H16 N8192:
0.53 ms on 64 programs). The kernel (compiler/templates/sliver_backward.py.tmpl) splits the band by
query rows and sums the dk / dv shares in a fixed order: deterministic either way. It takes no
score mod: patterns with one keep FA4's call (`runs`)."""
from __future__ import annotations

import functools

import torch

from ..compiler import bands, codegen
from . import cache


def runs(band: bands.Band, has_score_mod: bool) -> bool:
    """Whether the sliver kernel computes `band`'s gradients (else FA4 does) for a pattern with or
    without a score mod."""
    return bands.is_sliver(band) and not has_score_mod


def backward(q, k, v, out, dout, lse, dlse, band: bands.Band, scale: float, dq: torch.Tensor):
    """(dk, dv) float32 [B, Hkv, k1 - k0, D] of `band`'s pairs; writes their dq into dq [B, H, q1 - q0,
    D] (a view of the result or a buffer). q [B, H, Q, D], k, v [B, Hkv, KV, D], out and dout like
    q, lse float32 [B, H, Q] (natural log) of the whole attention, dlse its gradient or None."""
    from .kernel import interpretable, launch

    interpret = not q.is_cuda
    module = _module(interpret)
    q, k, v, out, dout = interpretable(interpret, q, k, v, out, dout)
    into = torch.empty(dq.shape, dtype=q.dtype, device=dq.device) if q.dtype != dq.dtype else dq
    geometry = (band.q0, band.q1, band.k0, band.k1, band.lo, band.hi)
    dk, dv = launch(interpret, module.backward, q, k, v, out, dout, lse, dlse, geometry, scale, into)
    if into is not dq:
        dq.copy_(into)
    return dk, dv


@functools.lru_cache(maxsize=None)
def _module(interpret: bool):
    """The kernel's module, loaded once per process (each backward would otherwise rebuild and hash
    its source on the way to the cache, on the call's host path)."""
    import attncc

    source = codegen.sliver_source(attncc.__version__)
    return cache.load_kernel_module({"kind": "sliver-backward", "source": source}, lambda: source,
                                    interpret=interpret)
