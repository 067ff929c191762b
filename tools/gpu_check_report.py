#!/usr/bin/env python3
"""The two bookkeeping steps of tools/gpu_check.sh: what machine this is, and what the check found.

    python tools/gpu_check_report.py env OUT       -> OUT/env.json (versions, device, missing modules, commit)
    python tools/gpu_check_report.py summary OUT   -> OUT/gpu_check.json, gpu_check.md, stages.csv; prints the stage
                                                      table; exit 0 when every stage passed (or was skipped for
                                                      a stated reason other than the time budget), 1 otherwise

Stage records come from OUT/stages.jsonl (one JSON object a line, written by gpu_check.sh: name, status =
passed | failed | timeout | skipped, rc, seconds, limit_s, log, reason, note). Uses only the standard
library and (for env) torch, so it runs wherever the check runs.
"""

from __future__ import annotations

import csv
import datetime as _dt
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL_MODULES = ("numpy", "triton", "pytest", "hypothesis", "diffusers", "wordfreq", "pytest_benchmark")
STAGE_COLUMNS = ("name", "status", "rc", "seconds", "limit_s", "reason", "note", "log")


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment() -> dict:
    env: dict = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "commit": _run(["git", "-C", str(ROOT), "rev-parse", "HEAD"]) or os.environ.get("GPU_CHECK_COMMIT",
                                                                                       "unknown (no git here)"),
        "missing_modules": [m for m in OPTIONAL_MODULES if importlib.util.find_spec(m) is None],
        "nvcc": (_run(["nvcc", "--version"]).splitlines() or [""])[-1],
        "cmake": (_run(["cmake", "--version"]).splitlines() or [""])[0],
        "compute_sanitizer": shutil.which("compute-sanitizer") or "",
    }
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env["device"] = torch.cuda.get_device_name(0)
            env["capability"] = f"{p.major}.{p.minor}"
            env["memory_gib"] = round(p.total_memory / 2**30, 1)
            env["sm_count"] = p.multi_processor_count
    except Exception as exc:  # noqa: BLE001 - the record says what failed
        env["torch_error"] = f"{type(exc).__name__}: {exc}"
    if importlib.util.find_spec("triton") is not None:
        try:
            import triton

            env["triton"] = triton.__version__
        except Exception as exc:  # noqa: BLE001
            env["triton_error"] = f"{type(exc).__name__}: {exc}"
    try:
        sys.path.insert(0, str(ROOT))
        import dare_kernels
        from dare_kernels import _ext

        env["dare_kernels"] = dare_kernels.__version__
        env["extension_build"] = _ext.build_info()
    except Exception as exc:  # noqa: BLE001
        env["dare_kernels_error"] = f"{type(exc).__name__}: {exc}"
    return env


def read_stages(out: Path) -> list[dict]:
    path = out / "stages.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def stage_ok(stage: dict) -> bool:
    if stage["status"] == "passed":
        return True
    return stage["status"] == "skipped" and not str(stage.get("reason", "")).startswith("time budget")


def bench_counts(out: Path) -> dict:
    rows = _bench_rows(out)
    counts = {"rows": len(rows)}
    for status in ("ok", "skipped", "error"):
        counts[status] = sum(r.get("status") == status for r in rows)
    return counts


def _bench_rows(out: Path) -> list[dict]:
    path = out / "bench_rows.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def markdown(report: dict, rows: list[dict]) -> str:
    """gpu_check.md: the machine, the stage table and the measured rows with their ratio to SDPA flash (no bias)."""
    env = report["env"]
    lines = [f"# gpu_check ({report['mode']}): {'PASSED' if report['passed'] else 'FAILED'}", "",
             f"{env.get('device', 'cpu')}, torch {env.get('torch')}, triton {env.get('triton')}, "
             f"{env.get('date_utc')}, commit {env.get('commit')}", "",
             "| stage | status | s | limit s | reason / last line |", "|---|---|---:|---:|---|"]
    for s in report["stages"]:
        why = str(s.get("reason") or s.get("note") or "").replace("|", "/")[:120]
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', '')} | {s.get('limit_s', '')} | {why} |")
    flash = {(r["shape"], r["mode"]): r["ms"] for r in rows
             if r.get("provider") == "sdpa_flash" and r.get("status") == "ok"}
    lines += ["", "| kernel | shape | provider | mode | ms | x SDPA flash (no bias) | status / reason |",
              "|---|---|---|---|---:|---:|---|"]
    for r in rows:
        base = flash.get((r.get("shape"), str(r.get("mode", "")).replace("+map", "")))
        ms = r.get("ms")
        ratio = f"{ms / base:.2f}" if ms and base else ""
        cell = f"{ms:.3f}" if ms else ""
        why = r["status"] if r.get("status") == "ok" else f"{r.get('status')}: {str(r.get('reason', ''))[:90]}"
        lines.append(f"| {r.get('kernel')} | {r.get('shape')} | {r.get('provider')} | {r.get('mode')} | {cell} | "
                     f"{ratio} | {why.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def summary(out: Path, mode: str) -> int:
    stages = read_stages(out)
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").exists() else {}
    passed = bool(stages) and all(stage_ok(s) for s in stages)
    report = {"mode": mode, "passed": passed, "env": env, "stages": stages, "bench": bench_counts(out),
              "files": sorted(p.name for p in out.iterdir() if p.is_file())}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report, _bench_rows(out)))
    with (out / "stages.csv").open("w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=STAGE_COLUMNS, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(stages)
    print(f"\n== gpu_check ({mode}) on {env.get('device', 'cpu')}: {'PASSED' if passed else 'FAILED'}")
    for s in stages:
        why = s.get("reason") or s.get("note") or ""
        print(f"  {s['name']:<12} {s['status']:<8} {float(s.get('seconds', 0)):6.0f} s / {s.get('limit_s', '')!s:>4} s"
              f"  {why[:110]}")
    b = report["bench"]
    print(f"  bench rows: {b['rows']} ({b['ok']} measured, {b['skipped']} skipped, {b['error']} errors)")
    print(f"  results in {out}: gpu_check.json, gpu_check.md, stages.csv, bench.csv, gpu_check.log")
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] not in ("env", "summary"):
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    if argv[0] == "env":
        env = environment()
        (out / "env.json").write_text(json.dumps(env, indent=1, default=str))
        for k, v in env.items():
            print(f"  {k}: {v}")
        print(f"env: {env.get('device', 'no CUDA device')}, torch {env.get('torch')}, triton {env.get('triton')}, "
              f"missing {', '.join(env['missing_modules']) or 'nothing'}")
        return 0 if "dare_kernels_error" not in env and "torch_error" not in env else 1
    return summary(out, argv[2] if len(argv) > 2 else "device")


if __name__ == "__main__":
    sys.exit(main())
