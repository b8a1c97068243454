"""The attncc command line: pattern loading, each verb, exit codes. Most tests call cli.main in
process; a handful run the real entry points in a subprocess (each costs ~2 s of imports)."""
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

import attncc as ac
import attncc.testing
from attncc import cli
from attncc.viz import ascii_mask

SWA = "param W = 3\nmask = q >= kv and q - kv <= W"


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------------
# PATTERN: DSL text, a file, module:function.

@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_masks.py").write_text(textwrap.dedent("""
        import torch
        import attncc as ac

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        def softcap(score, b, h, q_idx, kv_idx):
            return 20.0 * torch.tanh(score / 20.0)

        def windowed(window=3) -> ac.Pattern:
            return ac.parse(f"param W = {window}\\nmask = q >= kv and q - kv <= W")

        PATTERN = ac.patterns.prefix_lm(4)

        def needs_args(a, b):
            return a

        def not_a_pattern() -> "ac.Pattern":
            return 42

        def unannotated():
            return ac.patterns.causal()

        def broken() -> ac.Pattern:
            raise RuntimeError("user code failed")
    """))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("my_masks", None)


def test_pattern_from_text_file_and_python(user_module):
    (user_module / "swa.attn").write_text("# swa\n" + SWA + "\n")
    assert cli.load_pattern(SWA) == ac.patterns.sliding_window(3)
    assert cli.load_pattern("swa.attn") == ac.patterns.sliding_window(3)
    assert cli.load_pattern("swa.attn").name == "swa"
    assert cli.load_pattern("my_masks:causal") == ac.patterns.causal()
    assert cli.load_pattern("my_masks:softcap") == ac.parse("score = 20.0 * tanh(score / 20.0)")
    assert cli.load_pattern("my_masks:windowed") == ac.patterns.sliding_window(3)
    assert cli.load_pattern("my_masks:PATTERN") == ac.patterns.prefix_lm(4)
    assert cli.load_pattern("attncc.patterns:causal") == ac.patterns.causal()
    assert cli.load_pattern("attncc.patterns:sinks(4, 256)") == ac.patterns.sinks(4, 256)
    got = cli.load_pattern("attncc.patterns:neighborhood((8, 8), 3, causal=(True, False))")
    assert got == ac.patterns.neighborhood((8, 8), 3, causal=(True, False))


@pytest.mark.parametrize("spec,words", [
    ("missing.attn", "no such pattern file"),
    ("causal", "not a file, module:function or pattern text"),
    ("no_such_module_xyz:f", "cannot import"),
    ("my_masks:nothing", "has no attribute"),
    ("my_masks:needs_args", "2 required arguments"),
    ("my_masks:not_a_pattern", "returned int"),
    ("my_masks:unannotated", "not annotated to return an attncc Pattern"),
    ("os:getpid", "not annotated to return an attncc Pattern"),
    ("attncc.patterns:sinks(__import__('os'))", "must be Python literals"),
    ("attncc.patterns:sinks(4)", "TypeError"),
    ("attncc.patterns:neighborhood((4, 4), 9)", "ValueError: kernel"),
])
def test_bad_pattern_specs_are_input_errors(user_module, spec, words):
    with pytest.raises(cli.InputError, match=words):
        cli.load_pattern(spec)


def test_dsl_errors_in_files_name_the_file(user_module):
    (user_module / "bad.attn").write_text("param W = 3\nmask = q >= kv and foo\n")
    with pytest.raises(cli.InputError, match=r"bad.attn: line 2, column 20: unknown name 'foo'"):
        cli.load_pattern("bad.attn")


def test_bind_params_and_buffers():
    p = cli.load_pattern("param W = 3\nparam c = 1.5\nbuffer doc\nmask = doc[q] == doc[kv] and q - kv <= W\n"
                         "score = score * c", ["W=7", "c=2", "doc=0,0,1,1"])
    assert p.params == {"W": 7, "c": 2.0}
    assert torch.equal(p.buffers["doc"], torch.tensor([0, 0, 1, 1]))
    for bad, words in [(["W"], "NAME=VALUE"), (["W=x"], "must be a number"), (["W=1,2"], "takes one number"),
                       (["Z=1"], "not a param or buffer")]:
        with pytest.raises((cli.InputError, ac.PatternError), match=words):
            cli.load_pattern(SWA, bad)


# ------------------------------------------------------------------------------------------------
# Verbs.

def test_show_prints_text_ir_and_source(capsys, monkeypatch):
    monkeypatch.delattr(ac, "compile", raising=False)
    code, out, _ = run(capsys, "show", SWA + "\nblock = qb >= kb")
    assert code == 0
    assert SWA in out and "block = qb >= kb" in out
    assert "  and : bool\n    ge : bool\n      var q : int\n      var kv : int\n" in out
    assert "param W : int" in out and "attncc.compile is missing" in out

    seen = {}

    def fake_compile(pattern, q, k, v):
        seen.update(pattern=pattern, q=q.shape, device=q.device)
        return SimpleNamespace(source="@triton.jit\ndef generated(): pass", config="BLOCK_M=64")

    monkeypatch.setattr(ac, "compile", fake_compile, raising=False)
    code, out, _ = run(capsys, "show", SWA, "--q-len", "40", "--heads", "3", "--head-dim", "32")
    assert code == 0 and "@triton.jit\ndef generated(): pass" in out and "# config: BLOCK_M=64" in out
    assert seen == {"pattern": ac.patterns.sliding_window(3), "q": (1, 3, 40, 32), "device": torch.device("cpu")}


def test_show_generates_real_source_when_codegen_exists(capsys):
    if not hasattr(ac, "compile"):
        pytest.skip("attncc.compile has not landed yet")
    code, out, err = run(capsys, "show", SWA, "--q-len", "32", "--head-dim", "16")
    assert code == 0, err
    assert "== generated Triton source" in out and "tl." in out


def test_viz_ascii_png_and_block_map(capsys, tmp_path, monkeypatch):
    monkeypatch.delattr(ac, "create_block_mask", raising=False)
    png = tmp_path / "map.png"
    code, out, _ = run(capsys, "viz", SWA, "--q-len", "20", "--kv-len", "24", "-o", str(png))
    assert code == 0
    expected = ascii_mask(ac.create_mask(ac.patterns.sliding_window(3), None, None, 20, 24)[0, 0])
    assert expected in out and len(expected.splitlines()) == 20
    assert "no attncc.create_block_mask" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    calls = []

    def fake_block_mask(pattern, B, H, Q, KV, block_size):
        calls.append((B, H, Q, KV, block_size))
        dense = torch.tensor([[2, 0, 0], [1, 2, 0], [0, 1, 2]], dtype=torch.int8)
        return SimpleNamespace(to_dense=lambda: dense.view(1, 1, 3, 3))

    monkeypatch.setattr(ac, "create_block_mask", fake_block_mask, raising=False)
    code, out, _ = run(capsys, "viz", "mask = h == 0 or q >= kv", "--q-len", "24", "--heads", "2",
                       "--head", "1", "--block", "8", "-o", str(png))
    assert code == 0 and calls == [(1, 2, 24, 24, 8)]
    assert "3 full '#', 2 partial '+', 4 empty '.'" in out and "#..\n+#.\n.+#" in out
    head1 = ascii_mask(ac.create_mask(ac.parse("mask = h == 0 or q >= kv"), 1, 2, 24, 24)[0, 1])
    assert head1 in out and "." in head1
    assert png.stat().st_size > 1000


def test_viz_real_block_map_when_it_exists(capsys):
    if not hasattr(ac, "create_block_mask"):
        pytest.skip("attncc.create_block_mask has not landed yet")
    code, out, err = run(capsys, "viz", "mask = q >= kv", "--q-len", "64", "--block", "16")
    assert code == 0, err
    assert "6 full '#', 4 partial '+', 6 empty '.'" in out


def test_viz_needs_buffer_values(capsys):
    text = "buffer doc\nmask = doc[q] == doc[kv]"
    code, _, err = run(capsys, "viz", text, "--q-len", "4")
    assert code == 2 and "--bind doc=" in err
    code, out, _ = run(capsys, "viz", text, "--q-len", "4", "--bind", "doc=0,0,1,1")
    assert code == 0 and "##..\n##..\n..##\n..##" in out
    code, _, err = run(capsys, "viz", text, "--q-len", "9", "--bind", "doc=0,0,1,1")
    assert code == 2 and "inside dim 0 of size 4" in err


def test_check_uses_check_pattern(capsys, monkeypatch):
    seen = []
    monkeypatch.setattr(attncc.testing, "check_pattern", lambda p, **kw: seen.append((p, kw)) or "3 passed")
    code, out, _ = run(capsys, "check", SWA, "--examples", "3", "--q-len", "33")
    assert code == 0 and "3 passed" in out
    assert seen == [(ac.patterns.sliding_window(3), {"max_examples": 3, "max_len": 33})]
    run(capsys, "check", SWA, "--backend", "fa4", "--dtype", "bfloat16")
    assert seen[-1][1]["kernel_options"] == {"backend": "fa4"} and seen[-1][1]["dtypes"] == (torch.bfloat16,)
    run(capsys, "check", SWA, "--no-decode")
    assert seen[-1][1] == {"max_examples": 5, "max_len": 64, "decode": False}

    def failing(p, **kw):
        raise AssertionError("kernel differs")

    monkeypatch.setattr(attncc.testing, "check_pattern", failing)
    code, _, err = run(capsys, "check", SWA)
    assert code == 1 and "FAILED: kernel differs" in err


def test_check_takes_what_it_uses_and_refuses_what_cannot_run(capsys):
    """check draws its own lengths and heads (--q-len caps them; no --kv-len / --heads), and a
    backend this machine cannot run is bad input (exit 2 at once), not a failing pattern."""
    with pytest.raises(SystemExit) as info:
        cli.main(["check", SWA, "--kv-len", "7"])
    assert info.value.code == 2
    capsys.readouterr()
    if not torch.cuda.is_available():
        code, out, err = run(capsys, "check", SWA, "--backend", "fa4")
        assert code == 2 and "runs on CUDA only" in err and out == ""


def test_explain_and_bench_say_what_is_missing(capsys, monkeypatch):
    monkeypatch.delattr(ac, "explain", raising=False)
    code, out, err = run(capsys, "explain", SWA)
    assert code == 1 and "attncc.explain is missing" in err and out == ""
    monkeypatch.setattr(ac, "explain", lambda p, q, k, v: f"report for {p.name} at {tuple(q.shape)}", raising=False)
    code, out, _ = run(capsys, "explain", "# swa\n" + SWA, "--q-len", "50", "--heads", "4")
    assert code == 0 and "report for swa at (1, 4, 50, 64)" in out
    monkeypatch.setattr(ac, "__file__", "/nonexistent/attncc/__init__.py")
    code, _, err = run(capsys, "bench")
    assert code == 1 and "benchmarks/suite.py does not exist" in err


def test_exit_codes(capsys, user_module):
    code, out, err = run(capsys, "show", "mask = q >= kv and")
    assert code == 2 and "unexpected end of text" in err and "^" in err and out == ""
    code, _, err = run(capsys, "show", "my_masks:broken")
    assert code == 1 and "RuntimeError: user code failed" in err
    with pytest.raises(SystemExit) as info:
        cli.main(["viz", SWA, "--q-len", "0"])
    assert info.value.code == 2


# ------------------------------------------------------------------------------------------------
# The real entry points, in subprocesses.

def _attncc(*args, cwd=None, module=False):
    exe = [sys.executable, "-m", "attncc.cli"] if module else [os.path.join(os.path.dirname(sys.executable), "attncc")]
    return subprocess.run(exe + list(args), capture_output=True, text=True, cwd=cwd, timeout=300)


def test_console_script_show():
    r = _attncc("show", SWA)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("== pattern\n" + SWA)


def test_module_entry_point_viz_png_and_bad_input(tmp_path):
    (tmp_path / "swa.attn").write_text(SWA)
    r = _attncc("viz", "swa.attn", "--q-len", "16", "-o", "out.png", cwd=tmp_path, module=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.png").read_bytes()[:4] == b"\x89PNG"
    r = _attncc("check", "mask = q >= kv and exec('x')", module=True)
    assert r.returncode == 2 and "line 1, column 25" in r.stderr and "Traceback" not in r.stderr


def test_head_dims_outside_the_kernels_range_exit_2(capsys):
    for verb in ("check", "show"):
        with pytest.raises(SystemExit) as info:
            cli.main([verb, "mask = q >= kv", "--head-dim", "8"])
        assert info.value.code == 2
    assert "head dims 16..256" in capsys.readouterr().err


def test_viz_samples_masks_too_large_to_draw(capsys):
    code, out, _ = run(capsys, "viz", "mask = q >= kv and q - kv < 100000", "--q-len", "1000000",
                       "--block", "8192", "--width", "8")
    assert code == 0 and "sampled every 245 queries and 245 keys" in out
    assert "9.5% of pairs attend" in out


def test_viz_draws_a_layouts_whole_canvas_by_default(capsys):
    """A pattern with a token layout (a 16x16 neighbourhood) is drawn over its 256 tokens, not 128."""
    assert cli.main(["viz", "attncc.patterns:neighborhood((16, 16), 5)"]) == 0
    assert "== mask, 256 x 256 tokens" in capsys.readouterr().out
    assert cli.main(["viz", "attncc.patterns:neighborhood((16, 16), 5)", "--q-len", "64"]) == 0
    assert "== mask, 64 x 64 tokens" in capsys.readouterr().out


def test_only_pattern_factories_are_called(tmp_path, monkeypatch):
    """A PATTERN naming any other function (os:system, builtins:exec) is refused before a call."""
    monkeypatch.chdir(tmp_path)
    for spec in (f"os:system('touch {tmp_path}/ran')", "builtins:exec('open(\\'ran\\', \\'w\\')')", "os:getcwd"):
        with pytest.raises(cli.InputError, match="not annotated to return an attncc Pattern"):
            cli.load_pattern(spec)
    assert not (tmp_path / "ran").exists()


def test_explain_takes_kv_heads(capsys):
    code, out, err = run(capsys, "explain", "mask = q >= kv", "--target", "h200", "--heads", "32", "--kv-heads", "4",
                         "--q-len", "1024")
    assert code == 0 and "Hq=32 Hkv=4" in out, err
    code, _, err = run(capsys, "explain", "mask = q >= kv", "--target", "h200", "--heads", "6", "--kv-heads", "4")
    assert code == 2 and "not a multiple of --kv-heads 4" in err
