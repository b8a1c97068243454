"""The cost simulator and `explain` (compiler/cost.py), on CPU: profiles, the live-pair count
against a dense count, monotonicity of the predictions, heavy-first against in-order, the report
for several patterns and targets on meta tensors."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import attncc as ac
from attncc.compiler import cost
from attncc.compiler.codegen import TileConfig
from attncc.runtime.inputs import Shapes
from attncc.runtime.kernel import META_CACHE

H200 = cost.load_profile("h200")
T = TileConfig(128, 64, 8, 3)
T128 = TileConfig(128, 128, 4, 1)  # fa4's tile


def predict(pattern, N=4096, B=2, H=8, D=128, tiles=T, backend="triton"):
    s = Shapes(B, H, H, N, N, D, D)
    _, meta = META_CACHE.get(pattern, s, tiles, torch.device("cpu"))
    return cost.simulate(meta, B, H, D, tiles, backend, H200).ms


def test_profiles_load_and_are_validated(tmp_path, monkeypatch):
    assert H200.sms == 132 and "fa4" in H200.backends and H200.rate("triton", T) > 0
    assert cost.load_profile("generic").sms > 0
    assert cost.profile_for(torch.device("cpu")).key == "generic"
    assert cost.profile_for(None, "h100").name == "NVIDIA H100"
    with pytest.raises(ValueError, match="no hardware profile 'a100'.*'h200'"):
        cost.load_profile("a100")
    monkeypatch.setattr(cost, "PROFILES", tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps({"name": "x", "sms": 1}))
    with pytest.raises(ValueError, match="lacks"):
        cost.load_profile("bad")
    broken = json.loads((cost.Path(ac.__file__).parent / "compiler/profiles/h200.json").read_text())
    broken["backends"]["triton"]["tflops"] = {"128x64": 0}
    (tmp_path / "zero.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="positive tflops"):
        cost.load_profile("zero")


@pytest.mark.parametrize("make", [lambda: ac.patterns.sliding_window(50), lambda: ac.patterns.causal(),
                                  lambda: ac.patterns.document(lengths=[100, 37, 120])],
                         ids=["swa", "causal", "document"])
def test_live_pairs_match_a_dense_count(make, monkeypatch):
    pattern = make()
    B, H, Q, KV = 1, 2, 257, 257
    bm = ac.create_block_mask(pattern, B, H, Q, KV, block_size=(32, 64))
    dense = int(ac.create_mask(pattern, B, H, Q, KV).expand(B, H, Q, KV).sum())
    pairs, exact = cost.live_pairs(pattern, bm, B, H, Q, KV)
    assert exact and pairs == dense
    monkeypatch.setattr(cost, "_EXACT_PAIRS", 32 * 64 * 4)  # a sample of four PARTIAL tiles
    estimates = [cost.live_pairs(pattern, bm, B, H, Q, KV, seed=seed) for seed in range(60)]
    assert not any(exact for _, exact in estimates)
    mean = sum(e for e, _ in estimates) / len(estimates)
    assert abs(mean - dense) < 0.1 * dense  # unbiased: the seeds' mean is close to the count


def test_more_live_tiles_are_never_predicted_faster():
    windows = [predict(ac.patterns.sliding_window(W)) for W in (128, 512, 1024, 2048)]
    assert windows == sorted(windows) and windows[0] < windows[-1]
    assert predict(ac.patterns.causal()) <= predict(ac.Pattern())
    assert predict(ac.Pattern(), N=2048) < predict(ac.Pattern(), N=4096)


def test_heavy_first_is_never_worse_than_in_order():
    s = Shapes(2, 8, 8, 8192, 8192, 128, 128)
    for pattern in (ac.patterns.causal(), ac.patterns.document(lengths=[4000, 100, 4092]),
                    ac.patterns.prefix_lm(2048)):
        _, meta = META_CACHE.get(pattern, s, T, torch.device("cpu"))
        in_order = dataclasses.replace(meta, order=torch.arange(meta.order.shape[-1]).expand_as(meta.order))
        heavy = cost.simulate(meta, 2, 8, 128, T, "triton", H200).ms
        plain = cost.simulate(in_order, 2, 8, 128, T, "triton", H200).ms
        assert heavy <= plain * (1 + 1e-9), (pattern.name, heavy, plain)


def test_makespan_is_list_scheduling():
    assert cost._makespan([1.0, 1.0, 1.0], 4) == 1.0
    assert cost._makespan([3.0, 1.0, 1.0, 1.0], 2) == 3.0
    assert cost._makespan([1.0, 1.0, 1.0, 3.0], 2) == 4.0  # in order: the heavy one comes last


@pytest.mark.parametrize("target", ["h200", "h100"])
@pytest.mark.parametrize("make", [lambda: ac.patterns.causal(), lambda: ac.patterns.sliding_window(1024),
                                  lambda: ac.patterns.softcap(30.0), lambda: ac.patterns.natten2d(32, 64, 7)],
                         ids=["causal", "swa", "softcap", "natten2d"])
def test_explain_on_meta_tensors(make, target):
    q, k, v = (torch.empty(2, 8, 2048, 128, dtype=torch.bfloat16, device="meta") for _ in range(3))
    text = ac.explain(make(), q, k, v, target=target)
    for part in ("EMPTY", "PARTIAL", "FULL", "live pairs", "tile efficiency", "roofline", "predicted:", "profile",
                 "per score element: mask"):
        assert part in text, part
    assert "<- runs" in text or "sdpa-cudnn" in text
    assert ("fa4 " in text) == (target in ("h200", "h100"))  # both profiles model fa4
    fa4_line = next(line for line in text.splitlines() if line.strip().startswith("fa4 "))
    assert ("fa4 could run this call" in text) == ("<- runs" not in fa4_line)


def test_explain_names_fa4s_own_masks_where_they_run():
    q, k, v = (torch.empty(4, 16, 8192, 128, dtype=torch.bfloat16, device="meta") for _ in range(3))
    swa = ac.explain(ac.patterns.sliding_window(1024), q, k, v, target="h200")
    assert "FA4's own masks (compiler/bands.py), forward and backward: q [0, 8192) x kv [0, 8192) local window " \
           "(1024, 0)" in swa
    prefix = ac.explain(ac.patterns.prefix_lm(2048), q, k, v, target="h200")
    assert "in the backward: q [0, 8192) x kv [0, 2048) dense; q [2048, 8192) x kv [2048, 8192) causal" in prefix
    unfolded = ac.explain(ac.patterns.dilated(1024, 4), q, k, v, target="h200", kernel_options={"fold": False})
    assert "FA4's own masks" not in unfolded and "runs folded" not in unfolded
    # folded (runtime/fold.py): the residue classes are heads of a call of N/4 tokens, a local window each
    dilated = ac.explain(ac.patterns.dilated(1024, 4), q, k, v, target="h200")
    assert "shapes: B=64 Hq=4 Hkv=4 Q=2048 KV=2048 D=128" in dilated and "runs folded: residue classes mod 4" in dilated
    assert "forward and backward: q [0, 2048) x kv [0, 2048) local window (256, 256)" in dilated


def test_explain_refuses_bad_targets_and_meta_without_one():
    q, k, v = (torch.empty(1, 2, 64, 16, device="meta") for _ in range(3))
    with pytest.raises(ValueError, match="target must be one of"):
        ac.explain(ac.patterns.causal(), q, k, v, target="tpu")
    with pytest.raises(ValueError, match="meta tensors need a target"):
        ac.explain(ac.patterns.causal(), q, k, v)


def test_explain_on_cpu_and_the_cli(capsys):
    q, k, v = (torch.randn(1, 2, 200, 32) for _ in range(3))
    text = ac.explain(ac.patterns.sliding_window(40), q, k, v)
    assert "a generic CUDA GPU" in text and "triton  32x32" in text and "<- runs" in text
    assert "fa4 cannot run this call: fa4 runs on CUDA tensors only" in text
    assert "torch.float32 is not what the profiles model" in text  # the times shown are 16-bit kernels'
    assert ac.compile(ac.patterns.sliding_window(40), q, k, v).predicted_ms is None  # CPU: no GPU to predict
    from attncc.cli import main

    assert main(["explain", "mask = q >= kv", "--target", "h200", "--q-len", "1024"]) == 0
    assert "NVIDIA H200" in capsys.readouterr().out


def test_explain_draws_the_block_map_and_the_load(tmp_path):
    pytest.importorskip("matplotlib")
    q, k, v = (torch.empty(1, 4, 2048, 128, dtype=torch.bfloat16, device="meta") for _ in range(3))
    png = tmp_path / "load.png"
    ac.explain(ac.patterns.document(lengths=[1000, 48, 1000]), q, k, v, target="h200", png=str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_the_validation_benchmark_runs_in_smoke_mode(tmp_path):
    import sys

    sys.path.insert(0, str(cost.Path(ac.__file__).resolve().parents[1]))
    from benchmarks import costmodel

    assert costmodel.spearman([1, 2, 3], [10, 20, 30]) == 1.0 and costmodel.spearman([1, 2, 3], [3, 2, 1]) == -1.0
    assert costmodel.spearman([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)
    predicted = costmodel.main(["--predict", "h200", "--N", "1024", "--patterns", "sinks,chunked"])["results"]
    assert [len(r["rows"]) for r in predicted] == [6, 6]  # five Triton tiles and fa4, nothing timed
    assert all(r["pick"] == min(r["rows"], key=lambda x: x["predicted_ms"])["config"] for r in predicted)
    result = costmodel.main(["--smoke", "--patterns", "causal", "--out-dir", str(tmp_path)])["results"][0]
    assert len(result["rows"]) == 5 and all(r["rel_err"] < 1e-4 and r["predicted_ms"] > 0 for r in result["rows"])
    assert result["pick_vs_best"] >= 1.0 and (tmp_path / "costmodel.md").read_text().startswith("| pattern")
    assert result["auto"] == "triton 32x32/4/1"  # what the automatic choice ran (the interpreter's table)
    assert result["refused"] == []
    # another of BENCHMARKS.md's shapes: GQA, predicted and (tiny, interpreted) measured
    gqa = costmodel.main(["--predict", "h200", "--shape", "gqa", "--N", "1024", "--patterns", "causal"])["results"][0]
    assert gqa["shape"] == {"B": 4, "Hq": 32, "Hkv": 8, "N": 1024, "D": 128} and len(gqa["rows"]) == 7  # and cuDNN
    assert gqa["rows"][-1]["config"] == "sdpa-cudnn 128x64/8/3"
    small = costmodel.main(["--smoke", "--shape", "gqa", "--patterns", "causal"])["results"][0]
    assert small["shape"]["Hkv"] == 2 and all(r["rel_err"] < 1e-4 for r in small["rows"])


def test_the_validation_benchmark_lists_a_configuration_refused_for_shared_memory(tmp_path, monkeypatch,
                                                                                   isolated_refusals):
    """On the H200 global_tokens' 64x128/4/3 forward needed 240 KiB of 227: the run goes on without it."""
    import sys

    from triton.runtime.errors import OutOfResources

    from attncc.runtime import kernel

    sys.path.insert(0, str(cost.Path(ac.__file__).resolve().parents[1]))
    from benchmarks import costmodel

    real = kernel.launch

    def launch(interpret, fn, *args, **kwargs):
        if fn.__globals__.get("BLOCK_N") == 128 and fn.__globals__.get("BLOCK_M") == 64:
            raise OutOfResources(245760, 232448, "shared memory")
        return real(interpret, fn, *args, **kwargs)
    monkeypatch.setattr(kernel, "launch", launch)
    result = costmodel.main(["--smoke", "--patterns", "causal", "--out-dir", str(tmp_path)])["results"][0]
    assert result["refused"] == ["triton 64x128/4/3"] and len(result["rows"]) == 4
    assert "triton 64x128/4/3 |" in (tmp_path / "costmodel.md").read_text()


