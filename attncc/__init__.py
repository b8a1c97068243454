"""attncc: an attention-pattern compiler. See README.md and DESIGN.md."""
from .dsl.ir import IRError
from .dsl.pattern import Pattern
from .dsl.trace import PatternError, param
from .runtime.api import create_mask, reference
from . import patterns

__version__ = "0.1.0"

__all__ = ["Pattern", "PatternError", "IRError", "param", "create_mask", "reference", "patterns"]
