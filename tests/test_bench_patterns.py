"""The benchmark suite: its two definitions of each pattern (attncc, FlexAttention) agree, and the
harness (benchmarks/suite.py) guards, records and reports rows correctly (with stand-in kernels)."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import attncc as ac
from attncc.compiler.evaluate import evaluate, token_mask

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import patterns as bp  # noqa: E402
from benchmarks import suite  # noqa: E402


@pytest.mark.parametrize("name", bp.NAMES + bp.VALIDATION_NAMES)
def test_flex_mask_equals_attncc_mask_dense(name):
    n, heads = 256, 4
    pat = bp.build(name, n, heads, sizes=bp.SMOKE)
    want = ac.create_mask(pat.attncc, 1, heads, n, n)
    if pat.mask_mod is None:
        assert bool(want.all())
        return
    ar = torch.arange
    got = pat.mask_mod(ar(1).view(1, 1, 1, 1), ar(heads).view(1, heads, 1, 1),
                       ar(n).view(1, 1, n, 1), ar(n).view(1, 1, 1, n)).expand(1, heads, n, n)
    assert torch.equal(got, want)
    assert 0 < int(got.sum()) < got.numel()  # the smoke sizes keep every mask non-trivial


def _sample_pairs(n: int, count: int = 100_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Random pairs plus pairs at every offset q - kv near the patterns' thresholds."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, n, (count,), generator=gen)
    kv = torch.randint(0, n, (count,), generator=gen)
    offsets = torch.tensor([d + e for d in (0, 1024, 2048, 8 * 128) for e in range(-9, 10)])
    q2 = torch.randint(0, n, (len(offsets), 400), generator=gen)
    kv2 = q2 - offsets.view(-1, 1)
    keep = (kv2 >= 0) & (kv2 < n)
    return torch.cat([q, q2[keep]]), torch.cat([kv, kv2[keep]])


@pytest.mark.parametrize("name", bp.NAMES + bp.VALIDATION_NAMES)
def test_flex_mask_equals_attncc_mask_at_benchmark_sizes(name):
    n, heads = 8192, 16
    pat = bp.build(name, n, heads)
    q, kv = _sample_pairs(n)
    b, h = torch.zeros_like(q), torch.randint(0, heads, q.shape, generator=torch.Generator().manual_seed(1))
    want = evaluate(token_mask(pat.attncc), {"b": b, "h": h, "q": q, "kv": kv},
                    pat.attncc.params, pat.attncc.buffers).bool().expand(q.shape)
    got = torch.ones_like(want) if pat.mask_mod is None else pat.mask_mod(b, h, q, kv)
    assert torch.equal(got, want)


def test_benchmark_definitions_spelled_out():
    """Spot values straight from BENCHMARKS.md, independent of both definitions."""
    n = 8192
    one = lambda name, q, kv: bool(bp.build(name, n, 16).mask_mod(*map(torch.tensor, (0, 0, q, kv))))
    assert one("swa1024", 5000, 5000 - 1024) and not one("swa1024", 5000, 5000 - 1025)
    assert not one("swa1024", 5000, 5001)
    assert one("prefixlm2048", 10, 2047) and not one("prefixlm2048", 10, 2048)
    assert one("dilated", 3000, 3000 - 2048) and not one("dilated", 3000, 3000 - 2052)
    assert one("dilated", 3000, 3004) and not one("dilated", 3000, 3002)
    # natten2d: the query at pixel (0, 0) sees the clamped 17x17 window rows 0..16, cols 0..16
    assert one("natten2d", 0, 16 * 128 + 16) and not one("natten2d", 0, 17 * 128)
    assert not one("natten2d", 0, 17)
    lengths = bp.document_lengths(n)
    ends = torch.tensor(lengths).cumsum(0)
    assert one("document", int(ends[0]) - 1, 0) and not one("document", int(ends[0]), int(ends[0]) - 1)
    assert one("sinks", 5000, 3) and not one("sinks", 5000, 4) and one("sinks", 5000, 5000 - 1024)
    assert one("chunked", 2047, 1024) and not one("chunked", 2048, 2047) and not one("chunked", 1024, 1025)
    assert one("global_tokens", 5000, 512) and not one("global_tokens", 5000, 513) and one("global_tokens", 4000, 4256)
    assert one("strided_heads", 5000, 8) and not one("strided_heads", 5000, 9)  # head 0: shard 0
    alibi = bp.build("alibi", n, 16)
    score = alibi.score_mod(torch.tensor(0.0), 0, torch.tensor(3), torch.tensor(10), torch.tensor(4))
    assert math.isclose(float(score), -6 * 2 ** (-8 * 4 / 16), rel_tol=1e-6)


def _dense_attention(q, k, v, pat: bp.BenchPattern) -> torch.Tensor:
    """float64 softmax attention straight from the FlexAttention functions."""
    B, H, N, D = q.shape
    ar = torch.arange
    idx = ar(B).view(B, 1, 1, 1), ar(H).view(1, H, 1, 1), ar(N).view(1, 1, N, 1), ar(N).view(1, 1, 1, N)
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D)
    if pat.score_mod is not None:
        s = pat.score_mod(s, *idx).double()
    if pat.mask_mod is not None:
        s = s.masked_fill(~pat.mask_mod(*idx), -math.inf)
    return torch.softmax(s, -1) @ v.double()


@pytest.mark.parametrize("name", bp.NAMES + bp.VALIDATION_NAMES)
def test_flex_functions_give_the_reference_output(name):
    n, heads, d = 256, 4, 16
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, heads, n, d, generator=gen, dtype=torch.float64) * 2 for _ in range(3))
    pat = bp.build(name, n, heads, sizes=bp.SMOKE)
    torch.testing.assert_close(_dense_attention(q, k, v, pat), ac.reference(q, k, v, pat.attncc),
                               rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["causal", "document", "natten2d", "natten3d", "dilated", "full"])
def test_count_live_pairs_in_chunks(name):
    n, heads = 256, 3
    pat = bp.build(name, n, heads, sizes=bp.SMOKE)
    count, per_b, per_h = bp.count_live_pairs(pat.mask_mod, 2, heads, n, n, budget=5000)
    assert count == int(ac.create_mask(pat.attncc, 2, heads, n, n).sum())
    assert not per_b and not per_h


def test_count_live_pairs_per_head_and_odd_lengths():
    mask = lambda b, h, q, kv: (q - kv <= 3 * h) & (q >= kv) & (b == 0)
    count, per_b, per_h = bp.count_live_pairs(mask, 2, 4, 37, 41, budget=100)
    ar = torch.arange
    dense = mask(ar(2).view(2, 1, 1, 1), ar(4).view(1, 4, 1, 1), ar(37).view(1, 1, 37, 1), ar(41).view(1, 1, 1, 41))
    assert (count, per_b, per_h) == (int(dense.sum()), True, True)
    assert bp.count_live_pairs(lambda b, h, q, kv: q < 5, 1, 2, 37, 41)[0] == 2 * 5 * 41


def test_document_lengths():
    lengths = bp.document_lengths(8192)
    assert sum(lengths) == 8192 and lengths == bp.document_lengths(8192)
    assert all(256 <= x < 3072 for x in lengths[:-1]) and 1 <= lengths[-1] < 3072
    assert len(lengths) > 2
    assert bp.document_lengths(100, 256, 3072) == [100]
    with pytest.raises(ValueError, match="low < high"):
        bp.document_lengths(10, 5, 5)


def test_unknown_pattern_and_bad_canvas():
    with pytest.raises(ValueError, match="unknown pattern"):
        bp.build("nope", 256, 2)
    with pytest.raises(ValueError, match="N must be 8192"):
        bp.build("natten2d", 8000, 2)


class _Compiled:
    config = {"backend": "stand-in", "BLOCK_M": 64}


def _stand_in(monkeypatch, attention):
    monkeypatch.setattr(ac, "attention", attention, raising=False)
    monkeypatch.setattr(ac, "compile", lambda *a, **k: _Compiled(), raising=False)


def _run(tmp_path, *extra, shapes="odd"):
    result = suite.main(["--smoke", "--device", "cpu", "--shapes", shapes, "--cpu-reps", "1",
                         "--out-dir", str(tmp_path), *extra])
    saved = json.loads(next(tmp_path.glob("*-cpu-smoke.json")).read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"], default=str))
    return result, next(tmp_path.glob("*-cpu-smoke.md")).read_text()


def test_suite_times_a_correct_kernel_and_refuses_gradients(tmp_path, monkeypatch):
    def attention(q, k, v, pattern, **kw):
        if q.requires_grad:
            raise NotImplementedError("no backward yet")
        return ac.reference(q, k, v, pattern).to(q.dtype)
    _stand_in(monkeypatch, attention)
    result, md = _run(tmp_path, "--patterns", "causal,document", "--backward")
    causal, document = result["rows"]
    assert causal["live_pairs"] == 2 * 250 * 251 // 2
    for row in (causal, document):
        assert row["guard"]["fwd"]["ok"] and row["fwd"]["attncc"]["tflops"] > 0
        assert row["fwd_bwd"]["attncc"]["status"] == "n/a"
        assert row["attncc_config"]["backend"] == "stand-in"
    assert causal["guard"]["fwd"]["vs"] == "flex" and causal["fwd_bwd"]["cudnn"]["tflops"] > 0
    assert document["fwd"]["cudnn"]["status"] == "none"
    assert md.rstrip().splitlines()[-1].startswith("| document | B1 H2 N250 D32 | n/a |")
    assert "first call of a new pattern" in md and "stand-in (BLOCK_M=64)" in md
    assert "- attncc fwd_bwd: NotImplementedError: no backward yet (all rows)" in md


def test_suite_marks_a_wrong_kernel_failed_and_checks_gradients(tmp_path, monkeypatch):
    def attention(q, k, v, pattern, **kw):  # ignores the mask: wrong for causal
        return ac.reference(q, k, v, None).to(q.dtype)
    _stand_in(monkeypatch, attention)
    result, md = _run(tmp_path, "--patterns", "full,causal", "--backward", "--no-first-call")
    full, causal = result["rows"]
    assert full["fwd"]["attncc"]["tflops"] > 0 and full["guard"]["fwd_bwd"]["ok"]
    assert full["guard"]["fwd_bwd"]["vs"] == "cudnn"  # flex has no CPU backward: the next anchor
    for key in ("fwd", "fwd_bwd"):
        entry = causal[key]["attncc"]
        assert entry["status"] == "FAILED" and "ms" not in entry and entry["rel_err"] > 0.1
    assert causal["guard"]["fwd"]["attncc_vs_reference[corner]"] > 0.1
    assert causal["guard"]["fwd"]["flex_vs_reference[corner]"] < 2e-2
    assert "| causal | B1 H2 N250 D32 | FAILED (rel" in md


def test_suite_records_row_errors_and_goes_on(tmp_path, monkeypatch):
    _stand_in(monkeypatch, lambda q, k, v, pattern, **kw: ac.reference(q, k, v, pattern).to(q.dtype))
    result, md = _run(tmp_path, "--patterns", "natten2d,swa1024", "--no-first-call")
    natten, swa = result["rows"]
    assert "N must be 256" in natten["error"] and swa["guard"]["fwd"]["ok"]
    assert "- row: ValueError: natten2d is defined" in md and "(odd/natten2d)" in md


@pytest.mark.parametrize("wrong", [False, True])
def test_suite_checks_gqa_gradients_against_the_oracle(tmp_path, monkeypatch, wrong):
    """No anchor has a CPU backward for alibi: attncc's GQA gradients are checked on the oracle."""
    def attention(q, k, v, pattern, **kw):
        out = ac.reference(q, k, v, pattern).to(q.dtype)
        return out + (q - q.detach()) if wrong else out  # right output, wrong dq
    _stand_in(monkeypatch, attention)
    result, _ = _run(tmp_path, "--patterns", "alibi", "--backward", "--no-first-call", shapes="gqa")
    (row,) = result["rows"]
    assert row["guard"]["fwd"]["vs"] == "flex" and row["guard"]["fwd"]["ok"]
    check = row["guard"]["fwd_bwd"]
    assert check["vs"] == "reference[corner]" and check["ok"] is not wrong
    assert ("tflops" in row["fwd_bwd"]["attncc"]) is not wrong