def test_refit_recovers_a_profile_from_recorded_timings_and_scores_held_out_patterns(tmp_path, monkeypatch):
    import sys

    sys.path.insert(0, str(cost.Path(ac.__file__).resolve().parents[1]))
    from benchmarks import refit

    monkeypatch.setattr(refit, "B", 1)
    monkeypatch.setattr(refit, "H", 2)
    truth = cost.load_profile("h200")
    spec = {**truth.backends["triton"], "partial_factor": 1.6, "score_op": 0.05, "mask_op": 0.0}
    truth = dataclasses.replace(truth, backends={"triton": spec})
    configs = ["triton 128x64/8/3", "triton 64x64/4/3"]
    results = [{"pattern": name, "N": 1024, "rows": [{"config": c, "measured_ms": 1.0} for c in configs]}
               for name in ("causal", "swa1024", "softcap", "alibi")]
    for row, (_, t) in zip([row for r in results for row in r["rows"]], refit.timings_of(results)):  # row order
        row["measured_ms"] = cost.simulate(t.meta, t.B, t.H, t.D, t.tiles, "triton", truth).ms
    path = tmp_path / "timings.json"
    path.write_text(json.dumps(results))
    got = refit.main([str(path), "--hold-out", "alibi", "--out-dir", str(tmp_path)])
    assert (got["coefficients"]["triton"]["partial_factor"], got["coefficients"]["triton"]["score_op"]) == (1.6, 0.05)
    assert got["after"]["alibi"]["rms_log_err"] < 1e-9 < got["before"]["alibi"]["rms_log_err"]  # held out, recovered
    assert "| alibi | held out |" in (tmp_path / "refit.md").read_text()
    assert refit.tiles_of("fa4 128x128") == ("fa4", TileConfig(128, 128, 4, 1))


