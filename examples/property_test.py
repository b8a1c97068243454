"""Property-testing your own pattern, and what property testing cannot tell you.

1. `ac.testing.check_pattern` on a user pattern: causal attention plus a learnable relative-
   position bias table (a float buffer, so the gradients of q, k, v *and of the table* are
   checked against float64 autograd through `ac.reference`), on random shapes: odd lengths,
   Q_LEN != KV_LEN, GQA; each example also runs a serving step (a few queries at the end of
   sequences of random lengths, from paged caches or packed, as the decode kernel reads them).
   Prints the report and its examples.
2. A deliberately wrong definition: "each query sees itself and the 7 tokens before it" written
   with an off-by-one (`q - kv <= 8`: 9 keys). check_pattern passes it, since the kernel computes
   exactly what the pattern says; a user test of `ac.create_mask` against the intended dense mask
   catches the bug, and passes the fixed `q - kv < 8`.

    python examples/property_test.py            # GPU (fp32 and bf16, lengths up to 512) if there is one
    python examples/property_test.py --small    # tiny CPU run in Triton's interpreter (also ATTNCC_EXAMPLE_SMALL=1)
"""
import argparse
import os

import torch

import attncc as ac


def intended_window(n: int, keys: int = 8) -> torch.Tensor:
    """The mask we mean, built densely by hand: query i sees keys i-keys+1 .. i."""
    ones = torch.ones(n, n, dtype=torch.bool)
    return torch.tril(ones) & torch.triu(ones, diagonal=-(keys - 1))


def mask_test(pattern: ac.Pattern, n: int = 64) -> int:
    """A user test: the positions where the pattern's dense mask differs from the intended one."""
    diff = ac.create_mask(pattern, None, None, n, n)[0, 0] != intended_window(n)
    if diff.any():
        q, kv = diff.nonzero()[0].tolist()
        print(f"  {int(diff.sum())} of {n * n} positions differ from the intended mask, first at q={q}, kv={kv}")
    return int(diff.sum())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny CPU-sized run (also ATTNCC_EXAMPLE_SMALL=1)")
    args = parser.parse_args(argv)
    small = args.small or os.environ.get("ATTNCC_EXAMPLE_SMALL") == "1" or not torch.cuda.is_available()
    device = "cpu" if small else "cuda"
    L, examples = (48, 5) if small else (512, 40)
    dtypes = (torch.float32,) if small else (torch.float32, torch.bfloat16)

    # 1. a learnable relative-position bias: table[q - kv + L - 1] covers every q, kv < L
    torch.manual_seed(0)
    table = 0.1 * torch.randn(2 * L - 1, device=device)
    relpos = ac.Pattern(lambda b, h, q, kv: q >= kv, lambda s, b, h, q, kv: s + table[q - kv + (L - 1)],
                        name="causal + relative-position bias")
    print(f"check_pattern({relpos!r}, max_examples={examples}, max_len={L}) on {device}:")
    report = ac.testing.check_pattern(relpos, device=device, dtypes=dtypes, max_examples=examples, max_len=L,
                                      head_dims=(16, 32) if small else (64, 128))
    print(f"  {report}")
    for row in report.rows:
        errs = ", ".join(f"{k} {v:.1e}" for k, v in row.items() if k.endswith("_err"))
        call = (f"serving step ({row['decode']}) q {row['q']}, kv_lens {row['kv_lens']}" if "decode" in row
                else f"q {row['q']}, k {row['k']}")
        print(f"  {call}, {row['dtype']}: {errs}")

    # 2. an off-by-one the compiler cannot know about
    wrong = ac.Pattern(lambda b, h, q, kv: (q >= kv) & (q - kv <= 8), name="window, wrong")
    fixed = ac.Pattern(lambda b, h, q, kv: (q >= kv) & (q - kv < 8), name="window, fixed")
    print(f"\ncheck_pattern on {wrong!r}: {ac.testing.check_pattern(wrong, device=device, max_examples=2, max_len=40, grad=False)}")
    print("  (it passes: the kernel matches the oracle; both compute the pattern as written)")
    print(f"user test of {wrong!r} against the intended 8-key window:")
    wrong_diff = mask_test(wrong)
    print(f"user test of {fixed!r}:")
    fixed_diff = mask_test(fixed)
    print(f"  {'passes' if fixed_diff == 0 else 'FAILS'}")
    return {"report": report, "rows": report.rows, "wrong_diff": wrong_diff, "fixed_diff": fixed_diff}


if __name__ == "__main__":
    main()
