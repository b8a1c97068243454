"""Training a tiny causal transformer language model whose attention is attncc's.

A character-level model (token + position embeddings, 2 pre-norm layers of attention and MLP)
learns to predict the next character of real text available offline: the attncc package's own
source files. Every layer's attention is `ac.attention` with a sliding-window causal mask and
soft-capped scores (`sliding_window(W) & softcap(cap, causal=False)`), so each step runs attncc's
generated forward and backward kernels. Prints the loss every few steps and, before and after
training, on a fixed batch (it goes down); `--plot PATH` saves the loss curve as a PNG if
matplotlib is installed.

    python examples/tiny_transformer.py                  # GPU: seq 256, d_model 256, 4 heads of 64, 300 steps
    python examples/tiny_transformer.py --small          # CPU: seq 32, d_model 32, 1 head of 16, 30 steps (~20 s)
    python examples/tiny_transformer.py --steps 100 --plot loss.png
"""
import argparse
import os
import pathlib
import time

import torch
from torch import nn

import attncc as ac


class Block(nn.Module):
    def __init__(self, d: int, heads: int, head_dim: int, pattern: ac.Pattern):
        super().__init__()
        self.shape, self.pattern = (3, heads, head_dim), pattern
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * heads * head_dim), nn.Linear(heads * head_dim, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x)).unflatten(2, self.shape).permute(2, 0, 3, 1, 4)  # [B, H, N, Dh] each
        x = x + self.proj(ac.attention(q, k, v, self.pattern).transpose(1, 2).flatten(2))
        return x + self.mlp(self.ln2(x))


def train(small: bool, steps: int | None, plot: str | None) -> dict:
    device = "cpu" if small else "cuda"
    # small: each attention call runs 2 programs (one per sequence) in Triton's interpreter
    seq, d, heads, head_dim, batch, window, default_steps, lr = (
        (32, 32, 1, 16, 2, 16, 30, 1e-2) if small else (256, 256, 4, 64, 32, 64, 300, 2e-3))
    steps = steps or default_steps
    text = "\n".join(p.read_text() for p in sorted(pathlib.Path(ac.__file__).parent.rglob("*.py")))
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text], device=device)
    pattern = ac.patterns.sliding_window(window) & ac.patterns.softcap(20.0, causal=False)
    torch.manual_seed(0)
    model = nn.ModuleDict(dict(tok=nn.Embedding(len(chars), d), pos=nn.Embedding(seq, d),
                               blocks=nn.ModuleList(Block(d, heads, head_dim, pattern) for _ in range(2)),
                               head=nn.Sequential(nn.LayerNorm(d), nn.Linear(d, len(chars))))).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    print(f"corpus: {len(text):,} characters of attncc's source, {len(chars)} distinct; "
          f"{sum(p.numel() for p in model.parameters()):,} parameters on {device}\n{pattern}\n")

    def loss_of(starts):
        x = torch.stack([data[s:s + seq] for s in starts])
        y = torch.stack([data[s + 1:s + seq + 1] for s in starts])
        with torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda"):
            h = model.tok(x) + model.pos(torch.arange(seq, device=device))
            for block in model.blocks:
                h = block(h)
            logits = model.head(h)
        return nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    # fixed, spread over the text; 16 sequences, so the loss measures the model, not the text they hit
    held_out = range(0, len(data) - seq - 1, (len(data) - seq - 1) // 16)[:16]
    with torch.no_grad():
        eval_before = loss_of(held_out).item()
    losses, start = [], time.time()
    for step in range(1, steps + 1):
        loss = loss_of(torch.randint(0, len(data) - seq - 1, (batch,)).tolist())
        opt.zero_grad(set_to_none=True)
        loss.backward()                                          # attncc's backward kernels
        opt.step()
        losses.append(loss.item())
        if step == 1 or step % max(1, steps // 10) == 0 or step == steps:
            print(f"step {step:4d}  loss {losses[-1]:.3f}  ({time.time() - start:.1f} s)")
    with torch.no_grad():
        eval_after = loss_of(held_out).item()
    print(f"\nloss on a fixed batch: {eval_before:.3f} before training, {eval_after:.3f} after {steps} steps")
    if plot:
        save_plot(losses, plot)
    return {"losses": losses, "eval_before": eval_before, "eval_after": eval_after, "seconds": time.time() - start}


def save_plot(losses: list, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("matplotlib is not installed: no plot")
    fig, ax = plt.subplots(figsize=(6, 3.5), layout="tight")
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title="tiny transformer, attncc attention")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"loss curve saved to {path}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny CPU-sized run (also ATTNCC_EXAMPLE_SMALL=1)")
    parser.add_argument("--steps", type=int, help="training steps (default 300, small 30)")
    parser.add_argument("--plot", metavar="PATH", help="save the loss curve to this PNG (needs matplotlib)")
    args = parser.parse_args(argv)
    small = args.small or os.environ.get("ATTNCC_EXAMPLE_SMALL") == "1" or not torch.cuda.is_available()
    threads = torch.get_num_threads()
    if small:  # tensors this tiny: a thread pool costs more than it saves (20x on a busy 2-core machine)
        torch.set_num_threads(1)
    try:
        return train(small, args.steps, args.plot)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
