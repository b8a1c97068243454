"""Reading a generated kernel: `ac.compile(...)`, then the parts of `kern.source` README's
"Reading a generated kernel" describes.

Prints the numeric plan from the source's docstring, `mask_mod` and `score_mod` (your pattern
lowered to Triton; params read from the Params array as p_NAME), the launcher's tile constants
(BLOCK_M, BLOCK_N, NUM_WARPS, NUM_STAGES), `kern.config` (the path and tiles) and `kern.block_mask`
(FULL / PARTIAL / EMPTY tiles), then runs the kernel against the float64 reference.

    python examples/read_kernel.py            # GPU (bf16, B=1 H=4 N=4096 D=128) if there is one
    python examples/read_kernel.py --small    # tiny CPU run in Triton's interpreter (also ATTNCC_EXAMPLE_SMALL=1)
"""
import argparse
import os

import torch

import attncc as ac

PATTERN = """
param W = {W}
mask  = q >= kv and q - kv <= W
score = score - 0.05 * (q - kv)
"""


def top_level(source: str, name: str) -> str:
    """The top-level definition `def name(` of `source`, with its decorator line."""
    lines = source.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"def {name}("))
    start -= lines[start - 1].startswith("@")
    end = next((i for i in range(start + 2, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines))
    return "\n".join(lines[start:end]).rstrip()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny CPU-sized run (also ATTNCC_EXAMPLE_SMALL=1)")
    args = parser.parse_args(argv)
    small = args.small or os.environ.get("ATTNCC_EXAMPLE_SMALL") == "1" or not torch.cuda.is_available()
    device, dtype = ("cpu", torch.float32) if small else ("cuda", torch.bfloat16)
    B, H, N, D, window = (1, 1, 160, 32, 70) if small else (1, 4, 4096, 128, 1024)

    pat = ac.parse(PATTERN.format(W=window))
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(3))
    kern = ac.compile(pat, q, k, v)
    src = kern.source                                    # exactly the file that runs
    plan = next(line.strip() for line in src.splitlines() if "numeric plan" in line)
    tiles = next(line for line in src.splitlines() if line.startswith("BLOCK_M, BLOCK_N, NUM_WARPS, NUM_STAGES ="))
    parts = {"mask_mod": top_level(src, "mask_mod"), "score_mod": top_level(src, "score_mod")}
    print(f"pattern:\n{pat}\n\n{len(src.splitlines())} lines of generated source; {plan}\n")
    for name, text in parts.items():
        print(f"== {name}\n{text}\n")
    print(f"== the launcher's tile constants\n{tiles}\n")
    print(f"== kern.config\n{kern.config}\n\n== kern.block_mask\n{kern.block_mask}\n")

    out = kern(q, k, v)
    ref = ac.reference(q, k, v, pat)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    print(f"the kernel vs ac.reference: relative error {err:.2e}")
    return {"source": src, "plan": plan, "tiles_line": tiles, **parts, "config": kern.config,
            "block_mask": kern.block_mask, "err": err, "tolerance": 2e-2 if dtype == torch.bfloat16 else 1e-4}


if __name__ == "__main__":
    main()
