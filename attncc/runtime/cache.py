"""On-disk + in-memory cache of generated kernel modules.

A content hash of the caller's key parts (pattern IR, specialisation, config) plus the attncc,
triton and torch versions, a fingerprint of attncc's own source (so an edited code generator
never serves stale kernels under an unchanged version string) and the GPU name names a file
``<cache_dir>/<key[:2]>/<key>.py``. Its first line is a header comment holding the sha256 of
the rest of the file; an entry whose hash does not match (truncated, flipped, half-written by a
crash) is regenerated. Files are written to a temporary file in the same directory and moved
into place with ``os.replace``, so a concurrent process sees either no file or a whole one.
Loaded modules are kept in memory per (key, interpret), so repeated calls are a dict lookup.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import re
import stat
import sys
import tempfile
import threading
import types
import warnings
from collections import Counter, OrderedDict
from functools import lru_cache
from typing import Callable, Mapping

import torch
import triton

_FORMAT = 1  # bump when the file layout or key serialisation changes
_HEADER_PREFIX = b"# attncc kernel cache entry, sha256="
_HEADER = re.compile(re.escape(_HEADER_PREFIX) + rb"([0-9a-f]{64})\Z")
_SOURCE_ATTR = "__attncc_source__"
_KEY_ATTR = "__attncc_key__"  # a loaded module's cache key (+ "-interpret"): names its refusal record
_REFUSAL_ATTR = "__attncc_refusal__"  # a module's recorded refusal, read once per process ("" for none)
_STAT_NAMES = ("memory_hits", "disk_hits", "generated", "corrupt_regenerated")

_MODULES: dict[tuple, types.ModuleType] = {}  # (parts, environment, interpret) -> module
_STATS: Counter = Counter()
_LOCK = threading.RLock()  # guards the miss path: generation, file writes, the interpret knob


def cache_dir() -> pathlib.Path:
    """The cache root: $ATTNCC_CACHE_DIR, else ($XDG_CACHE_HOME or ~/.cache)/attncc; created 0700.

    A directory this function creates gets mode 0700 whatever the umask; the default directory,
    when it exists owned by this user with a laxer mode, is tightened to 0700. An explicit
    $ATTNCC_CACHE_DIR that others may write to is used but warned about (the cache holds code
    that is executed). A path that exists and is not a directory raises NotADirectoryError. A
    root that cannot be written (a read-only file system, no permission) is replaced, with a
    warning, by a private temporary directory for the rest of the process.
    """
    explicit = os.environ.get("ATTNCC_CACHE_DIR")
    if explicit:
        root, what, fix_mode = pathlib.Path(explicit).expanduser(), "$ATTNCC_CACHE_DIR", False
    else:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        base = pathlib.Path(xdg) if os.path.isabs(xdg) else pathlib.Path.home() / ".cache"
        root, what, fix_mode = base / "attncc", "the attncc cache directory", True
    try:
        _make_private_dir(root, what, fix_mode=fix_mode)
        _probe(root)
    except NotADirectoryError:
        raise
    except OSError as e:
        return _fallback_dir(str(root), f"{type(e).__name__}: {e}")
    return root


def _probe(root: pathlib.Path) -> None:
    """Create and remove a file in `root`: OSError where it cannot be written."""
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".probe.")
    os.close(fd)
    os.unlink(tmp)


@lru_cache(maxsize=None)
def _fallback_dir(root: str, reason: str) -> pathlib.Path:
    path = pathlib.Path(tempfile.mkdtemp(prefix="attncc-cache-"))
    warnings.warn(f"the attncc cache directory {root!r} cannot be written ({reason}); kernels are cached "
                  f"in {str(path)!r} for this process instead", stacklevel=3)
    return path


def _make_private_dir(path: pathlib.Path, what: str, *, fix_mode: bool) -> None:
    """Create `path` (and parents) with mode 0700; an existing one is tightened or warned about."""
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        if not path.is_dir():
            raise NotADirectoryError(f"{what} {str(path)!r} exists and is not a directory") from None
        st = path.stat()
        mode = stat.S_IMODE(st.st_mode)
        if fix_mode and st.st_uid == os.getuid() and mode != 0o700:
            os.chmod(path, 0o700)
        elif mode & 0o022 and not mode & stat.S_ISVTX:
            warnings.warn(f"{what} {str(path)!r} is writable by other users (mode {mode:o}); "
                          "kernels cached there could be replaced by them", stacklevel=3)
    else:
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask


@lru_cache(maxsize=None)
def _source_fingerprint() -> str:
    """sha256 over attncc's own source files (code generator and templates included)."""
    package = pathlib.Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            digest.update(str(path.relative_to(package)).encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


@lru_cache(maxsize=None)
def _gpu_name(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index)


def _canonical_parts(key_parts: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    if not isinstance(key_parts, Mapping):
        raise TypeError(f"key_parts must be a Mapping[str, str], got {type(key_parts).__name__}")
    for name, value in key_parts.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"key_parts must map str to str, got {name!r}: {type(value).__name__}")
    return tuple(sorted(key_parts.items()))


def _environment() -> tuple[str, str, str, str]:
    """(attncc, triton, torch) versions and the current GPU's name ("cpu" without CUDA)."""
    import attncc  # the package imports this module's package; resolve at call time

    gpu = _gpu_name(torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    return attncc.__version__, triton.__version__, torch.__version__, gpu


def _hash(parts: tuple[tuple[str, str], ...], environment: tuple[str, str, str, str]) -> str:
    attncc_version, triton_version, torch_version, gpu = environment
    blob = json.dumps({
        "format": _FORMAT,
        "parts": dict(parts),
        "attncc": attncc_version,
        "attncc_source": _source_fingerprint(),
        "triton": triton_version,
        "torch": torch_version,
        "gpu": gpu,
    }, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def cache_key(key_parts: Mapping[str, str]) -> str:
    """sha256 hex of key_parts (order-insensitive) + attncc/triton/torch versions + GPU name."""
    return _hash(_canonical_parts(key_parts), _environment())


def _encode(source: str) -> bytes:
    body = source.encode("utf-8")
    digest = hashlib.sha256(body).hexdigest()
    return _HEADER_PREFIX + digest.encode() + b"\n" + body


def _decode(data: bytes) -> str | None:
    """The body of a cache file, or None if its header is missing or does not match."""
    header, newline, body = data.partition(b"\n")
    match = _HEADER.match(header)
    if not newline or match is None or hashlib.sha256(body).hexdigest() != match.group(1).decode():
        return None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same directory and os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _read_or_generate(path: pathlib.Path, generate: Callable[[], str]) -> str:
    try:
        source = _decode(path.read_bytes())
    except FileNotFoundError:
        source, corrupt = None, False
    else:
        corrupt = source is None
    if source is not None:
        _STATS["disk_hits"] += 1
        return source
    source = generate()
    if not isinstance(source, str):
        raise TypeError(f"generate() must return the module source as str, got {type(source).__name__}")
    _make_private_dir(path.parent, "the attncc cache subdirectory", fix_mode=True)
    _write_atomic(path, _encode(source))
    _STATS["generated"] += 1
    _STATS["corrupt_regenerated"] += corrupt
    return source


def _execute(name: str, path: pathlib.Path, source: str, interpret: bool) -> types.ModuleType:
    """Run the verified `source` as module `name` with __file__ = path (its header is line 1).

    The text checked against the hash is the text executed (no re-read, no stale .pyc); the
    real path lets inspect / triton.jit read the kernel source. Triton decides between the
    interpreter and the compiler when @triton.jit decorates, so the interpret knob is set to
    `interpret` for the duration of the import and restored afterwards (under _LOCK).
    """
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    setattr(module, _SOURCE_ATTR, source)
    code = compile("\n" + source, str(path), "exec")  # line numbers match the file's
    sys.modules[name] = module
    try:
        with triton.knobs.runtime.scope():
            triton.knobs.runtime.interpret = interpret
            exec(code, module.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load_kernel_module(key_parts: Mapping[str, str], generate: Callable[[], str], *,
                       interpret: bool = False) -> types.ModuleType:
    """The module for key_parts: from memory, else from the disk cache, else generate() it.

    generate() -> str is the full module source; it is called only when the disk entry is
    missing or corrupt. interpret=True returns a separate module whose @triton.jit kernels run
    in Triton's interpreter (CPU tensors); interpret=False one whose kernels compile for the GPU,
    whatever TRITON_INTERPRET says.
    """
    parts, environment = _canonical_parts(key_parts), _environment()
    slot = (parts, environment, bool(interpret))
    module = _MODULES.get(slot)
    if module is None:
        with _LOCK:
            module = _MODULES.get(slot)
            if module is None:
                key = _hash(parts, environment)
                path = cache_dir() / key[:2] / f"{key}.py"
                source = _read_or_generate(path, generate)
                name = f"_attncc_kernel_{key}" + ("_interpret" if interpret else "")
                module = _MODULES[slot] = _execute(name, path, source, bool(interpret))
                setattr(module, _KEY_ATTR, key + ("-interpret" if interpret else ""))
                return module
    with _LOCK:
        _STATS["memory_hits"] += 1
    return module


def load_text(key_parts: Mapping[str, str], generate: Callable[[], str]) -> str:
    """A cached text that is not a module (a derivative's simplification): from the disk cache
    (verified like a module's source), else generate() it and store it. Keyed like modules."""
    key = cache_key(key_parts)
    with _LOCK:
        return _read_or_generate(cache_dir() / key[:2] / f"{key}.txt", generate)


def _refusal_path(module: types.ModuleType) -> pathlib.Path | None:
    key = getattr(module, _KEY_ATTR, None)
    return None if key is None else cache_dir() / "refused" / key


def record_refusal(module: types.ModuleType, resource: str) -> None:
    """Remember that this GPU refused `module`'s kernels for want of `resource` ("registers",
    "shared memory"), keyed like the module (its environment names the GPU), so a later process
    asks refusal_of instead of compiling them again (a failed ptxas run is not cached by Triton:
    about 10 s each time for a D=256 kernel). Modules not loaded by this cache are not recorded."""
    path = _refusal_path(module)
    if path is None:
        return
    _make_private_dir(path.parent, "the attncc cache's refusal records", fix_mode=True)
    _write_atomic(path, resource.encode("utf-8"))
    setattr(module, _REFUSAL_ATTR, resource)


def refusal_of(module: types.ModuleType) -> str | None:
    """The resource a recorded refusal of `module` names (record_refusal), or None; the record is
    read once per module and process (launches ask on every call)."""
    known = getattr(module, _REFUSAL_ATTR, None)
    if known is None:
        path = _refusal_path(module)
        try:
            known = "" if path is None else path.read_text(encoding="utf-8")
        except (FileNotFoundError, UnicodeDecodeError):
            known = ""
        setattr(module, _REFUSAL_ATTR, known)
    return known or None


def source_of(module: types.ModuleType) -> str:
    """Exactly the generated source `module` runs (the cache file without its header line)."""
    source = getattr(module, _SOURCE_ATTR, None)
    if not isinstance(source, str):
        raise ValueError(f"module {getattr(module, '__name__', module)!r} was not loaded by attncc's kernel cache")
    return source


def stats() -> dict:
    """Counters since process start: memory_hits, disk_hits, generated, corrupt_regenerated."""
    with _LOCK:
        return {name: _STATS[name] for name in _STAT_NAMES}


class LRU:
    """A thread-safe map of the `size` most recently used entries. Callers build a missing value
    outside it (get, then put), so a slow build never blocks another thread's hit."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, default=None):
        """The entry under `key` (now the most recent), or `default`."""
        with self._lock:
            if key not in self._entries:
                return default
            self._entries.move_to_end(key)
            return self._entries[key]

    def put(self, key, value) -> None:
        """Store `value` as the most recent entry, dropping the least recent past `size`."""
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