def test_refits_partial_grid_varies_the_figures_of_the_timings_head_dim_class():
    """At D=64 the grid sets the D=64 class's factor (it once set D=128's, so every value scored alike)."""
    import sys

    sys.path.insert(0, str(cost.Path(ac.__file__).resolve().parents[1]))
    from benchmarks import refit

    shipped = cost.load_profile("h100")
    d64 = shipped.spec("triton", 64)
    truth = shipped.with_spec("triton", 64, {**d64, "partial_factor": {**d64["partial_factor"], "64x64": 1.5}})
    results = [{"pattern": name, "N": 1024, "shape": {"B": 1, "Hq": 2, "Hkv": 2, "D": 64},
                "rows": [{"config": "triton 64x64/4/3", "measured_ms": 1.0}]} for name in ("causal", "swa1024")]
    for row, (_, t) in zip([r["rows"][0] for r in results], refit.timings_of(results)):
        row["measured_ms"] = cost.simulate(t.meta, t.B, t.H, t.D, t.tiles, "triton", truth).ms
    scores = refit.partial_grid(refit.timings_of(results), shipped, "64x64:1.5,2.5")
    assert max(v["rms_log_err"] for v in scores[1.5].values()) < 1e-9 < min(v["rms_log_err"] for v in scores[2.5].values())


def test_benchmarks_model_a_forced_fa4_call_in_the_form_it_runs_and_refit_takes_the_latest_times():
    """dilated on fa4 runs folded (runtime/fold.py): its predictions and refit's timings use the folded
    block map and shapes, as ac.compile does; on Triton it stays in its token layout. A case measured
    again in a later results file replaces the earlier one."""
    import sys

    sys.path.insert(0, str(cost.Path(ac.__file__).resolve().parents[1]))
    from benchmarks import refit
    from benchmarks.costmodel import kernel_form
    from benchmarks.patterns import build

    pattern = build("dilated", 1024, 2, torch.device("cpu")).attncc
    s = Shapes(2, 2, 2, 1024, 1024, 64, 64)
    kp, ks = kernel_form(pattern, s, "fa4")
    assert (ks.B * ks.Hq, ks.Q, ks.KV) == (2 * 2 * 4, 256, 256) and "residues mod 4" in kp.name
    assert kernel_form(pattern, s, "triton") == (pattern.kernel_pattern, s)
    old = [{"pattern": "causal", "N": 512, "shape": {"B": 1, "Hq": 2, "Hkv": 2, "D": 64},
            "rows": [{"config": "fa4 128x128", "measured_ms": 2.0}]}]
    new = [{**old[0], "rows": [{"config": "fa4 128x128", "measured_ms": 1.0}]},
           {**old[0], "pattern": "dilated", "N": 1024, "rows": [{"config": "fa4 128x128", "measured_ms": 0.5}]}]
    cases = refit.latest([old, new])
    assert [(c["pattern"], c["rows"][0]["measured_ms"]) for c in cases] == [("causal", 1.0), ("dilated", 0.5)]
    (_, causal), (_, dilated) = refit.timings_of(cases)
    assert (causal.B, causal.H, dilated.B * dilated.H) == (1, 2, 1 * 2 * 4)  # dilated timed as folded


def test_calibrate_writes_a_profile_that_profile_for_finds(tmp_path, monkeypatch):
    from attncc.cli import main
    from attncc.runtime import calibrate

    out = tmp_path / "profiles" / "my-gpu.json"
    assert main(["calibrate", "--smoke", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    spec = data["backends"]["triton"]
    assert spec["tflops"]["32x32"] > 0 and spec["partial_factor"] >= 1.0 and spec["program_us"] >= 0
    assert "measured by attncc calibrate" in data["provenance"]
    # by default every head dim class, each into the profile the one before wrote, one statement each
    assert all("32x32" in spec["head_dims"][c]["tflops"] for c in ("64", "256"))
    assert data["provenance"].count("measured by attncc calibrate") == 3 and "'generic' profile's" in data["provenance"]
    backward = spec["backward"]["tflops"]  # both backward tile pairs' rates measured
    assert backward["default"] > 0 and backward["dkdv 32x64"] > 0 and backward["dq 64x64"] > 0
    assert spec["backward"]["partial_factor"]["dkdv 32x64"] == H200.backends["triton"]["backward"][
        "partial_factor"]["dkdv 32x64"]  # the other coefficients: the shipped profile's (generic: the H200's)
    # another head dim class: its head_dims entry replaced, the base figures kept (here generic's)
    assert main(["calibrate", "--smoke", "--head-dim", "16", "--out", str(tmp_path / "d64.json")]) == 0
    d64 = json.loads((tmp_path / "d64.json").read_text())
    generic = cost.load_profile("generic")
    assert d64["head_dim"] == 128 and d64["backends"]["triton"]["tflops"] == generic.backends["triton"]["tflops"]
    measured = d64["backends"]["triton"]["head_dims"]["64"]
    assert measured["tflops"]["32x32"] > 0 and set(measured["backward"]["tflops"]) == {
        "default", "dkdv 64x128", "dq 128x64", "dkdv 32x64", "dq 64x32"}  # D=64's three pairs, no D=128 keys
    assert "head dim class 64" in d64["provenance"]
    data["match"], data["capability"] = ["My GPU"], [9, 0]  # as calibrate writes it on a GPU named so
    out.write_text(json.dumps(data))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "My GPU 80GB")
    monkeypatch.setattr(calibrate, "user_profiles", lambda: tmp_path / "profiles")
    found = calibrate.profile_for(torch.device("cuda"))
    assert found.key == "my-gpu" and found.rate("triton", TileConfig(32, 32, 4, 1)) == spec["tflops"]["32x32"]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert calibrate.profile_for(torch.device("cuda")).key == "h200"  # the shipped one
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    assert calibrate.profile_for(torch.device("cuda")).key == "generic"  # the name, not the capability: not ours


def test_calibrate_needs_a_gpu(capsys, monkeypatch):
    from attncc.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["calibrate"]) == 1 and "no CUDA device" in capsys.readouterr().err


def test_calibrate_prices_cudnn_where_it_runs(tmp_path, monkeypatch):
    """On a GPU with cuDNN, calibrate times SDPA's cuDNN kernel on full attention (its rate) and
    causal (its PARTIAL factor and prologue), nothing else; here faked on the CPU: plain patterns
    pass sdpa_refusal and SDPA's math kernel stands in for cuDNN's."""
    from attncc.runtime import choices, kernel
    from attncc.runtime.calibrate import calibrate

    real = choices.sdpa_refusal
    monkeypatch.setattr(choices, "sdpa_refusal", lambda pattern, s, device_type, dtype, return_lse, **kw: real(
        pattern, s, "cuda", torch.bfloat16, return_lse, assume_installed=True))
    timed = []

    def sdpa(q, k, v, scale, causal):
        timed.append(causal)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    monkeypatch.setattr(kernel, "_sdpa", sdpa)
    path = calibrate(torch.device("cpu"), B=1, H=1, N=64, D=32, out=tmp_path / "p.json",
                     candidates=(TileConfig(32, 32, 4, 1),))
    data = json.loads(path.read_text())
    spec = data["backends"][cost.SDPA_CUDNN]["head_dims"]["64"]  # D=32: the class of 64
    assert spec["tflops"]["default"] > 0 and spec["partial_factor"] >= 1.0 and spec["program_us"] >= 0
    assert set(timed) == {False, True}  # full and causal, the only patterns cuDNN runs
    assert "cuDNN's to causal" in data["provenance"]
    profile = cost.read_profile(path)
    assert profile.models(cost.SDPA_CUDNN, 32) and not profile.models(cost.SDPA_CUDNN, 128)


