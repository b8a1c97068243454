"""Packed sequences for training: documents of different lengths in one row, each token
attending (causally) only within its own document.

Builds the document ids from the lengths, the `ac.patterns.document` pattern, prints the block
map (tiles across two documents are EMPTY and skipped), then runs forward + backward through
attncc's kernels and checks the output and the gradients of q, k, v against float64 autograd
through `ac.reference`.

    python examples/document_packing.py            # GPU (bf16, B=2 H=8 N=4096 D=128) if there is one
    python examples/document_packing.py --small    # tiny CPU run in Triton's interpreter (also ATTNCC_EXAMPLE_SMALL=1)
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
    B, H, D = (1, 2, 32) if small else (2, 8, 128)
    lengths = [37, 20, 45, 26] if small else [700, 1500, 96, 1024, 300, 476]
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4        # ac.testing.GRAD_TOLERANCE

    ids = ac.patterns.lengths_to_ids(lengths, device=device)
    N = len(ids)
    pat = ac.patterns.document(ids=ids)  # or lengths=[...], offsets=[0, ...] (cu_seqlens)
    print(f"{len(lengths)} documents of lengths {lengths} packed into N = {N} tokens\n{pat}\n")
    bm = ac.create_block_mask(pat, None, None, N, N, block_size=32 if small else 128)
    print(f"{bm}\n")

    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, H, N, D, device=device)
    out = ac.attention(q, k, v, pat)                       # generated forward kernel
    (out.float() * dout).sum().backward()                  # generated backward kernels: dq, dk, dv
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = ac.reference(q64, k64, v64, pat)                 # float64 oracle, differentiated by autograd
    (ref * dout.double()).sum().backward()

    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    errs = {"out": rel(out.detach(), ref.detach()), "dq": rel(q.grad, q64.grad), "dk": rel(k.grad, k64.grad),
            "dv": rel(v.grad, v64.grad)}
    for name, err in errs.items():
        print(f"{name:>3} vs float64 reference: relative error {err:.2e}")
    # a token's gradient comes only from its own document: perturbing document 0's keys changes
    # nothing in the other documents' outputs
    k2 = k.detach().clone()
    k2[:, :, ids == 0] += 1.0
    other = ids != 0
    leak = (ac.attention(q.detach(), k2, v.detach(), pat) - out.detach())[:, :, other].abs().max().item()
    print(f"max change outside document 0 after changing its keys: {leak:.1e}")
    ok = max(errs.values()) < tol and leak == 0
    print(f"{'OK' if ok else 'FAILED'}: errors within {tol:.0e}, no leak across documents")
    return {"errors": errs, "tolerance": tol, "leak": leak, "sparsity": bm.sparsity()}


if __name__ == "__main__":
    main()
