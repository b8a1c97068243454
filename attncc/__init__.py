"""attncc: an attention-pattern compiler. See README.md and DESIGN.md."""
from .dsl.ir import IRError
from .dsl.parse import DSLError, parse
from .dsl.pattern import Pattern
from .dsl.trace import PatternError, param
from .runtime.api import create_mask, reference
from .runtime.api import attention, compile
from .compiler.blockmask import BlockMask
from .runtime.api import create_block_mask, explain
from .runtime.kvcache import KVCache
from .compiler.sharding import ShardPlan
from .runtime.parallel import context_parallel_attention
from . import patterns

__version__ = "0.1.0"

__all__ = ["Pattern", "PatternError", "IRError", "param", "create_mask", "reference", "patterns"]
__all__ += ["parse", "DSLError"]
__all__ += ["attention", "compile"]
__all__ += ["create_block_mask", "BlockMask", "explain", "KVCache"]
__all__ += ["ShardPlan", "context_parallel_attention"]


def __getattr__(name):
    # attncc.testing needs hypothesis (a test extra), so it is imported on first use only
    if name == "testing":
        import importlib
        return importlib.import_module(".testing", __name__)
    raise AttributeError(f"module 'attncc' has no attribute {name!r}")
