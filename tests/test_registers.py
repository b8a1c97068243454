"""benchmarks/registers.py: the generated kernels compiled for sm_90a on a CPU-only machine, with
ptxas's register, spill and shared-memory figures (nothing runs). In a subprocess: the probe
needs a Triton imported without TRITON_INTERPRET, which the tests set."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def probe(*args: str) -> dict[str, list[int]]:
    """{kernel: [registers, spill stores, spill loads, shared]} as the probe prints them."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "registers.py"), *args], env=env,
                         capture_output=True, text=True, check=True, timeout=600).stdout
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[2].isdigit():
            stores, loads = cells[3].split(" / ")
            rows[cells[1]] = [int(cells[2]), int(stores), int(loads), int(cells[4])]
    return rows


def test_the_decode_kernels_compile_for_hopper_and_report_their_registers():
    one = probe("--kind", "decode", "--patterns", "causal", "--splits", "1")
    split = probe("--kind", "decode", "--patterns", "causal", "--splits", "4")
    # one split: the fast kernel, then the exact path's worklist kernel; several: the exact path
    # inlined (more registers) and the combine
    assert set(one) == {"attention_decode", "attention_decode_exact"}
    assert set(split) == {"attention_decode", "decode_combine"}
    assert 0 < one["attention_decode"][0] < split["attention_decode"][0] <= 255
    assert one["attention_decode"][3] == split["attention_decode"][3] > 0  # the same shared memory
