"""Document (packed sequence) masking: tokens attend only within their own document.

`doc[i]` is the document id of token i (non-decreasing for packed sequences, though any ids
work). Causal within documents by default: `doc[q] == doc[kv] and q >= kv`.
"""
import torch

from ..dsl.pattern import Pattern


def document(doc_ids: torch.Tensor, causal: bool = True) -> Pattern:
    """mask = doc[q] == doc[kv] (and q >= kv when causal); doc_ids: int [N]."""
    doc = doc_ids
    if causal:
        return Pattern(lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv), name="document")
    return Pattern(lambda b, h, q, kv: doc[q] == doc[kv], name="document")


def lengths_to_ids(lengths, device=None) -> torch.Tensor:
    """Document ids [sum(lengths)] from document lengths, e.g. [3, 2] -> [0, 0, 0, 1, 1]."""
    lengths = torch.as_tensor(lengths, device=device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
