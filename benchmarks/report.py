"""The suite's report: a markdown summary with one table per pass, and the result files."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path


def cell(entry: dict | None) -> str:
    if not entry:
        return "—"
    if "tflops" in entry:
        x = entry["tflops"]
        return f"{x:.0f}" if x >= 10 else f"{x:.3g}"
    status = entry.get("status")
    if status == "FAILED":
        return f"FAILED (rel {entry['rel_err']:.2g})"
    return {"none": "—", "n/a": "n/a"}.get(status, "error")


def ratio(a: dict | None, b: dict | None) -> str:
    if a and b and "tflops" in a and "tflops" in b:
        return f"{a['tflops'] / b['tflops']:.2f}×"
    return "—"


def config_text(cfg: dict | None) -> str:
    if not cfg:
        return "—"
    rest = ", ".join(f"{k}={v}" for k, v in cfg.items() if k not in ("backend", "path", "error"))
    backend = cfg.get("backend", cfg.get("path", "?"))  # results before 2026-12-01 (2nd) call it "path"
    return f"{backend}" + (f" ({rest})" if rest else "") + (" (compile error)" if "error" in cfg else "")


def md_row(cells: list[str]) -> str:
    return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"


def table(rows: list[dict], key: str) -> list[str]:
    """The pass `key` of every row; the FLASH columns only where some row ran FLASH."""
    flash = any("flash" in r.get(key, {}) for r in rows)
    impls = {"attncc": "attncc TFLOP/s", "flex": "flex TFLOP/s", "cudnn": "cuDNN", "fa2": "FA2",
             **({"flash": "FLASH"} if flash else {})}
    vs = {"flex": "attncc/flex", **({"flash": "attncc/FLASH"} if flash else {}), "cudnn": "attncc/cuDNN"}
    head = ["pattern", "shape", *impls.values(), *vs.values(), "attncc path/config"]
    lines = [md_row(head), "|" + "---|" * len(head)]
    for r in rows:
        e = r.get(key, {})
        if "error" in r and not e:
            cells = ["error"] + [""] * (len(head) - 3)
        else:
            cells = ([cell(e.get(n)) for n in impls] + [ratio(e.get("attncc"), e.get(n)) for n in vs]
                     + [config_text(r.get("attncc_config"))])
        lines.append(md_row([r["pattern"], r["label"], *cells]))
    return lines


def first_call_text(fc: dict) -> str:
    def one(e: dict) -> str:
        if "first_s" in e:
            return f"{e['first_s']:.3f} s (again: {1e3 * e['second_s']:.2f} ms)"
        return e.get("error") or e.get("why") or "?"
    err = f"; rel err {fc['rel_err']:.2g}" if "rel_err" in fc else ""
    flash = f"; FLASH (on `{fc['flash_pattern']}`) {one(fc['flash'])}" if "flash" in fc else ""
    return (f"first call of a new pattern `{fc['pattern']}` ({fc['shape']}): attncc {one(fc['attncc'])}, "
            f"FlexAttention {one(fc['flex'])}{err}{flash}")


def problem_lines(rows: list[dict]) -> list[str]:
    """One line per distinct (what, message), naming the rows it happened in."""
    seen: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        where = f"{r['shape']}/{r['pattern']}"
        if "error" in r:
            seen.setdefault(("row", r["error"]), []).append(where)
        for key in ("fwd", "fwd_bwd"):
            for name, e in r[key].items():
                if e.get("status") in ("error", "n/a"):
                    seen.setdefault((f"{name} {key}", e.get("error") or e.get("why")), []).append(where)
    return [f"- {what}: {msg} ({'all rows' if len(at) == len(rows) > 1 else ', '.join(at)})"
            for (what, msg), at in seen.items()]


def markdown(result: dict) -> str:
    s = result["settings"]
    timing = (f"do_bench median, warmup {s['warmup']} ms, rep {s['rep']} ms" if result["device"] != "cpu"
              else f"CPU timer, median of {s['cpu_reps']} runs; SDPA columns run the MATH backend on CPU")
    out = [f"# attncc benchmark suite: {result['date']}, {result['gpu']}{' (smoke)' if s['smoke'] else ''}", "",
           f"- torch {result['torch']}, triton {result['triton']}, attncc {result['attncc']} (git {result['git']})",
           f"- command: `{result['command']}`",
           f"- {timing}; bf16 random normal inputs; effective TFLOP/s = 4·D·live pairs / time "
           f"(forward+backward ×{s['bwd_factor']}); attncc guarded against FlexAttention (rel err < {s['tol']}, "
           f"gradients < {s['grad_tol']})"]
    if "flash" in s:
        out.append(f"- FLASH (FlexAttention with BACKEND=FLASH, FlashAttention-4's CuTe kernels, guarded like attncc): "
                   f"{s['flash']}")
    if result.get("first_call"):
        out.append(f"- {first_call_text(result['first_call'])}")
    problems = problem_lines(result["rows"])
    if problems:
        out += ["", "## Errors and unsupported cases", ""] + problems
    out += ["", "## Forward (effective TFLOP/s)", ""] + table(result["rows"], "fwd")
    if s["backward"]:
        out += ["", "## Forward+backward (effective TFLOP/s)", ""] + table(result["rows"], "fwd_bwd")
    return "\n".join(out) + "\n"


def output_paths(out_dir: Path, gpu: str, date: str, suffix: str) -> list[Path]:
    """out_dir/<date>-<gpu><suffix> (numbered when taken), and the same name under $OUT if set."""
    stem = f"{date}-{re.sub(r'[^a-z0-9]+', '-', gpu.lower()).strip('-')}{suffix}"
    name, i = stem, 1
    while (out_dir / f"{name}.json").exists():
        i += 1
        name = f"{stem}-{i}"
    dirs = [out_dir] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    return [d / name for d in dirs]


def write(result: dict, bases: list[Path]) -> str:
    """Write result as <base>.json and <base>.md for every base; returns the markdown."""
    text = markdown(result)
    for base in bases:
        base.parent.mkdir(parents=True, exist_ok=True)
        base.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        base.with_suffix(".md").write_text(text)
    return text


def write_table(out_dir: str | None, stem: str, rows, lines: list[str]) -> None:
    """A small benchmark's rows as <out_dir>/<stem>.json and its table as <stem>.md (no out_dir: nothing)."""
    if not out_dir:
        return
    import json
    import os

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
