"""2-D neighbourhood attention on an image grid, in row-major order and in a brick layout.

`ac.patterns.natten2d(rows, cols, kernel)`: each pixel attends to the kernel x kernel window
around it. In row-major token order a query tile is a strip of one or two image rows whose
neighbours lie in rows above and below, so many kv tiles are touched; a brick layout
(`default_layout((rows, cols))`, `pattern.with_layout(layout)`) stores the image as compact
bricks, so a tile's neighbourhood covers fewer tiles (natten2d picks one by default; `with_layout(None)`
runs it row-major). The layout changes how the pattern runs,
never what it means: both outputs are compared with the same float64 reference, and the live
tiles of each block mask (`ac.create_block_mask(pattern.kernel_pattern, ...)`) are counted.

    python examples/neighborhood_2d.py            # GPU (bf16, 64x128 image, kernel 17, H=8 D=64) if there is one
    python examples/neighborhood_2d.py --small    # 16x64 image, kernel 7, on CPU (also ATTNCC_EXAMPLE_SMALL=1)
"""
import argparse
import os

import torch

import attncc as ac
from attncc.compiler.layout import default_layout


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny CPU-sized run (also ATTNCC_EXAMPLE_SMALL=1)")
    args = parser.parse_args(argv)
    small = args.small or os.environ.get("ATTNCC_EXAMPLE_SMALL") == "1" or not torch.cuda.is_available()
    device, dtype = ("cpu", torch.float32) if small else ("cuda", torch.bfloat16)
    (rows, cols, kernel), B, H, D = ((16, 64, 7), 1, 1, 32) if small else ((64, 128, 17), 1, 8, 64)
    # on CPU, the 128x64 tiles the GPU uses for this head dim (the interpreter's default 32x32
    # would make the run slow and the tiles smaller than the layout's bricks were chosen for)
    options = {"BLOCK_M": 128, "BLOCK_N": 64} if small else None
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4

    N = rows * cols
    bricked = ac.patterns.natten2d(rows, cols, kernel)  # runs in default_layout((rows, cols)) by default
    plain = bricked.with_layout(None)                   # the same pattern in row-major token order
    layout = bricked.layout
    assert layout == default_layout((rows, cols))
    print(f"{rows}x{cols} image, {kernel}x{kernel} neighbourhoods, N = {N} tokens; {layout!r}\n{plain}\n")

    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(3))
    ref = ac.reference(q, k, v, plain)                 # natural order, whatever the layout
    results = {"tolerance": tol}
    for name, pat in (("row-major", plain), ("brick layout", bricked)):
        kern = ac.compile(pat, q, k, v, kernel_options=options)
        tiles = (kern.config["BLOCK_M"], kern.config["BLOCK_N"])
        bm = ac.create_block_mask(pat.kernel_pattern, None, None, N, N, block_size=tiles)
        live = int(bm.to_dense().ne(0).sum())
        out = kern(q, k, v)                            # takes and returns natural token order
        err = ((out.double() - ref).norm() / ref.norm()).item()
        total = bm.shape[2] * bm.shape[3]
        print(f"== {name}: {live} live tiles of {total} ({tiles[0]}x{tiles[1]}), relative error {err:.2e}")
        if small:
            print(bm.ascii())
        results[name] = {"live_tiles": live, "tiles": total, "err": err}
    cut = results["row-major"]["live_tiles"] / results["brick layout"]["live_tiles"]
    print(f"\nthe brick layout runs {cut:.2f}x fewer tiles for the same output")
    return results


if __name__ == "__main__":
    main()
