"""MoBA-style block top-k attention: each query block picks its k key blocks from the data.

`ac.patterns.block_topk(q, k, block_size, topk)` pools each block of queries and keys (the mean),
scores every (query block, key block) pair by the pooled dot product, keeps the top-k causal key
blocks of each query block (its own block always), and masks everything else; inside the kept
blocks attention is causal. The selection is a buffer of the pattern, so a new selection (new
data) rebinds it without recompiling. The output is checked against the float64 reference, and
the block mask shows how few tiles run.

    python examples/moba_topk.py            # GPU (bf16, B=1 H=8 N=8192 D=128, blocks of 512, top 3) if there is one
    python examples/moba_topk.py --small    # tiny CPU run in Triton's interpreter (also ATTNCC_EXAMPLE_SMALL=1)
"""
import argparse
import os

import torch

import attncc as ac


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny CPU-sized run (also ATTNCC_EXAMPLE_SMALL=1)")
    args = parser.parse_args(argv)
    small = args.small or os.environ.get("ATTNCC_EXAMPLE_SMALL") == "1" or not torch.cuda.is_available()
    device, dtype = ("cpu", torch.float32) if small else ("cuda", torch.bfloat16)
    B, H, N, D, block, topk = (1, 2, 192, 16, 32, 2) if small else (1, 8, 8192, 128, 512, 3)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4

    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(3))
    pat = ac.patterns.block_topk(q, k, block, topk)
    sel = next(iter(pat.buffers.values()))                   # bool [B, H, query blocks, key blocks]
    print(f"{pat!r}\nkey blocks per query block (head 0): {sel[0, 0].sum(-1).tolist()}")
    ref = ac.reference(q, k, v, pat)
    err = ((ac.attention(q, k, v, pat).double() - ref).norm() / ref.norm()).item()
    bm = ac.create_block_mask(pat, B, H, N, N, block_size=block)
    live, total = int(bm.to_dense().ne(0).sum()), B * H * (N // block) ** 2
    print(f"relative error {err:.2e}; {live} of {total} {block}x{block} blocks live")
    q2 = torch.randn_like(q)                                 # new data: a new selection, same kernel
    again = ac.patterns.block_topk(q2, k, block, topk)
    ref2 = ac.reference(q2, k, v, again)
    err2 = ((ac.attention(q2, k, v, again).double() - ref2).norm() / ref2.norm()).item()
    sel2 = next(iter(again.buffers.values()))
    return {"err": err, "err_new_selection": err2, "tolerance": tol, "live": live, "total": total,
            "diagonal_kept": bool(sel.diagonal(dim1=-2, dim2=-1).all()), "per_row": sel.sum(-1).max().item(),
            "selection_changed": not torch.equal(sel, sel2)}


if __name__ == "__main__":
    main()
