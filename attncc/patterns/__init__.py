"""The pattern catalogue: one module per family, each with its formula and paper."""
from .alibi import alibi, alibi_slopes
from .block_topk import block_topk, block_topk_selection
from .causal import causal
from .chunked import chunked
from .cross import cross
from .dilated import dilated
from .document import document, lengths_to_ids
from .global_tokens import global_tokens
from .natten import natten2d
from .neighborhood import neighborhood
from .per_head import per_head
from .power import power
from .prefix_lm import prefix_lm
from .radial import radial
from .relative_bias import relative_bias, t5_buckets
from .sinks import sinks
from .sliding_tile import sliding_tile
from .sliding_window import sliding_window
from .softcap import softcap
from .strided_heads import strided_heads
from .tree import tree
from .vertical_slash import vertical_slash

__all__ = ["alibi", "alibi_slopes", "block_topk", "block_topk_selection", "causal", "chunked", "cross", "dilated",
           "document", "global_tokens", "lengths_to_ids", "natten2d", "neighborhood", "per_head", "power",
           "prefix_lm", "radial", "relative_bias", "sinks", "sliding_tile", "sliding_window", "softcap",
           "strided_heads", "t5_buckets", "tree", "vertical_slash"]