def test_suite_flash_column_is_guarded_and_records_refusals(tmp_path, monkeypatch):
    """FLASH faked on CPU (eager flex ignores kernel_options): right on causal (timed), refusing
    softcap the way torch.compile reports it (n/a with CuteDSL's reason), wrong on alibi (FAILED)."""
    from torch._inductor.exc import InductorError, LoweringException
    _stand_in(monkeypatch, lambda q, k, v, pattern, **kw: ac.reference(q, k, v, pattern).to(q.dtype))
    flex, block_mask = suite.setup_flex(torch.device("cpu"))
    rule = "=" * 80
    unsupported = NotImplementedError(f"{rule}\nUNSUPPORTED CUTEDSL OPERATION: 'tanh'\n{rule}\nNot yet implemented.")

    def fake_flex(q, k, v, score_mod=None, kernel_options=None, **kw):
        name = getattr(score_mod, "__name__", None)
        if kernel_options == {"BACKEND": "FLASH"} and name == "softcap":
            raise InductorError(LoweringException(RuntimeError(f"CuteDSL template failed: {unsupported}"),
                                                  "flex_attention", [], {}), None)
        if kernel_options == {"BACKEND": "FLASH"} and name == "alibi":
            score_mod = None
        return flex(q, k, v, score_mod=score_mod, **kw)
    monkeypatch.setattr(suite, "setup_flex", lambda device: (fake_flex, block_mask))
    monkeypatch.setattr(suite, "flash_state", lambda args, device: "on")
    result, md = _run(tmp_path, "--patterns", "causal,softcap,alibi", "--backward")
    causal, softcap, alibi = result["rows"]
    assert causal["fwd"]["flash"]["tflops"] > 0 and causal["guard"]["flash_fwd"] == {
        "vs": "flex", "rel_err": causal["guard"]["flash_fwd"]["rel_err"], "tol": 2e-2, "ok": True}
    assert causal["guard"]["fwd"]["vs"] == "flex"  # attncc still checked against flex, never FLASH
    assert softcap["fwd"]["flash"] == {"status": "n/a", "why": "LoweringException: RuntimeError: CuteDSL template "
                                       "failed: UNSUPPORTED CUTEDSL OPERATION: 'tanh'"}
    assert alibi["fwd"]["flash"]["status"] == "FAILED" and "ms" not in alibi["fwd"]["flash"]
    assert alibi["guard"]["flash_fwd"]["flash_vs_reference[corner]"] > 2e-2
    assert all(r["fwd_bwd"]["flash"]["status"] == "n/a" for r in result["rows"])  # flex: no CPU backward
    assert "| attncc/flex | attncc/FLASH | attncc/cuDNN |" in md and "| FLASH |" in md
    assert "- flash fwd: LoweringException: RuntimeError: CuteDSL template failed: UNSUPPORTED" in md
    assert result["first_call"]["flash"]["first_s"] > 0 and "FLASH (on `(q >= kv)" in md
    assert result["settings"]["flash"] == "on"