def test_the_profiles_choose_between_cudnn_fa4_and_triton_on_plain_attention():
    """B4 H16 N8192 bf16: without FA4 cuDNN (H200 606 / 547 TFLOP/s full / causal at D=128; H100 637 /
    558) beats Triton's best (~540 / ~480); with it FA4 (H200 651 / 614 measured; H100 causal 1.72 ms
    against cuDNN's 1.97). Forced Triton, or a profile without cuDNN's figures (generic, D=256): no
    cuDNN candidate, the rules' backend stands."""
    from attncc.runtime import choices

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for key in ("h200", "h100"):
        profile = cost.load_profile(key)
        for D in (128, 64):
            s = Shapes(B=4, Hq=16, Hkv=16, Q=8192, KV=8192, D=D, Dv=D)
            table = choices.choose_tiles(s, torch.bfloat16, cuda, {})
            for pattern in (ac.Pattern(name="full"), ac.patterns.causal()):
                def pick(backend, options=None, cudnn=True):
                    return choices.cost_choice(pattern, s, torch.bfloat16, cuda, options or {}, backend, profile, cpu,
                                               cudnn=cudnn)
                assert pick("sdpa-cudnn") == ("sdpa-cudnn", table), (key, D)
                assert pick("fa4")[0] == "fa4", (key, D)
                assert pick("triton", {"backend": "triton"})[0] == "triton"
                assert pick("fa4", cudnn=False)[0] == "fa4"
                ranked = choices.ranked_candidates(pattern, s, torch.bfloat16, cuda, {}, "fa4", profile, cpu, cudnn=True)
                assert [b for b, _ in ranked].count("sdpa-cudnn") == 1
        s256 = Shapes(B=4, Hq=16, Hkv=16, Q=8192, KV=8192, D=256, Dv=256)
        assert choices.cost_choice(ac.patterns.causal(), s256, torch.bfloat16, cuda, {}, "sdpa-cudnn", profile, cpu,
                                   cudnn=True) is None  # not modelled there: the rules' cuDNN
    s = Shapes(B=4, Hq=16, Hkv=16, Q=8192, KV=8192, D=128, Dv=128)
    assert choices.cost_choice(ac.patterns.causal(), s, torch.bfloat16, cuda, {}, "sdpa-cudnn",
                               cost.load_profile("generic"), cpu, cudnn=True) is None


def test_a_calls_host_time_floors_the_ranking_of_backends(tmp_path):
    """A small plain call is bound by its host time (H100, 2026-12-07, B2 H4 N1024 D128 causal:
    cuDNN 0.037 ms a call, attncc's Triton kernels 0.2, though their kernel is predicted faster):
    with the profiles' call_us cuDNN ranks first there; without them Triton would. The main shape
    is unmoved, the Triton tiles keep their order (the kernel's time breaks the tie), and explain
    says where a host time binds."""
    from attncc.runtime import choices

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    small = Shapes(B=2, Hq=4, Hkv=4, Q=1024, KV=1024, D=128, Dv=128)
    main = Shapes(B=4, Hq=16, Hkv=16, Q=8192, KV=8192, D=128, Dv=128)
    for key in ("h100", "h200"):
        profile = cost.load_profile(key)
        assert profile.call_us["triton"] > profile.call_us["sdpa-cudnn"] > 0
        unfloored = dataclasses.replace(profile, call_us={})
        for pattern in (ac.Pattern(name="full"), ac.patterns.causal()):
            def ranked(prof, s):
                return choices.ranked_candidates(pattern, s, torch.bfloat16, cuda, {}, "sdpa-cudnn", prof, cpu,
                                                 cudnn=True)
            floored, free = ranked(profile, small), ranked(unfloored, small)
            assert floored[0][0] == "sdpa-cudnn" and free[0][0] == "triton", (key, pattern.name)
            assert [c for c in floored if c[0] == "triton"] == [c for c in free if c[0] == "triton"]
            assert ranked(profile, main)[0] == ranked(unfloored, main)[0]
    q = torch.empty(2, 4, 1024, 128, dtype=torch.bfloat16, device="meta")
    text = ac.explain(ac.patterns.causal(), q, q, q, target="h100")
    triton = [line for line in text.splitlines() if line.lstrip().startswith("triton ")]
    assert len(triton) == 5 and all(line.endswith("a call no faster than its host time, 0.117 ms") for line in triton)
    with pytest.raises(ValueError, match="call_us"):
        bad = json.loads((cost.PROFILES / "h100.json").read_text())
        bad["call_us"] = {"triton": -1}
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        cost.read_profile(path)


def test_fa4_enters_the_ranking_of_a_token_layout_with_its_copies_priced():
    """fa4 reads a token layout's rows from permuted copies of q, k, v and the output (read and
    written once each at the profile's bandwidth: 0.224 ms at B4 H16 N8192 D128 bf16 on the H200);
    with them it ranks last on natten2d (measured 2.65 ms with its copies against Triton's 0.91),
    and the model picks Triton's 64x32 as before."""
    from attncc.runtime import choices, fa4

    s = Shapes(B=4, Hq=16, Hkv=16, Q=8192, KV=8192, D=128, Dv=128)
    profile = cost.load_profile("h200")
    copies = choices.layout_copies_ms(s, profile)
    assert copies == pytest.approx(2 * 4 * 16 * 8192 * 512 * 2 / 4.8e12 * 1e3)
    natten = ac.patterns.natten2d(64, 128, 17)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    kp = natten.kernel_pattern
    asked = []
    runs = lambda: asked.append(1) or True  # noqa: E731
    ranked = choices.ranked_candidates(kp, s, torch.bfloat16, cuda, {}, "triton", profile, cpu, layout=natten.layout,
                                       fa4_runs=runs)
    assert ranked[0] == ("triton", TileConfig(64, 32, 4, 2)) and ranked[-1] == ("fa4", fa4.TILE)
    assert not asked  # ranked last, fa4 is not asked whether it runs (importing FA4 costs a first call a second)
    assert ("fa4", fa4.TILE) not in choices.ranked_candidates(kp, s, torch.bfloat16, cuda, {}, "triton", profile, cpu)
    assert ("fa4", fa4.TILE) not in choices.ranked_candidates(kp, s, torch.bfloat16, cuda, {"backend": "triton"},
                                                              "triton", profile, cpu, layout=natten.layout,
                                                              fa4_runs=runs)
    fast = profile.with_spec("fa4", 128, {**profile.spec("fa4", 128), "tflops": {"128x128": 20000}})  # a fa4 20x as fast
    free, dear = dataclasses.replace(fast, hbm_tbps=1e6), dataclasses.replace(fast, hbm_tbps=0.01)
    for bandwidth, rank in ((free, 0), (dear, -1)):  # the copies (~0 ms, then ~100 ms) are part of its price
        ranked = choices.ranked_candidates(kp, s, torch.bfloat16, cuda, {}, "triton", bandwidth, cpu,
                                           layout=natten.layout, fa4_runs=lambda: True)
        assert ranked[rank] == ("fa4", fa4.TILE)
    refused = choices.ranked_candidates(kp, s, torch.bfloat16, cuda, {}, "triton", free, cpu, layout=natten.layout,
                                        fa4_runs=lambda: False)  # first, then asked: it cannot run
    assert ("fa4", fa4.TILE) not in refused and len(refused) == 5
    assert choices.choose_on_target(kp, s, torch.bfloat16, "h200", {}, natten.layout) == ("triton", TileConfig(64, 32, 4, 2))
    q = torch.empty(4, 16, 8192, 128, dtype=torch.bfloat16, device="meta")
    text = ac.explain(natten, q, q, q, target="h200")
    assert "+ 0.224 ms of permuted copies" in text and "fa4 could run this call on permuted copies" in text
    forced = ac.compile(natten, q, q, q, target="h200", kernel_options={"backend": "fa4"})
    assert forced.predicted_ms == pytest.approx(META_CACHE.predicted_ms(kp, s, fa4.TILE, cpu, "fa4", profile) + copies)


