"""Importing a heavy optional dependency without the parts a call never runs.

FlashAttention-4's import (runtime/fa4.py) costs seconds: quack's package __init__ pulls in
torch's dynamo and FSDP, and FA4's interface imports every GPU generation's kernel modules (SM80,
SM90, SM100, SM120, MLA). Two tools, both ending in the state a normal import gives the moment a
skipped part is needed:

- `register_lazily(package)`: the package without its __init__ until a name it binds is asked for;
- `deferred(modules)`: while a module is imported, `from m import Name` of a listed module gives a
  stand-in for Name, and the module itself is imported on the stand-in's first use.
"""
from __future__ import annotations

import ast
import contextlib
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


class Deferred:
    """A stand-in for `module.name`: the module is imported (for real) on first use — a call, an
    attribute, a subclass (PEP 560 __mro_entries__), isinstance / issubclass against it."""

    __slots__ = ("_module", "_name", "_target")

    def __init__(self, module: str, name: str):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_target", None)

    def resolve(self):
        target = object.__getattribute__(self, "_target")
        if target is None:
            name = object.__getattribute__(self, "_module")
            with _LOCK:
                if isinstance(sys.modules.get(name), _StandIn):
                    del sys.modules[name]  # used inside the `deferred` block: import it now
                target = getattr(importlib.import_module(name), object.__getattribute__(self, "_name"))
                object.__setattr__(self, "_target", target)
        return target

    def __call__(self, *args, **kwargs):
        return self.resolve()(*args, **kwargs)

    def __getattr__(self, attr: str):
        return getattr(self.resolve(), attr)

    def __mro_entries__(self, bases):
        return (self.resolve(),)

    def __instancecheck__(self, obj) -> bool:
        return isinstance(obj, self.resolve())

    def __subclasscheck__(self, cls) -> bool:
        return issubclass(cls, self.resolve())

    def __repr__(self) -> str:
        return f"<deferred {self._module}.{self._name}>"


class _StandIn(ModuleType):
    """What `deferred` puts in sys.modules for a listed module: every name a Deferred."""

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Deferred(self.__name__, attr)


@contextlib.contextmanager
def deferred(modules):
    """Within the block, importing a name from any of `modules` (not yet imported) gives a
    `Deferred` stand-in instead of running the module; the stand-ins leave sys.modules at the
    end, so a stand-in's first use, or any later import, imports the real module. (The names are
    not looked up first: finding a submodule imports its package, the very import deferred.)"""
    placed = {}
    with _LOCK:
        for name in modules:
            if name not in sys.modules:
                placed[name] = sys.modules[name] = _StandIn(name)
    try:
        yield
    finally:
        with _LOCK:
            for name, stand_in in placed.items():
                if sys.modules.get(name) is stand_in:
                    del sys.modules[name]