def test_flash_column_is_off_without_cuda_or_flash_attn(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)  # import fails even where it is installed
    args = suite.parse_args(["--smoke"])
    assert suite.flash_state(args, torch.device("cpu")) == "off (not CUDA)"
    assert suite.flash_state(args, torch.device("cuda")).startswith("off (ModuleNotFoundError")
    assert suite.flash_state(suite.parse_args(["--no-flash"]), torch.device("cuda")) == "off (--no-flash)"


def test_suite_runs_the_decode_section_after_its_rows(tmp_path, monkeypatch):
    from benchmarks import decode

    calls = []
    monkeypatch.setattr(decode, "main", lambda argv: calls.append(argv) or [{"pattern": "causal"}])
    _stand_in(monkeypatch, lambda q, k, v, pattern, **kw: ac.reference(q, k, v, pattern).to(q.dtype))
    result, _ = _run(tmp_path, "--patterns", "causal", "--no-first-call", "--decode")
    assert calls == [["--out-dir", str(tmp_path), "--smoke"]] and result["decode"] == [{"pattern": "causal"}]


def test_natten3d_frames_follow_the_length():
    """The suite's 3-D case is a clip of 32x32 frames (8 at the main shape, 16 at the video shape,
    which runs natten3d alone unless told otherwise)."""
    assert suite.parse_args(["--shapes", "video"]).rows == [("video", "natten3d")]
    assert bp.build("natten3d", 16384, 2).params["video"] == (16, 32, 32)
    assert bp.build("natten3d", 8192, 2).params["video"] == (8, 32, 32)
    assert bp.build("natten3d", 512, 2, sizes=bp.SMOKE).params["video"] == (8, 8, 8)
    for bad in (8000, 4096):  # not whole frames; fewer frames than the kernel
        with pytest.raises(ValueError, match="natten3d"):
            bp.build("natten3d", bad, 2)