def test_the_h200_profile_picks_what_measured_fastest():
    """benchmarks/results/2026-12-01-nvidia-h200-costmodel.md: fa4 on every pattern it runs; among
    Triton's tiles 128x64 on long rows (full, softcap), 64x64 on short ones (swa1024, document)."""
    from attncc.runtime import choices

    s = Shapes(B=4, Hq=16, Hkv=16, Q=8192, KV=8192, D=128, Dv=128)
    cases = {"full": (ac.Pattern(name="full"), (128, 64)), "softcap": (ac.patterns.softcap(30.0), (128, 64)),
             "swa1024": (ac.patterns.sliding_window(1024), (64, 64)),
             "document": (ac.patterns.document(lengths=[1000, 3000, 192, 4000]), (64, 64))}
    for name, (pattern, tiles) in cases.items():
        assert choices.choose_on_target(pattern, s, torch.bfloat16, "h200", {})[0] == "fa4", name
        backend, got = choices.choose_on_target(pattern, s, torch.bfloat16, "h200", {"backend": "triton"})
        assert (backend, got.BLOCK_M, got.BLOCK_N) == ("triton", *tiles), name
    profile = cost.load_profile("h200")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    swa = ac.patterns.sliding_window(1024)
    assert choices.cost_choice(swa, s, torch.bfloat16, cpu, {}, "fa4", profile) is None  # the interpreter's table
    assert choices.cost_choice(swa, s, torch.float32, cuda, {}, "fa4", profile, cpu) is None  # not measured
    assert choices.cost_choice(swa, s, torch.bfloat16, cuda, {"BLOCK_M": 128}, "fa4", profile, cpu) is None
    # tile fields kernel_options set are kept, the simulator picks the rest (natten2d: 64x32 tiles at 3 stages)
    natten = ac.patterns.natten2d(64, 128, 17)
    kp = natten.kernel_pattern
    assert choices.cost_choice(kp, s, torch.bfloat16, cuda, {"num_stages": 3}, "triton", profile, cpu,
                               layout=natten.layout) == ("triton", TileConfig(64, 32, 4, 3))
    assert choices.check_options({"num_warps": 4})["backend"] == "triton"  # Triton's tiles: never dropped for fa4
    with pytest.raises(ValueError, match="the fa4 backend runs FlashAttention-4's own"):
        choices.check_options({"BLOCK_N": 64, "backend": "fa4"})


def test_fit_recovers_the_partial_factor_prologue_and_occupancy():
    truth = cost.load_profile("h200")
    spec = {**truth.backends["triton"], "partial_factor": 2.0, "program_us": 3.0,
            "programs_per_sm": {"128x64": 1, "64x64": 1, "default": 1}}
    truth = dataclasses.replace(truth, backends={"triton": spec})
    start = dataclasses.replace(truth, backends={"triton": {**spec, "partial_factor": 1.0, "program_us": 0.0,
                                                            "programs_per_sm": {"128x64": 1, "64x64": 2}}})
    s = Shapes(B=2, Hq=4, Hkv=4, Q=2048, KV=2048, D=128, Dv=128)
    timings = []
    for pattern in (ac.patterns.causal(), ac.patterns.sliding_window(200), ac.patterns.chunked(300)):
        for tiles in (T, TileConfig(64, 64, 4, 3)):
            _, meta = META_CACHE.get(pattern, s, tiles, torch.device("cpu"))
            ms = cost.simulate(meta, s.B, s.Hq, s.D, tiles, "triton", truth).ms
            timings.append(cost.Timing(meta, s.B, s.Hq, s.D, tiles, "triton", ms))
    fitted, err = cost.fit(start, "triton", timings)
    assert (fitted["partial_factor"], fitted["program_us"], fitted["programs_per_sm"]["64x64"]) == (2.0, 3.0, 1)
    assert err < 1e-9
    with pytest.raises(ValueError, match="no timings"):
        cost.fit(start, "fa4", timings)


def test_fit_recovers_a_partial_factor_per_tile_shape():
    truth = cost.load_profile("h200")
    spec = {**truth.backends["triton"], "partial_factor": {"128x64": 2.5, "64x64": 1.3, "default": 1.3},
            "program_us": 2.0, "mask_op": 0.0, "programs_per_sm": {"default": 1}}
    truth = dataclasses.replace(truth, backends={"triton": spec})
    start = dataclasses.replace(truth, backends={"triton": {**spec, "partial_factor": 1.0, "program_us": 0.0}})
    s = Shapes(B=2, Hq=4, Hkv=4, Q=2048, KV=2048, D=128, Dv=128)
    timings = []
    for pattern in (ac.patterns.causal(), ac.patterns.sliding_window(200), ac.patterns.chunked(300)):
        for tiles in (T, TileConfig(64, 64, 4, 3)):
            _, meta = META_CACHE.get(pattern, s, tiles, torch.device("cpu"))
            timings.append(cost.Timing(meta, s.B, s.Hq, s.D, tiles, "triton",
                                       cost.simulate(meta, s.B, s.Hq, s.D, tiles, "triton", truth).ms))
    fitted, err = cost.fit(start, "triton", timings)
    assert fitted["program_us"] == 2.0 and err < 1e-9, (fitted, err)
    assert cost.partial_factor(fitted, T) == 2.5 and cost.partial_factor(fitted, TileConfig(64, 64, 4, 3)) == 1.3
    assert cost.partial_factor({"partial_factor": 1.7}, T) == 1.7  # one number serves every shape


