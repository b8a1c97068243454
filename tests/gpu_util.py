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


def reference_grads(pattern, q, k, v, w):
    """grads of the float64 oracle."""
    import attncc as ac

    return grads(lambda q, k, v: ac.reference(q.double(), k.double(), v.double(), pattern), q, k, v, w)


def checked_grads(pattern, q, k, v, w, kernel_options, tol=3e-2):
    """attncc's grads under `kernel_options`, asserted to have the inputs' dtypes and shapes, no
    NaN, and a relative error below `tol` against the float64 oracle's."""
    import attncc as ac

    ours = grads(lambda q, k, v: ac.attention(q, k, v, pattern, kernel_options=kernel_options), q, k, v, w)
    for a, b, t in zip(ours, reference_grads(pattern, q, k, v, w), (q, k, v)):
        assert a.dtype == t.dtype and a.shape == t.shape
        assert not a.isnan().any() and rel(a, b) < tol, rel(a, b)
    return ours
