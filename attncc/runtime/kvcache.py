"""KVCache: the paged keys and values of a batch of sequences, for ac.attention's paged calls."""
from __future__ import annotations

import operator

import torch

from .inputs import KERNEL_DTYPES, kernel_head_dim


class KVCache:
    """Keys and values of `batch` sequences in `num_pages` pages of `page_size` tokens.

    k, v: [num_pages, page_size, heads, head_dim]; page_table: int32 [batch, num_pages] (a
    sequence's pages in order, -1 past them); kv_lens: int32 [batch]. `append` writes new tokens
    (taking free pages as sequences grow), `release` frees a finished sequence's pages,
    `attention(q, pattern)` is `ac.attention(q, k, v, pattern, page_table=..., kv_lens=...)`:
    q [batch, Hq, Q_LEN, head_dim] are each sequence's newest Q_LEN tokens (appended first).
    """

    def __init__(self, num_pages: int, page_size: int, heads: int, head_dim: int, batch: int, *,
                 dtype: torch.dtype = torch.bfloat16, device=None, head_dim_v: int | None = None):
        for name, x in (("num_pages", num_pages), ("heads", heads), ("batch", batch)):
            if not isinstance(x, int) or isinstance(x, bool) or x < 1:
                raise ValueError(f"{name} must be a positive int, got {x!r}")
        for name, x in (("head_dim", head_dim), ("head_dim_v", head_dim if head_dim_v is None else head_dim_v)):
            if not kernel_head_dim(x):
                raise ValueError(f"{name} must be an int in 16..256 (attncc's kernels), got {x!r}")
        if not isinstance(page_size, int) or page_size < 16 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 16, got {page_size!r}")
        if dtype not in KERNEL_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(map(str, KERNEL_DTYPES))}, got {dtype}")
        self.page_size = page_size
        # normal tensors even when made under torch.inference_mode: writable in and out of it, and
        # versioned (page_table, kv_lens: see _vouch)
        with torch.inference_mode(False):
            self.k = torch.zeros(num_pages, page_size, heads, head_dim, dtype=dtype, device=device)
            self.v = torch.zeros(num_pages, page_size, heads, head_dim_v or head_dim, dtype=dtype, device=device)
            self.page_table = torch.full((batch, num_pages), -1, dtype=torch.int32, device=self.k.device)
            self.kv_lens = torch.zeros(batch, dtype=torch.int32, device=self.k.device)
        self._lens = [0] * batch                      # host copies: bookkeeping without device syncs
        self._pages: list[list[int]] = [[] for _ in range(batch)]
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: page 0 is taken first
        self._vouch()

    def append(self, k: torch.Tensor, v: torch.Tensor, seqs: list[int] | None = None) -> None:
        """Write n new tokens of each of `seqs` (default: every sequence): k [len(seqs), heads, n,
        head_dim], v [.., head_dim_v]. A ValueError (nothing written) when pages run out; on any
        error the cache is as before the call."""
        try:
            seqs = list(range(len(self._lens))) if seqs is None else [operator.index(b) for b in seqs]
        except TypeError:
            raise ValueError(f"seqs must be a list of sequence indices, got {seqs!r}") from None
        if k.dim() != 4 or k.shape[0] != len(seqs) or k.shape[1] != self.k.shape[2] or k.shape[3] != self.k.shape[3]:
            raise ValueError(f"k must be [{len(seqs)}, {self.k.shape[2]}, n, {self.k.shape[3]}], got {list(k.shape)}")
        if v.shape[:3] != k.shape[:3] or v.shape[3] != self.v.shape[3]:
            raise ValueError(f"v must be [{len(seqs)}, {self.v.shape[2]}, {k.shape[2]}, {self.v.shape[3]}], "
                             f"got {list(v.shape)}")
        if len(set(seqs)) != len(seqs) or any(not 0 <= b < len(self._lens) for b in seqs):
            raise ValueError(f"seqs must be distinct sequence indices below {len(self._lens)}, got {seqs}")
        n, P = k.shape[2], self.page_size
        need = sum(-(-(self._lens[b] + n) // P) - len(self._pages[b]) for b in seqs)
        if need > len(self._free):
            raise ValueError(f"the cache is out of pages: appending {n} token(s) needs {need} more, "
                             f"{len(self._free)} are free (release finished sequences)")
        lens, pages, free = list(self._lens), [list(p) for p in self._pages], list(self._free)
        rows, taken = [], []
        for b in seqs:
            while len(pages[b]) * P < lens[b] + n:
                taken.append((b, len(pages[b])))
                pages[b].append(free.pop())
            rows += [pages[b][t // P] * P + t % P for t in range(lens[b], lens[b] + n)]
            lens[b] += n
        try:
            for b, slot in taken:
                self.page_table[b, slot] = pages[b][slot]
            index = self._to_device(rows, torch.int64)
            self.k.view(-1, *self.k.shape[2:])[index] = k.transpose(1, 2).flatten(0, 1).to(self.k.dtype)
            self.v.view(-1, *self.v.shape[2:])[index] = v.transpose(1, 2).flatten(0, 1).to(self.v.dtype)
            self.kv_lens.copy_(self._to_device(lens, torch.int32))
        except BaseException:  # the host bookkeeping unchanged; the pages taken given back in the table
            for b, slot in taken:
                self.page_table[b, slot] = -1
            self.kv_lens.copy_(self._to_device(self._lens, torch.int32))
            self._vouch()
            raise
        self._lens, self._pages, self._free = lens, pages, free
        self._vouch()

    def _to_device(self, values: list[int], dtype: torch.dtype) -> torch.Tensor:
        """A host list on the cache's device; on CUDA through pinned memory without waiting for the
        GPU (a plain copy from pageable memory would wait for the work queued before it)."""
        host = torch.tensor(values, dtype=dtype)
        if self.k.device.type != "cuda":
            return host.to(self.k.device)
        return host.pin_memory().to(self.k.device, non_blocking=True)

    def _vouch(self) -> None:
        """Tell the paged calls the lengths it keeps on the host (runtime/sequences.vouch)."""
        from .sequences import vouch

        vouch(self.kv_lens, self.page_table, self.k.shape[0], self.page_size, self._lens)

    def release(self, b: int) -> None:
        """Free sequence b's pages; it starts again empty."""
        try:
            b = operator.index(b)
        except TypeError:
            raise ValueError(f"b must be a sequence index (an int), got {b!r}") from None
        if isinstance(b, bool) or not 0 <= b < len(self._lens):
            raise ValueError(f"b must be a sequence index below {len(self._lens)}, got {b!r}")
        self._free += reversed(self._pages[b])
        self._pages[b] = []
        self._lens[b] = 0
        self.page_table[b] = -1
        self.kv_lens[b] = 0
        self._vouch()

    def attention(self, q: torch.Tensor, pattern=None, **kwargs):
        """ac.attention over the cache: q [batch, Hq, Q_LEN, head_dim], the sequences' newest tokens."""
        from .api import attention

        return attention(q, self.k, self.v, pattern, page_table=self.page_table, kv_lens=self.kv_lens, **kwargs)