def test_fit_recovers_the_costs_of_mask_and_score_operators():
    truth = cost.load_profile("h200")
    spec = {**truth.backends["fa4"], "partial_factor": 1.6, "program_us": 1.0, "mask_op": 0.03, "score_op": 0.05}
    truth = dataclasses.replace(truth, backends={"fa4": spec})
    start = dataclasses.replace(truth, backends={"fa4": {**spec, "mask_op": 0.0, "score_op": 0.0}})
    s = Shapes(B=2, Hq=4, Hkv=4, Q=2048, KV=2048, D=128, Dv=128)
    patterns = (ac.patterns.causal(), ac.patterns.sliding_window(200), ac.patterns.softcap(20.0),
                ac.patterns.neighborhood((32, 64), (7, 9)), ac.patterns.chunked(300))
    timings = []
    for pattern in patterns:
        _, meta = META_CACHE.get(pattern.kernel_pattern, s, T128, torch.device("cpu"))
        ms = cost.simulate(meta, s.B, s.Hq, s.D, T128, "fa4", truth).ms
        timings.append(cost.Timing(meta, s.B, s.Hq, s.D, T128, "fa4", ms))
    fitted, err = cost.fit(start, "fa4", timings)
    assert (fitted["partial_factor"], fitted["program_us"], fitted["mask_op"], fitted["score_op"]) == (1.6, 1.0, 0.03, 0.05)
    assert err < 1e-9
    unconstrained, _ = cost.fit(dataclasses.replace(start, backends={"fa4": {**spec, "score_op": 0.123}}), "fa4",
                                [t for t, p in zip(timings, patterns) if not p.has_score_mod])
    assert unconstrained["score_op"] == 0.123  # no score mod among the timings: the spec's value stays


