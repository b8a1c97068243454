"""A serving loop: sequences of different lengths decode a few tokens each, their keys and values
in a paged cache, attention under a sinks + sliding-window pattern through a page table.

`ac.KVCache` holds the pages: each step appends one token per sequence (taking a free page when a
sequence fills its last one, so a sequence's pages end up scattered through the cache), runs
`ac.attention(q, cache.k, cache.v, pattern, page_table=cache.page_table, kv_lens=cache.kv_lens)`
under `torch.compile(fullgraph=True)` (one custom op in the graph, as a compiled model's decode
step would call it) and checks it against `ac.reference` on each sequence's own dense keys, the
new token at the sequence's last position.

    python examples/paged_decode.py            # GPU (bf16, 8 sequences, Hq 32 / Hkv 8, D 128) if there is one
    python examples/paged_decode.py --small    # tiny CPU run in Triton's interpreter (also ATTNCC_EXAMPLE_SMALL=1)
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
    Hq, Hkv, D, page_size = (4, 2, 16, 16) if small else (32, 8, 128, 64)
    lengths = [30, 5, 47] if small else [3000, 17, 9000, 512, 4096, 100, 2048, 7000]
    steps, pages = (3, 16) if small else (4, 2048)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    pattern = ac.patterns.sinks(4, 16 if small else 1024)
    print(f"{len(lengths)} sequences of {lengths} tokens, pages of {page_size}, pattern:\n{pattern}\n")

    g = torch.Generator(device=device).manual_seed(0)
    cache = ac.KVCache(pages, page_size, Hkv, D, batch=len(lengths), dtype=dtype, device=device)
    dense = [[] for _ in lengths]  # each sequence's (k, v) chunks in order: the oracle's

    def new_tokens(n: int, seqs: list[int]):
        kv = torch.randn(2, len(seqs), Hkv, n, D, device=device, generator=g).to(dtype)
        cache.append(kv[0], kv[1], seqs=seqs)  # takes free pages as sequences grow
        for i, b in enumerate(seqs):
            dense[b].append((kv[0, i], kv[1, i]))

    for b, n in enumerate(lengths):  # the prompts
        new_tokens(n, [b])
    worst = 0.0
    attend = torch.compile(lambda q: cache.attention(q, pattern), fullgraph=True)  # compiled once for all steps
    for step in range(steps):
        new_tokens(1, list(range(len(lengths))))  # this step's token of every sequence
        q = torch.randn(len(lengths), Hq, 1, D, device=device, generator=g).to(dtype)
        out = attend(q)  # = ac.attention(q, cache.k, cache.v, pattern, page_table=, kv_lens=)
        for b in range(len(lengths)):
            k = torch.cat([x for x, _ in dense[b]], 1)[None]  # [1, Hkv, L, D]
            v = torch.cat([y for _, y in dense[b]], 1)[None]
            q_full = torch.zeros(1, Hq, k.shape[2], D, device=device, dtype=dtype)
            q_full[:, :, -1] = q[b, :, 0]  # the new token is the sequence's last
            want = ac.reference(q_full, k, v, pattern)[0, :, -1]
            worst = max(worst, ((out[b, :, 0].double() - want).norm() / want.norm()).item())
        print(f"step {step}: kv_lens {cache.kv_lens.tolist()}, worst relative error vs ac.reference {worst:.1e}")
    assert worst < tol, worst
    return {"worst_err": worst, "tolerance": tol, "pages_used": int((cache.page_table >= 0).sum())}


if __name__ == "__main__":
    main()
