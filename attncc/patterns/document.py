"""Document (packed sequence) masking: tokens attend only within their own document (packing
without cross-contamination, Krell et al. 2021, "Efficient Sequence Packing without
Cross-contamination"; the document mask of Llama 3's pre-training, Grattafiori et al. 2024).

`doc[i]` is the document id of token i. Causal within documents by default:
`doc[q] == doc[kv] and q >= kv` (indices absolute, as everywhere in the catalogue).

The documents are given by exactly one of
- `lengths`: the document lengths, `[3, 2]` -> ids `[0, 0, 0, 1, 1]` (each at least 1; empty documents through `offsets`);
- `offsets`: cu_seqlens-style boundaries `[0, 3, 5]` (num_docs + 1 entries, starting at 0,
  non-decreasing): document d holds tokens `offsets[d] <= i < offsets[d + 1]`;
- `ids`: the per-token id tensor itself (int [N]; any ids work, not only non-decreasing ones).
The pattern reads one buffer, `doc` (int [N], N the total length): rebind it with
`pattern.bind(doc=new_ids)`; sequences up to N tokens are covered.
"""
import torch

from ..dsl.pattern import Pattern


def document(lengths=None, offsets=None, causal: bool = True, ids=None, *, device=None) -> Pattern:
    """mask = doc[q] == doc[kv] (and q >= kv when causal), doc from lengths, offsets or ids.

    `device` places ids built from `lengths` / `offsets` given as lists (tensors keep theirs).
    """
    given = [name for name, x in (("lengths", lengths), ("offsets", offsets), ("ids", ids)) if x is not None]
    if len(given) != 1:
        raise ValueError("document() takes exactly one of lengths=, offsets= or ids=, got "
                         + (" and ".join(given) if given else "none"))
    if ids is not None:
        doc = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(ids, device=device)
        if doc.dim() != 1 or doc.dtype.is_floating_point or doc.dtype.is_complex or doc.dtype == torch.bool:
            raise ValueError(f"ids must be a 1-D integer tensor of per-token document ids, got "
                             f"{doc.dtype} of shape {tuple(doc.shape)}")
    else:
        if offsets is not None:
            offsets = _integers("offsets", offsets, device)
            if len(offsets) == 0 or offsets[0] != 0:
                raise ValueError(f"offsets must start at 0 (cu_seqlens style), got {offsets.tolist()}")
            lengths = offsets.diff()
            if (lengths < 0).any():
                raise ValueError(f"offsets must be non-decreasing, got {offsets.tolist()}")
        else:
            lengths = _integers("lengths", lengths, device)
            if (lengths < 1).any():  # per-token ids passed as lengths start with 0: never silently wrong
                raise ValueError(f"document lengths must be positive, got {lengths.tolist()[:16]}"
                                 f"{'...' if len(lengths) > 16 else ''} (per-token document ids? pass "
                                 "ids=...; empty documents: pass offsets=...)")
        if int(lengths.sum()) == 0:
            raise ValueError("the documents hold no token (the lengths sum to 0)")
        doc = lengths_to_ids(lengths)
    if causal:
        return Pattern(lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv), name="document")
    return Pattern(lambda b, h, q, kv: doc[q] == doc[kv], name="document")


def _integers(what: str, values, device) -> torch.Tensor:
    t = values if isinstance(values, torch.Tensor) else torch.as_tensor(values, device=device)
    if t.numel() == 0:
        raise ValueError(f"{what} is empty: no documents")
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{what} must be a 1-D list or tensor of integers, got {t.dtype} of shape {tuple(t.shape)}")
    return t.long()


def lengths_to_ids(lengths, device=None) -> torch.Tensor:
    """Document ids [sum(lengths)] from document lengths, e.g. [3, 2] -> [0, 0, 0, 1, 1]."""
    lengths = torch.as_tensor(lengths, device=device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
