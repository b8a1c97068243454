"""A serving loop: sequences of different lengths decode a few tokens each, their keys and values
in a paged cache, attention under a sinks + sliding-window pattern through a page table.

Each step appends one token per sequence (taking a free page when a sequence fills its last one),
calls `ac.attention(q, k_cache, v_cache, pattern, page_table=..., kv_lens=...)`, and checks the
result against `ac.reference` on each sequence's own dense keys, the new token at the sequence's
last position. Page order is shuffled, so a sequence's pages are scattered through the cache.

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
    k_cache = torch.zeros(pages, page_size, Hkv, D, device=device, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    free = torch.randperm(pages, generator=torch.Generator().manual_seed(0)).tolist()  # scattered pages
    max_pages = -(-(max(lengths) + steps) // page_size)
    table = torch.full((len(lengths), max_pages), -1, dtype=torch.int32, device=device)
    dense = [([], []) for _ in lengths]  # each sequence's keys and values in order: the oracle's

    def append(b: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if pos % page_size == 0:
            table[b, pos // page_size] = free.pop()
        page = int(table[b, pos // page_size])
        k_cache[page, pos % page_size], v_cache[page, pos % page_size] = k, v
        dense[b][0].append(k)
        dense[b][1].append(v)

    for b, n in enumerate(lengths):  # the prompts
        for pos in range(n):
            append(b, pos, *torch.randn(2, Hkv, D, device=device, generator=g).to(dtype))
    kv_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    worst = 0.0
    for step in range(steps):
        for b in range(len(lengths)):  # this step's token of every sequence
            append(b, int(kv_lens[b]), *torch.randn(2, Hkv, D, device=device, generator=g).to(dtype))
        kv_lens += 1
        q = torch.randn(len(lengths), Hq, 1, D, device=device, generator=g).to(dtype)
        out = ac.attention(q, k_cache, v_cache, pattern, page_table=table, kv_lens=kv_lens)
        for b in range(len(lengths)):
            k = torch.stack(dense[b][0], 1)[None]  # [1, Hkv, L, D]
            v = torch.stack(dense[b][1], 1)[None]
            L = k.shape[2]
            q_full = torch.zeros(1, Hq, L, D, device=device, dtype=dtype)
            q_full[:, :, -1] = q[b, :, 0]  # the new token is the sequence's last
            want = ac.reference(q_full, k, v, pattern)[0, :, -1]
            err = ((out[b, :, 0].double() - want).norm() / want.norm()).item()
            worst = max(worst, err)
        print(f"step {step}: kv_lens {kv_lens.tolist()}, worst relative error vs ac.reference {worst:.1e}")
    assert worst < tol, worst
    return {"worst_err": worst, "tolerance": tol, "pages_used": pages - len(free)}


if __name__ == "__main__":
    main()