def test_expression_ops_count_distinct_weighted_operators_and_the_pairwise_ones():
    ops = cost.expression_ops(ac.Pattern(lambda b, h, q, kv: q // 6 == kv // 6))
    assert (ops.mask, ops.mask_pairwise, ops.score, ops.score_pairwise) == (9.0, 1.0, 0.0, 0.0)
    by_eight = cost.expression_ops(ac.Pattern(lambda b, h, q, kv: ((q - kv) // 8 == 1) & (q % 8 != 3)))
    assert by_eight.mask == 1 + 4 + 1 + 4 + 1 + 1  # FA4's hooks divide: q - kv, //, ==, %, !=, and
    assert by_eight.mask_pairwise == 1 + 1 + 1 + 1  # Triton's pairwise ones: q - kv, a shift, ==, and
    table = torch.arange(64.0).view(8, 8)
    gathered = cost.expression_ops(ac.Pattern(lambda b, h, q, kv: table[q % 8, kv % 8] > 3.0))
    assert gathered.mask_pairwise == 2 + 1  # a pairwise buffer read (2) and its comparison
    shared = ac.Pattern(lambda b, h, q, kv: (q - kv >= 0) & (q - kv < 64))  # q - kv once
    assert cost.expression_ops(shared).mask == 4.0
    softcap, alibi = cost.expression_ops(ac.patterns.softcap(30.0)), cost.expression_ops(ac.patterns.alibi(4))
    assert (softcap.score, softcap.score_pairwise) == (5.0, 5.0)  # truediv 2, tanh 2, mul
    # slope[h] is read once per Triton program and, a value of h alone, once per tile by FA4's hooks
    assert (alibi.score, alibi.score_pairwise) == (3.0, 3.0)
    strided = cost.expression_ops(ac.patterns.strided_heads(8, 64))  # h % 8 likewise
    assert strided.mask == cost.expression_ops(ac.Pattern(lambda b, h, q, kv: (q >= kv) & ((kv % 8 == 3) | (q - kv <= 64)))).mask
    _, meta = META_CACHE.get(ac.patterns.softcap(30.0), Shapes(1, 4, 4, 512, 512, 64, 64), T, torch.device("cpu"))
    assert meta.expression_ops == softcap
    def blocks(size):  # the same tiles at N = 4096, a dearer mask in the second
        return [predict(ac.Pattern(mask), backend="fa4", tiles=T128) for mask in (
            lambda b, h, q, kv: q // size == kv // size,
            lambda b, h, q, kv: (q % 4096) // size == (kv % 4096) // size)]
    cheap, dear = blocks(100)
    assert dear > cheap
    cheap, dear = blocks(128)  # no PARTIAL tile evaluates a mask
    assert dear == cheap
    assert predict(ac.patterns.softcap(30.0)) > predict(ac.patterns.causal())


def test_autotune_times_the_candidates_and_takes_the_fastest(monkeypatch):
    from attncc.runtime import api, calibrate, choices
    from attncc.runtime.kernel import Kernel

    q, k, v = (torch.randn(1, 2, 96, 32) for _ in range(3))
    assert choices.check_options({"autotune": True}) == {"autotune": True}
    s = api.check_qkv(q, k, v)
    pattern = ac.patterns.sliding_window(40)
    candidates = [("triton", TileConfig(32, 32, 4, 1)), ("triton", TileConfig(16, 32, 4, 1)),
                  ("triton", TileConfig(32, 16, 4, 1))]
    fake = {32 * 32: 3.0, 16 * 32: 1.0}  # ms by tile area: 16x32 and 32x16 tie, the first of them wins
    seen = []

    def time_ms(fn, device):
        fn()  # the candidate's run, recorded below
        return fake[seen[-1].BLOCK_M * seen[-1].BLOCK_N]
    monkeypatch.setattr(calibrate, "time_ms", time_ms)
    monkeypatch.setattr(Kernel, "run", lambda self, *args: seen.append(self.tiles))
    assert api._fastest(pattern, s, q, k, v, 0.2, candidates, None, None) == candidates[1]
    assert seen == [c[1] for c in candidates]
    with pytest.raises(ValueError, match="autotune"):
        choices.check_options({"autotune": "yes"})
    monkeypatch.undo()
    # on CPU the simulator does not choose, so autotune changes nothing
    assert ac.compile(pattern, q, k, v, kernel_options={"autotune": True}).config == ac.compile(pattern, q, k, v).config


def test_backward_model_scales_with_the_work_and_shows_in_explain():
    from attncc.compiler.codegen import BackwardTiles

    tiles = BackwardTiles(TileConfig(64, 128, 8, 3), TileConfig(128, 64, 8, 3))
    cpu = torch.device("cpu")

    def predicted(pattern, Hkv=8):
        s = Shapes(4, 8, Hkv, 4096, 4096, 128, 128)
        return cost.simulate_backward(META_CACHE.backward(pattern, s, tiles.dkdv, cpu),
                                      META_CACHE.get(pattern, s, tiles.dq, cpu)[1], 4, 8, Hkv, 128, tiles, H200)
    full, causal = predicted(ac.Pattern(name="full")), predicted(ac.patterns.causal())
    assert 0.45 < causal / full < 0.65  # half the tiles, the diagonal ones PARTIAL
    assert predicted(ac.patterns.causal(), Hkv=2) >= causal  # GQA: as much work on fewer dK/dV programs
    q = torch.empty(4, 16, 8192, 128, dtype=torch.bfloat16, device="meta")
    dilated = ac.explain(ac.patterns.dilated(1024, 4), q, q, q, target="h200",  # runs attncc's Triton backward
                         kernel_options={"fold": False})
    assert "backward: attncc's Triton dK/dV" in dilated and "not what runs" not in dilated
    q64 = torch.empty(4, 16, 8192, 64, dtype=torch.bfloat16, device="meta")  # FA4's backward at D=64: not modelled
    assert "backward: FA4's own kernels, 1 call(s), deterministic: no model at head dim 64 in the 'h100' profile" in \
        ac.explain(ac.patterns.causal(), q64, q64, q64, target="h100")
    assert "backward: FA4's own kernels, 1 call(s), deterministic: predicted" in \
        ac.explain(ac.patterns.causal(), q, q, q, target="h100")


def test_the_backward_tiles_are_the_models_pick():
    """Small tiles where PARTIAL tiles dominate (natten2d, measured 1.65x faster on the H200, 1.62x
    on the H100), the table's large ones on causal (0.90x with small); only where the profile models
    both pairs; not on CPU, float32, other head dims, or when kernel_options set backward tiles;
    explain says so."""
    from attncc.runtime import choices

    large, small = choices.BACKWARD_CANDIDATES[128]
    cpu = torch.device("cpu")
    s = Shapes(4, 16, 16, 8192, 8192, 128, 128)
    natten = ac.patterns.natten2d(64, 128, 17).kernel_pattern
    assert choices.model_backward_tiles(natten, s, cpu, H200, large) == small
    assert choices.model_backward_tiles(ac.patterns.causal(), s, cpu, H200, large) == large
    assert choices.model_backward_tiles(natten, s, cpu, cost.load_profile("h100"), large) == small
    generic = cost.load_profile("generic")  # no rates for the small pair: the table's
    assert choices.model_backward_tiles(natten, s, cpu, generic, large) == large
    cuda = torch.device("cuda")
    assert choices.backward_modelled(s, torch.bfloat16, cuda, {})
    assert not choices.backward_modelled(s, torch.bfloat16, cpu, {})
    assert not choices.backward_modelled(s, torch.float32, cuda, {})
    d64 = Shapes(4, 16, 16, 8192, 8192, 64, 64)  # modelled where a profile has the class's rates
    assert choices.backward_modelled(d64, torch.bfloat16, cuda, {})
    table64 = choices.choose_backward_tiles(d64, torch.bfloat16, cuda, {})
    assert choices.modelled_backward_candidates(H200, table64, 64) == list(choices.BACKWARD_CANDIDATES[64])
    assert choices.modelled_backward_candidates(H200.at_head_dim(128), table64, 64) == []  # no D=64 figures
    assert not choices.backward_modelled(Shapes(4, 16, 16, 8192, 8192, 320, 320), torch.bfloat16, cuda, {})
    assert not choices.backward_modelled(Shapes(4, 16, 16, 8192, 8192, 64, 128), torch.bfloat16, cuda, {})
    assert not choices.backward_modelled(s, torch.bfloat16, cuda, {"dq_tiles": (64, 64, 4, 2)})
    q = torch.empty(4, 16, 8192, 128, dtype=torch.bfloat16, device="meta")
    text = ac.explain(ac.patterns.natten2d(64, 128, 17), q, q, q, target="h200")
    assert "backward: attncc's Triton dK/dV 32x64" in text and "runner-up: Triton dK/dV 64x128" in text


def test_fa4_backward_model_walks_each_bands_q_tiles():
    """One program per 128-column kv tile and query head, walking the 64-row q tiles its band
    reaches; programs list-scheduled one per SM; the deterministic factor; a second call covering
    the same rows adds the pass that sums them."""
    from attncc.compiler.bands import Band

    assert cost.fa4_tiles_per_program(Band(0, 512, 0, 512, None, 0)) == [8, 6, 4, 2]  # causal
    assert cost.fa4_tiles_per_program(Band(0, 8192, 0, 4, None, 0)) == [128]  # sinks' sink columns
    assert cost.fa4_tiles_per_program(Band(100, 356, 0, 256, -64, 0)) == [2, 4]  # rows 100..191; 128..319
    assert cost.fa4_tiles_per_program(Band(0, 256, 300, 556, None, None)) == [4, 4]  # dense, any offset
    spec = H200.backends["fa4"]["backward"]
    tile_ms = 2 * 5 * 64 * 128 * 128 / (spec["tflops"] / H200.sms * 1e12) * 1e3
    sink = Band(0, 8192, 0, 4, None, 0)
    memory = (8192 * 16 * 14 + 4 * 16 * 8) * 4 * 128 / (H200.hbm_tbps * 1e12) * 1e3
    chain = cost.simulate_fa4_backward([(sink,)], 4, 16, 16, 128, H200, deterministic=False)
    assert chain == pytest.approx(128 * tile_ms + memory)  # 64 programs < 132 SMs: one program's walk
    assert cost.simulate_fa4_backward([(sink,)], 4, 16, 16, 128, H200) == pytest.approx(
        chain * spec["deterministic_factor"])
    dense = Band(0, 8192, 0, 8192, None, None)
    many = cost.simulate_fa4_backward([(dense,)], 4, 16, 16, 128, H200, deterministic=False)
    assert 64 * 128 * 64 * tile_ms / H200.sms < many < 1.02 * 64 * 128 * 64 * tile_ms / H200.sms + 1
    window = Band(4, 8192, 4, 8192, -1024, 0)
    apart = sum(cost.simulate_fa4_backward([(b,)], 4, 16, 16, 128, H200, False) for b in (sink, window))
    both = cost.simulate_fa4_backward([(sink,), (window,)], 4, 16, 16, 128, H200, False)
    assert both == pytest.approx(apart + 3 * 8188 * 16 * 4 * 128 * 2 / (H200.hbm_tbps * 1e12) * 1e3)  # dq rows 4..


def test_explain_predicts_fa4s_own_backward_where_it_runs():
    q = torch.empty(4, 16, 8192, 128, dtype=torch.bfloat16, device="meta")
    sinks = ac.explain(ac.patterns.sinks(4, 1024), q, q, q, target="h200")
    assert ("backward: FA4's own kernels, 1 call(s) and 1 sliver band(s) on attncc's kernel, deterministic: "
            "predicted") in sinks
    assert "(not what runs)" in sinks
    docs = ac.explain(ac.patterns.document(lengths=[3000, 5192]), q, q, q, target="h200",
                      kernel_options={"deterministic": False})
    assert "backward: FA4's own kernels, 1 call(s), nondeterministic: predicted" in docs
    hooks = ac.explain(ac.patterns.dilated(1024, 4), q, q, q, target="h200", kernel_options={
        "backend": "fa4", "deterministic": False, "fold": False})
    assert "backward: FA4's block-sparse backward, nondeterministic (not modelled)" in hooks


def test_profiles_hold_figures_per_head_dim_class(tmp_path, monkeypatch):
    """A profile's base figures hold for its head dim class (128); `head_dims` add others; a backend
    without an entry for a class is not modelled there (the runtime's table decides)."""
    assert [cost.head_dim_class(d) for d in (16, 64, 65, 128, 129, 256, 257)] == [64, 64, 128, 128, 256, 256, None]
    t256 = TileConfig(128, 64, 8, 2)
    assert H200.models("triton", 64) and H200.models("triton", 256) and H200.models("fa4", 64)
    assert not H200.models("fa4", 256) and not H200.models("triton", 320)
    assert H200.rate("triton", t256, 256) != H200.rate("triton", t256)  # D=256's own rate, not D=128's
    assert H200.spec("triton", 100) is H200.backends["triton"]
    at64 = H200.at_head_dim(40)
    assert at64.head_dim == 64 and at64.spec("triton") == H200.spec("triton", 64) and "head_dims" not in at64.spec(
        "triton")
    spec = {"tflops": {"64x64": 100.0, "default": 100.0}, "partial_factor": 1.5, "program_us": 1.0}
    mine = H200.with_spec("triton", 256, spec)
    assert mine.spec("triton", 256)["tflops"] == spec["tflops"] and mine.spec("triton", 64) == H200.spec("triton", 64)
    assert mine.spec("triton", 128)["tflops"] == H200.spec("triton", 128)["tflops"]
    rebased = H200.with_spec("triton", 128, spec)  # the base class: its other classes stay
    assert rebased.spec("triton", 128)["tflops"] == spec["tflops"] and rebased.models("triton", 256)
    monkeypatch.setattr(cost, "PROFILES", tmp_path)
    data = json.loads((cost.Path(ac.__file__).parent / "compiler/profiles/h200.json").read_text())
    data["backends"]["triton"]["head_dims"]["96"] = data["backends"]["triton"]["head_dims"]["64"]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="head_dims keys must be among"):
        cost.load_profile("bad")
    only = {**data, "backends": {"fa4": {"head_dims": {"64": {"tflops": {"default": 500.0}}}}}}
    (tmp_path / "only.json").write_text(json.dumps(only))
    prof = cost.load_profile("only")  # figures at one class only: not modelled at the base one
    assert prof.models("fa4", 64) and not prof.models("fa4", 128)


def test_the_model_chooses_at_head_dims_64_and_256_what_measured_fastest():
    """benchmarks/results/2026-12-06-nvidia-h100-head-dims.md: at D=256 the table's 64x64/4/2 was
    1.23-1.35x slower than 128x64/8/2 on every dense and band mask, and 64x32/4/2 the best on
    global_tokens; at D=64 64x32/4/2 the best on natten2d (0.322 ms against the table's 0.446) and
    natten3d, fa4 on sinks."""
    from attncc.runtime import choices

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    d256 = Shapes(2, 16, 16, 8192, 8192, 256, 256)
    for pattern in (ac.patterns.causal(), ac.patterns.sliding_window(1024), ac.patterns.prefix_lm(2048)):
        assert choices.cost_choice(pattern, d256, torch.bfloat16, cuda, {}, "triton", H200, cpu) == (
            "triton", TileConfig(128, 64, 8, 2))
    from benchmarks.patterns import build

    assert choices.cost_choice(build("global_tokens", 8192, 16).attncc.kernel_pattern, d256, torch.bfloat16, cuda, {},
                               "triton", H200, cpu) == ("triton", TileConfig(64, 32, 4, 2))
    d64 = Shapes(4, 16, 16, 8192, 8192, 64, 64)
    natten = build("natten2d", 8192, 16).attncc.kernel_pattern
    assert choices.cost_choice(natten, d64, torch.bfloat16, cuda, {}, "triton", H200, cpu) == (
        "triton", TileConfig(64, 32, 4, 2))
    assert choices.cost_choice(ac.patterns.sinks(4, 1024), d64, torch.bfloat16, cuda, {}, "fa4", H200, cpu)[0] == "fa4"
    # where the profile lacks a class, or D and Dv differ in class, the table decides
    only128 = H200.at_head_dim(128)  # the D=128 figures alone
    assert not only128.models("triton", 64)
    assert choices.cost_choice(natten, d64, torch.bfloat16, cuda, {}, "triton", only128, cpu) is None
    mixed = Shapes(4, 16, 16, 8192, 8192, 64, 128)
    assert choices.cost_choice(natten, mixed, torch.bfloat16, cuda, {}, "triton", H200, cpu) is None
    assert choices.triton_candidates(320) == ()


def test_explain_at_other_head_dims_lists_that_class_or_says_it_is_not_modelled():
    q, k, v = (torch.empty(1, 4, 2048, 256, device="meta") for _ in range(3))
    text = ac.explain(ac.patterns.sliding_window(256), q, k, v, target="h200")
    assert "triton  128x64, num_warps=8, num_stages=2" in text and "64x128, num_warps=8, num_stages=1" in text
    q, k, v = (torch.randn(1, 2, 200, 32) for _ in range(3))
    generic = ac.explain(ac.patterns.sliding_window(40), q, k, v)  # CPU: the generic profile's estimates
    assert "<- runs" in generic
    q, k, v = (torch.empty(1, 4, 2048, 320, device="meta") for _ in range(3))
    text = ac.explain(ac.patterns.sliding_window(256), q, k, v, target="h200")
    assert "not modelled at head dim 320 on this profile: triton" in text and "<- runs" not in text


def test_explain_names_one_kernel_for_a_decode_shaped_call():
    """A dense call of one query over 4096 keys runs the decode kernel: explain said it ran cuDNN too."""
    q, k = (torch.empty(1, 8, n, 128, device="meta", dtype=torch.bfloat16) for n in (1, 4096))
    runs = [line for line in ac.explain(None, q, k, k, target="h200").splitlines() if line.startswith("runs:")]
    assert len(runs) == 1 and "split-KV decode kernel" in runs[0]


def test_compile_for_a_target_refuses_a_call_the_decode_kernel_would_run():
    """It described the sdpa-cudnn kernel with a predicted time, where ac.attention runs the decode kernel."""
    q, k = (torch.empty(1, 8, n, 128, device="meta", dtype=torch.bfloat16) for n in (1, 4096))
    with pytest.raises(ValueError, match="runs attncc's split-KV decode kernel"):
        ac.compile(None, q, k, k, target="h200")
    q = torch.empty(1, 8, 128, 128, device="meta", dtype=torch.bfloat16)  # 128 queries: the forward kernels
    assert ac.compile(None, q, k, k, target="h200").predicted_ms > 0


def test_explain_says_when_the_model_does_not_price_the_call():
    """Kernel.predicted_ms is None for float32 or D and Dv of other head-dim classes: explain said nothing."""
    q, v = (torch.empty(1, 8, 1024, d, device="meta", dtype=torch.bfloat16) for d in (64, 128))
    q32 = torch.empty(1, 8, 1024, 64, device="meta", dtype=torch.float32)
    for args in ((q, q, v), (q32, q32, q32)):
        assert ac.compile(ac.patterns.causal(), *args, target="h200").predicted_ms is None
        assert "\nnot modelled: the profiles price fp16 / bf16 calls" in ac.explain(ac.patterns.causal(), *args,
                                                                                     target="h200")
    assert "not modelled:" not in ac.explain(ac.patterns.causal(), q, q, q, target="h200")
