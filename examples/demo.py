"""The attncc demo: a pattern, its IR, a picture of its mask, its compiled Triton kernel (run on the
GPU if there is one, else in Triton's interpreter) and checks against the float64 oracle."""
import torch

import attncc as ac
from attncc.dsl import ir
from attncc.viz import ascii_mask

SOURCE = '''sliding-window causal attention with soft-capped scores'''


def main() -> None:
    W = ac.param("W", 24)

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= W)

    def score_mod(score, b, h, q_idx, kv_idx):
        return 30.0 * torch.tanh(score / 30.0)

    pat = ac.Pattern(mask_mod, score_mod, name="swa_softcap")
    print(f"== pattern ({SOURCE})\n{pat}\n")
    print(f"== IR (node : kind)\nmask =\n{ir.tree(pat.mask)}\nscore =\n{ir.tree(pat.score)}\n")
    print("== mask, 64 x 64 tokens ('#' attends)")
    print(ascii_mask(ac.create_mask(pat, None, None, 64, 64)[0, 0]))

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 77, 32) for _ in range(3))
    out, lse = ac.reference(q, k, v, pat, return_lse=True)
    # an independent dense computation of the same thing
    s = 30.0 * torch.tanh((q.double() @ k.double().transpose(-1, -2)) * 32 ** -0.5 / 30.0)
    i = torch.arange(77)
    s = s.masked_fill(~((i[:, None] >= i[None]) & (i[:, None] - i[None] <= 24)), float("-inf"))
    expected = torch.softmax(s, -1) @ v.double()
    err = ((out - expected).norm() / expected.norm()).item()
    print(f"\n== reference vs hand-written softmax: relative error {err:.2e}")
    assert err < 1e-12, err

    # -- the compiled kernel: the GPU if there is one, else the same source in Triton's interpreter
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = 4096 if device == "cuda" else 77
    q, k, v = (torch.randn(2, 4, n, 64, device=device, dtype=dtype) for _ in range(3))
    kern = ac.compile(pat, q, k, v)
    print(f"\n== generated Triton source ({kern.config})\n{kern.source}")
    print(f"== block map, {kern.block_mask.BLOCK_M} x {kern.block_mask.BLOCK_N} tiles")
    print(kern.block_mask.ascii())
    out, lse = kern(q, k, v, return_lse=True)
    ref, ref_lse = ac.reference(q, k, v, pat, return_lse=True)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    print(f"\n== kernel on {device} ({dtype}) vs ac.reference: relative error {err:.2e}")
    assert err < (2e-2 if dtype == torch.bfloat16 else 1e-4), err
    for window in (8, 40):  # a new param value: the same kernel, only the block map is rebuilt
        narrow = pat.bind(W=window)
        err = ((ac.attention(q, k, v, narrow).double() - ac.reference(q, k, v, narrow)).norm()
               / ac.reference(q, k, v, narrow).norm()).item()
        print(f"== W = {window}: same kernel, relative error {err:.2e}")


if __name__ == "__main__":
    main()
