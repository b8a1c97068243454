"""What the GPU test modules share: inputs, the error measure, gradients of a weighted sum."""
import torch


def qkv(B, Hq, Hkv, N, D, dtype=torch.bfloat16, KV=None):
    """Seeded random q [B, Hq, N, D], k and v [B, Hkv, KV or N, D] on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda h, n: torch.randn(B, h, n, D, device="cuda", dtype=dtype, generator=g)  # noqa: E731
    return mk(Hq, N), mk(Hkv, KV or N), mk(Hkv, KV or N)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def grads(fn, q, k, v, w):
    """d(sum(fn(q, k, v) * w)) / d(q, k, v) on fresh leaves."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    return torch.autograd.grad((fn(q, k, v).float() * w).sum(), (q, k, v))
