"""2-D neighbourhood attention (NATTEN, Hassani et al. 2023) on a row-major canvas.

Tokens are pixels of an `rows x cols` canvas, token i at (i // cols, i % cols). A query attends to
the `kh x kw` window centred on it, shifted inward at the borders so every window is full size
(the centre is clamped to [k//2, size-1-k//2]).
"""
from ..dsl.pattern import Pattern


def natten2d(rows: int, cols: int, kernel: int | tuple[int, int] = 7) -> Pattern:
    """mask = |clamp(qr) - kr| <= kh//2 and |clamp(qc) - kc| <= kw//2 (clamped centres)."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    if kh > rows or kw > cols or kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel {kh}x{kw} must be odd and fit the {rows}x{cols} canvas")
    rh, rw = kh // 2, kw // 2

    def mask(b, h, q, kv):
        qr = (q // cols).clamp(rh, rows - 1 - rh)
        qc = (q % cols).clamp(rw, cols - 1 - rw)
        return (abs(qr - kv // cols) <= rh) & (abs(qc - kv % cols) <= rw)

    return Pattern(mask, name="natten2d")
