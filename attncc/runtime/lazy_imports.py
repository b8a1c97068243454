"""Importing a heavy optional dependency without the parts a call never runs.

FlashAttention-4's import (runtime/fa4.py) cost 4 s more than it needs: quack's package __init__
pulls in torch's dynamo and FSDP, while FA4 uses only a few of quack's CuTe helper modules.
`register_lazily(package)` registers a package without running its __init__ until a name it binds
is asked for, then ends in the state a normal import gives. (Deferring FA4's own modules for other
GPU generations, SM80/SM100/SM120/MLA, was measured on the H200 on 2026-12-03: 1.17 s against
1.23 s for FA4's import, not worth stand-ins in sys.modules.)
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
import threading
from types import ModuleType, SimpleNamespace

_LOCK = threading.RLock()


class _LazyPackage(ModuleType):
    """A package register_lazily put in sys.modules: its __init__ runs on first need."""

    def _complete(self) -> None:
        with _LOCK:
            state = self.__dict__.pop("_lazy_init", None)
            if state is not None:
                state.spec.loader.exec_module(self)

    def __getattr__(self, attr: str):
        state = self.__dict__.get("_lazy_init")
        if state is not None and attr not in state.bound and \
                importlib.util.find_spec(f"{self.__name__}.{attr}") is not None:
            return importlib.import_module(f"{self.__name__}.{attr}")  # a submodule, imported alone
        self._complete()
        if attr not in self.__dict__:
            raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")
        return self.__dict__[attr]

    def __setattr__(self, attr: str, value) -> None:
        super().__setattr__(attr, value)
        state = self.__dict__.get("_lazy_init")
        if state is not None and attr in state.bound and isinstance(value, ModuleType):
            self._complete()  # a submodule under a name the __init__ rebinds (`from pkg.f import f`): bind it now


def register_lazily(name: str) -> bool:
    """Put package `name` in sys.modules without running its __init__ (False where it is not an
    importable package): a submodule asked of it (`from name import sub`) is imported alone; the
    first name its __init__ binds at top level, or any other missing name, runs the __init__ then
    (PEP 562 module __getattr__), as does importing a submodule under a name the __init__ binds,
    so the package ends up as if imported normally."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or not spec.submodule_search_locations or not spec.origin:
        return False
    try:
        with open(spec.origin, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError, ValueError):
        return False
    bound = set()  # every name the __init__ may bind, at any depth (more than it binds is safe)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
    package = importlib.util.module_from_spec(spec)
    package.__dict__["_lazy_init"] = SimpleNamespace(spec=spec, bound=frozenset(bound))
    package.__class__ = _LazyPackage
    sys.modules[name] = package
    return True
