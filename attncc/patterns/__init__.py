"""The pattern catalogue: one module per family, each with its formula and paper."""
from .alibi import alibi, alibi_slopes
from .causal import causal
from .dilated import dilated
from .document import document, lengths_to_ids
from .natten import natten2d
from .prefix_lm import prefix_lm
from .sliding_window import sliding_window
from .softcap import softcap

__all__ = ["alibi", "alibi_slopes", "causal", "dilated", "document", "lengths_to_ids", "natten2d",
           "prefix_lm", "sliding_window", "softcap"]
