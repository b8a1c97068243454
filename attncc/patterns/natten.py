"""2-D neighbourhood attention (NATTEN, Hassani et al. 2023) on a row-major canvas.

Tokens are pixels of an `rows x cols` canvas, token i at (i // cols, i % cols). A query attends to
the `kh x kw` window centred on it, shifted inward at the borders so every window is full size
(the centre is clamped to [k//2, size-1-(k-1)//2]; an even kernel takes k//2 keys before the
centre and k//2 - 1 after, as NATTEN). An alias of `neighborhood((rows, cols), kernel)`
(attncc/patterns/neighborhood.py: 1-D/2-D/3-D, dilation, stride, causal axes).
"""
from ..dsl.pattern import Pattern
from .neighborhood import neighborhood


def natten2d(rows: int, cols: int, kernel: int | tuple[int, int] = 7) -> Pattern:
    """mask = -(kh//2) <= kr - clamp(qr) <= (kh-1)//2 and likewise for columns (clamped centres; odd
    kernels: |clamp(qr) - kr| <= kh//2): `neighborhood((rows, cols), kernel)` (equal to it), named "natten2d"."""
    nb = neighborhood((rows, cols), kernel)
    return Pattern.from_ir(nb.mask, name="natten2d", layout=nb.layout)
