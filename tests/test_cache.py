"""The kernel module cache: disk layout, hashing, corruption, versions, processes, threads."""
import hashlib
import inspect
import json
import os
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch
import triton

import attncc
from attncc.runtime import cache

SRC = '''import torch
import triton
import triton.language as tl


@triton.jit
def add_one(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=m) + 1, mask=m)


def run(x):
    y = torch.empty_like(x)
    add_one[(triton.cdiv(x.numel(), 32),)](x, y, x.numel(), BLOCK=32)
    return y
'''
KEY = {"pattern": "causal", "spec": "D=64,fp32", "config": "BQ=32,BK=32"}

# A separate interpreter: waits for a go-file if given, loads KEY with a generate() that
# leaves a marker, runs the kernel and prints its stats as JSON. It takes the parent's source
# fingerprint, so that files edited meanwhile in this shared working tree do not change the key.
CHILD = r'''
import json, os, pathlib, sys, time
import torch
from attncc.runtime import cache

key, src_file, marker_dir, go_file, fingerprint = json.loads(sys.argv[1]), *sys.argv[2:6]
cache._source_fingerprint = lambda: fingerprint

def generate():
    (pathlib.Path(marker_dir) / f"generated-{os.getpid()}").touch()
    time.sleep(0.5)  # keep every racer inside the miss path at once
    return pathlib.Path(src_file).read_text()

if go_file:
    (pathlib.Path(marker_dir) / f"ready-{os.getpid()}").touch()
    while not os.path.exists(go_file):
        time.sleep(0.005)
module = cache.load_kernel_module(key, generate, interpret=True)
x = torch.arange(70.0)
print(json.dumps({"stats": cache.stats(), "ok": torch.equal(module.run(x), x + 1), "file": module.__file__}))
'''


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty cache directory, memory layer and counters; returns the cache directory."""
    root = tmp_path / "cache"
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(root))
    monkeypatch.setattr(cache, "_MODULES", {})
    monkeypatch.setattr(cache, "_STATS", cache.Counter())
    return root


class Generator:
    """generate() for load_kernel_module that counts its calls."""

    def __init__(self, source=SRC):
        self.source, self.calls = source, 0

    def __call__(self):
        self.calls += 1
        return self.source


def entry_path(root, key_parts=KEY):
    key = cache.cache_key(key_parts)
    return root / key[:2] / f"{key}.py"


def spawn(root, tmp_path, go_file=""):
    src_file = tmp_path / "src.py"
    src_file.write_text(SRC)
    env = dict(os.environ, ATTNCC_CACHE_DIR=str(root))
    args = [sys.executable, "-c", CHILD, json.dumps(KEY), str(src_file), str(tmp_path), go_file,
            cache._source_fingerprint()]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def child_report(proc):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_generated_kernel_runs_in_interpreter(fresh):
    gen = Generator()
    module = cache.load_kernel_module(KEY, gen, interpret=True)
    x = torch.randn(100)
    torch.testing.assert_close(module.run(x), x + 1, rtol=0, atol=0)
    assert gen.calls == 1
    assert cache.stats() == {"memory_hits": 0, "disk_hits": 0, "generated": 1, "corrupt_regenerated": 0}
    path = entry_path(fresh)
    assert module.__file__ == str(path) and path.parent.parent == fresh
    assert cache.source_of(module) == SRC
    header, body = path.read_text().split("\n", 1)
    assert body == SRC and header.startswith("#")
    # inspect (what triton.jit uses) reads the running kernel's text from the real file
    assert inspect.getsource(module.add_one.fn) in SRC
    assert sys.modules[module.__name__] is module


def test_second_call_hits_memory(fresh):
    gen = Generator()
    first = cache.load_kernel_module(KEY, gen, interpret=True)
    second = cache.load_kernel_module(dict(reversed(list(KEY.items()))), gen, interpret=True)
    assert second is first and gen.calls == 1
    assert cache.stats()["memory_hits"] == 1


def test_interpret_flag_gives_separate_modules_and_restores_knob(fresh, monkeypatch):
    for env in ("1", None):
        if env is None:
            monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        else:
            monkeypatch.setenv("TRITON_INTERPRET", env)
        monkeypatch.setattr(cache, "_MODULES", {})
        before = triton.knobs.runtime.interpret
        interpreted = cache.load_kernel_module(KEY, Generator(), interpret=True)
        compiled = cache.load_kernel_module(KEY, Generator(), interpret=False)
        assert interpreted is not compiled and interpreted.__file__ == compiled.__file__
        assert type(interpreted.add_one).__name__ == "InterpretedFunction"
        assert isinstance(compiled.add_one, triton.runtime.jit.JITFunction)
        assert triton.knobs.runtime.interpret == before
        assert os.environ.get("TRITON_INTERPRET") == env


def test_fresh_process_hits_disk_without_generating(fresh, tmp_path):
    cache.load_kernel_module(KEY, Generator(), interpret=True)
    report = child_report(spawn(fresh, tmp_path))
    assert report["ok"] and report["file"] == str(entry_path(fresh))
    assert report["stats"] == {"memory_hits": 0, "disk_hits": 1, "generated": 0, "corrupt_regenerated": 0}
    assert not list(tmp_path.glob("generated-*"))


def test_racing_processes_all_succeed_and_leave_a_valid_file(fresh, tmp_path):
    go_file = tmp_path / "go"
    procs = [spawn(fresh, tmp_path, str(go_file)) for _ in range(4)]
    deadline = time.monotonic() + 90
    while len(list(tmp_path.glob("ready-*"))) < len(procs) and time.monotonic() < deadline:
        time.sleep(0.02)
    go_file.touch()
    reports = [child_report(p) for p in procs]
    assert all(r["ok"] for r in reports)
    for r in reports:
        assert r["stats"]["generated"] + r["stats"]["disk_hits"] == 1
        assert r["stats"]["corrupt_regenerated"] == 0
    assert len(list(tmp_path.glob("generated-*"))) >= 2  # they really raced
    path = entry_path(fresh)
    assert {r["file"] for r in reports} == {str(path)}
    assert cache._decode(path.read_bytes()) == SRC
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files left


def _truncate(data):
    return data[: len(data) // 2]


def _flip_body_byte(data):
    i = len(data) - 10
    return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]


def _wrong_header(data):
    body = data.split(b"\n", 1)[1]
    return cache._HEADER_PREFIX + b"0" * 64 + b"\n" + body


def _no_header(data):
    return data.split(b"\n", 1)[1]


def _bad_utf8_with_matching_hash(data):
    return cache._HEADER_PREFIX + hashlib.sha256(b"\xff").hexdigest().encode() + b"\n\xff"


@pytest.mark.parametrize("corrupt", [_truncate, _flip_body_byte, _wrong_header, _no_header,
                                     lambda data: b"", _bad_utf8_with_matching_hash])
def test_corrupt_entry_is_detected_and_regenerated(fresh, corrupt):
    cache.load_kernel_module(KEY, Generator(), interpret=True)
    path = entry_path(fresh)
    path.write_bytes(corrupt(path.read_bytes()))
    cache._MODULES.clear()
    gen = Generator()
    module = cache.load_kernel_module(KEY, gen, interpret=True)
    assert gen.calls == 1
    assert cache.stats()["corrupt_regenerated"] == 1 and cache.stats()["generated"] == 2
    assert cache._decode(path.read_bytes()) == SRC == cache.source_of(module)
    x = torch.arange(5.0)
    assert torch.equal(module.run(x), x + 1)


def test_valid_entry_is_read_not_regenerated(fresh):
    cache.load_kernel_module(KEY, Generator(), interpret=True)
    cache._MODULES.clear()
    gen = Generator("raise AssertionError('must not run')\n")
    module = cache.load_kernel_module(KEY, gen, interpret=True)
    assert gen.calls == 0 and cache.source_of(module) == SRC
    assert cache.stats()["disk_hits"] == 1


def test_key_covers_parts_versions_and_gpu(fresh, monkeypatch):
    base = cache.cache_key(KEY)
    assert len(base) == 64 and int(base, 16) >= 0
    assert cache.cache_key(dict(reversed(list(KEY.items())))) == base
    assert cache.cache_key({**KEY, "config": "BQ=64,BK=32"}) != base
    assert cache.cache_key({"a": "b=c"}) != cache.cache_key({"a=b": "c"})
    seen = {base}
    for obj, attr, value in [(attncc, "__version__", "9.9.9"), (triton, "__version__", "0.0.1"),
                             (torch, "__version__", "0.0.2")]:
        with monkeypatch.context() as m:
            m.setattr(obj, attr, value)
            seen.add(cache.cache_key(KEY))
    with monkeypatch.context() as m:
        m.setattr(cache, "_source_fingerprint", lambda: "edited codegen")
        seen.add(cache.cache_key(KEY))
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "current_device", lambda: 0)
        m.setattr(cache, "_gpu_name", lambda index: "NVIDIA H100 80GB HBM3")
        seen.add(cache.cache_key(KEY))
    assert len(seen) == 6
    assert cache.cache_key(KEY) == base
    fingerprints = []
    for _ in range(2):
        cache._source_fingerprint.cache_clear()
        fingerprints.append(cache._source_fingerprint())
    assert fingerprints[0] == fingerprints[1]  # deterministic over the same files


def test_new_version_uses_a_new_file(fresh, monkeypatch):
    old = cache.load_kernel_module(KEY, Generator(), interpret=True)
    monkeypatch.setattr(triton, "__version__", "99.0.0")
    gen = Generator()
    new = cache.load_kernel_module(KEY, gen, interpret=True)
    assert gen.calls == 1 and new is not old and new.__file__ != old.__file__
    monkeypatch.setattr(attncc, "__version__", "99.0.0")
    newer = cache.load_kernel_module(KEY, gen, interpret=True)
    assert gen.calls == 2 and len({old.__file__, new.__file__, newer.__file__}) == 3
    assert all(cache._decode(open(m.__file__, "rb").read()) == SRC for m in (old, new, newer))


def test_atomic_write_goes_through_a_temp_file_in_the_same_dir(fresh, monkeypatch):
    replaced = []
    real_replace = os.replace

    def checking_replace(src, dst):
        assert os.path.dirname(src) == os.path.dirname(dst)
        assert not os.path.exists(dst)  # nothing visible under the final name yet
        assert cache._decode(open(src, "rb").read()) == SRC  # the temp file is whole
        replaced.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(cache.os, "replace", checking_replace)
    cache.load_kernel_module(KEY, Generator(), interpret=True)
    assert [str(p) for p in replaced] == [str(entry_path(fresh))]


def test_threads_share_one_generation(fresh):
    calls = []

    def slow_generate():
        calls.append(1)
        time.sleep(0.05)
        return SRC

    modules = []
    threads = [threading.Thread(target=lambda: modules.append(
        cache.load_kernel_module(KEY, slow_generate, interpret=True))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(modules) == 4 and all(m is modules[0] for m in modules)


def test_failing_module_is_not_kept(fresh):
    before = triton.knobs.runtime.interpret
    gen = Generator("import triton\nraise RuntimeError('broken kernel module')\n")
    key_parts = {"pattern": "broken"}
    for _ in range(2):
        with pytest.raises(RuntimeError, match="broken kernel module"):
            cache.load_kernel_module(key_parts, gen, interpret=True)
    assert not cache._MODULES and triton.knobs.runtime.interpret == before
    assert not [name for name in sys.modules if cache.cache_key(key_parts) in name]


def test_bad_arguments(fresh):
    with pytest.raises(TypeError, match="key_parts"):
        cache.cache_key({"spec": 64})
    with pytest.raises(TypeError, match="key_parts"):
        cache.cache_key([("spec", "64")])
    with pytest.raises(TypeError, match="generate"):
        cache.load_kernel_module(KEY, lambda: SRC.encode(), interpret=True)
    with pytest.raises(ValueError, match="kernel cache"):
        cache.source_of(cache)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_cache_dir_is_created_private(tmp_path, monkeypatch):
    old_umask = os.umask(0)
    try:
        root = tmp_path / "a" / "b"
        monkeypatch.setenv("ATTNCC_CACHE_DIR", str(root))
        assert cache.cache_dir() == root and _mode(root) == 0o700
        monkeypatch.setattr(cache, "_MODULES", {})
        cache.load_kernel_module(KEY, Generator(), interpret=True)
        path = entry_path(root)
        assert _mode(path.parent) == 0o700 and _mode(path) & 0o077 == 0
    finally:
        os.umask(old_umask)


def test_default_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("ATTNCC_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "attncc"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root = tmp_path / "home" / ".cache" / "attncc"
    root.mkdir(parents=True, mode=0o755)
    os.chmod(root, 0o755)
    assert cache.cache_dir() == root and _mode(root) == 0o700  # our own dir is tightened


def test_cache_dir_problems_are_reported(tmp_path, monkeypatch):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(not_a_dir))
    with pytest.raises(NotADirectoryError, match="ATTNCC_CACHE_DIR"):
        cache.cache_dir()
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(shared))
    with pytest.warns(UserWarning, match="writable by other users"):
        assert cache.cache_dir() == shared
    assert _mode(shared) == 0o777  # a directory the user chose is not changed


def test_an_unwritable_cache_directory_falls_back_to_a_temporary_one(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for unwritable in ("/proc/attncc-cache", str(tmp_path / "ro")):
        monkeypatch.setenv("ATTNCC_CACHE_DIR", unwritable)
        if unwritable.endswith("ro"):  # a read-only directory (root ignores modes: make writes fail)
            (tmp_path / "ro").mkdir()
            monkeypatch.setattr(cache, "_probe", lambda root: (_ for _ in ()).throw(PermissionError("read-only")))
        monkeypatch.setattr(cache, "_MODULES", {})
        cache._fallback_dir.cache_clear()
        with pytest.warns(UserWarning, match="cannot be written"):
            root = cache.cache_dir()
        assert root.is_dir() and str(root) != unwritable
        module = cache.load_kernel_module({"k": unwritable}, Generator(), interpret=True)
        assert module.add_one is not None and str(root) in module.__file__
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(blocker))
    with pytest.raises(NotADirectoryError):
        cache.cache_dir()


def test_lru_keeps_the_most_recently_used():
    lru = cache.LRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # now the most recent
    lru.put("c", 3)           # drops b, the least recent
    assert (lru.get("b"), lru.get("a"), lru.get("c"), lru.get("x", "none")) == (None, 1, 3, "none")
