"""Pictures of patterns: ASCII for terminals, PNG (matplotlib) for files."""
from __future__ import annotations

import torch


def ascii_mask(mask: torch.Tensor, max_size: int = 64) -> str:
    """A bool [Q, KV] mask as text, '#' live and '.' dead, downsampled to at most max_size cells a side.

    A downsampled cell is '#' if all its pairs are live, '+' if some are, '.' if none.
    """
    if mask.dim() != 2:
        raise ValueError(f"ascii_mask needs a 2-D [Q, KV] mask, got shape {tuple(mask.shape)}")
    Q, KV = mask.shape
    rq, rk = -(-Q // max_size), -(-KV // max_size)
    m = mask.float().cpu()
    pad = torch.zeros(-(-Q // rq) * rq, -(-KV // rk) * rk)
    cnt = torch.zeros_like(pad)
    pad[:Q, :KV] = m
    cnt[:Q, :KV] = 1
    live = pad.view(pad.shape[0] // rq, rq, pad.shape[1] // rk, rk).sum((1, 3))
    total = cnt.view(cnt.shape[0] // rq, rq, cnt.shape[1] // rk, rk).sum((1, 3))
    rows = []
    for lr, tr in zip(live.tolist(), total.tolist()):
        rows.append("".join("#" if l == t else "." if l == 0 else "+" for l, t in zip(lr, tr)))
    return "\n".join(rows)


def ascii_block_map(classes: torch.Tensor, max_size: int = 64) -> str:
    """An int [QB, KB] block map (0 empty, 1 partial, 2 full) as text: '#' full, '+' partial, '.' empty.

    Downsampled like ascii_mask: a cell is '#' if all its tiles are full, '.' if all are empty.
    """
    if classes.dim() != 2:
        raise ValueError(f"ascii_block_map needs a 2-D [QB, KB] block map, got shape {tuple(classes.shape)}")
    full = ascii_mask(classes == 2, max_size).splitlines()
    empty = ascii_mask(classes == 0, max_size).splitlines()
    return "\n".join("".join("#" if f == "#" else "." if e == "#" else "+" for f, e in zip(fr, er))
                     for fr, er in zip(full, empty))


def save_png(path: str, mask: torch.Tensor, block_map: torch.Tensor | None = None, title: str = "") -> None:
    """Write a picture of a bool [Q, KV] mask, and beside it an int [QB, KB] block map if given."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    if mask.dim() != 2:
        raise ValueError(f"save_png needs a 2-D [Q, KV] mask, got shape {tuple(mask.shape)}")
    panels = 1 if block_map is None else 2
    fig = Figure(figsize=(5 * panels, 5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    axes[0].imshow(mask.cpu().numpy(), cmap=ListedColormap(["#f4f4f4", "#1f4e9c"]), vmin=0, vmax=1,
                   interpolation="nearest")
    axes[0].set(title=f"mask ({mask.shape[0]} x {mask.shape[1]})", xlabel="kv", ylabel="q")
    if block_map is not None:
        axes[1].imshow(block_map.cpu().numpy(), cmap=ListedColormap(["#f4f4f4", "#f0a030", "#1f4e9c"]),
                       vmin=0, vmax=2, interpolation="nearest")
        counts = [int((block_map == c).sum()) for c in (2, 1, 0)]
        axes[1].set(title="blocks: {} full (blue), {} partial (orange), {} empty".format(*counts),
                    xlabel="kv block", ylabel="q block")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100)


def save_load_png(path: str, block_map: torch.Tensor, load_ms: torch.Tensor, title: str = "") -> None:
    """Write an int [QB, KB] block map beside the predicted ms of each query tile's program [QB]
    (attncc explain --png)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    if block_map.dim() != 2 or load_ms.shape != block_map.shape[:1]:
        raise ValueError(f"save_load_png needs a [QB, KB] block map and [QB] loads, got {tuple(block_map.shape)} "
                         f"and {tuple(load_ms.shape)}")
    fig = Figure(figsize=(10, 5), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    left.imshow(block_map.cpu().numpy(), cmap=ListedColormap(["#f4f4f4", "#f0a030", "#1f4e9c"]), vmin=0, vmax=2,
                interpolation="nearest", aspect="auto")
    left.set(title="tiles: full (blue), partial (orange), empty", xlabel="kv tile", ylabel="q tile")
    rows = list(range(block_map.shape[0]))
    right.barh(rows, (load_ms.double() * 1e3).cpu().tolist(), color="#1f4e9c", height=1.0)
    right.set(title="predicted load per program", xlabel="us", ylim=(len(rows) - 0.5, -0.5))
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100)
