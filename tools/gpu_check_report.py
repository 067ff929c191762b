#!/usr/bin/env python3
"""The bookkeeping steps of tools/gpu_check.sh: what machine and commit this is, and what the check found.

    python tools/gpu_check_report.py commit           prints the project commit: GPU_CHECK_COMMIT when set, else
                                                      git's HEAD when the repository root is git's top level
                                                      (not a folder inside another repository), else "unknown"
    python tools/gpu_check_report.py env WORK         -> WORK/env.json (versions, device, missing modules, commit,
                                                      where dare_kernels was imported from)
    python tools/gpu_check_report.py cache WORK       compares WORK/cache_after_warmup.json and
                                                      cache_after_stages.json (compiled kernels per name)
    python tools/gpu_check_report.py summary WORK OUT [MODE [PART]]
                                                   -> OUT/gpu_check.json, gpu_check.md, stages.csv, bench.csv,
                                                      bench.json; prints the stage table; exit 0 when every
                                                      stage passed (or was skipped for a stated reason other
                                                      than the time budget), 1 otherwise

Stage records come from WORK/stages.jsonl (one JSON object a line, written by gpu_check.sh: seq, name,
status = passed | failed | timeout | skipped, rc, seconds, limit_s, log, reason, note). Uses only the
standard library and (for env) torch, so it runs wherever the check runs.
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
STAGE_COLUMNS = ("seq", "name", "status", "rc", "seconds", "limit_s", "reason", "note", "log")


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def project_commit(root: Path = ROOT, environ=os.environ) -> tuple[str, str]:
    """(commit, where it came from): GPU_CHECK_COMMIT, else git when ``root`` is the top level of its git
    repository (a copy of the tree inside another repository would report that repository's commit), else
    ("unknown", why)."""
    given = environ.get("GPU_CHECK_COMMIT", "").strip()
    if given:
        return given, "GPU_CHECK_COMMIT"
    top = _run(["git", "-C", str(root), "rev-parse", "--show-toplevel"])
    if not top:
        return "unknown", "no GPU_CHECK_COMMIT and no git repository here"
    if Path(top).resolve() != Path(root).resolve():
        return "unknown", f"no GPU_CHECK_COMMIT; the git repository here is {top}, not the project root"
    sha = _run(["git", "-C", str(root), "rev-parse", "HEAD"])
    dirty = _run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"])
    return (sha or "unknown"), "git" + (" (with uncommitted changes)" if dirty else "")


def environment() -> dict:
    commit, commit_source = project_commit()
    env: dict = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "commit": commit,
        "commit_source": commit_source,
        "pythonpath": os.environ.get("PYTHONPATH", ""),
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
    try:  # imported as every stage imports it (PYTHONPATH from gpu_check.sh), not from a path added here
        import dare_kernels
        from dare_kernels import _ext

        env["dare_kernels"] = dare_kernels.__version__
        env["dare_kernels_path"] = str(Path(dare_kernels.__file__).resolve().parent)
        env["extension_build"] = _ext.build_info()
    except Exception as exc:  # noqa: BLE001
        env["dare_kernels_error"] = f"{type(exc).__name__}: {exc}"
    return env


def read_stages(work: Path) -> list[dict]:
    path = work / "stages.jsonl"
    if not path.exists():
        return []
    stages = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(stages, key=lambda st: st.get("seq", 0))  # stages run at once finish in any order


def stage_ok(stage: dict) -> bool:
    if stage["status"] == "passed":
        return True
    return stage["status"] == "skipped" and not str(stage.get("reason", "")).startswith("time budget")


def bench_rows(work: Path) -> list[dict]:
    path = work / "bench_rows.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def bench_counts(rows: list[dict]) -> dict:
    counts = {"rows": len(rows)}
    for status in ("ok", "skipped", "error"):
        counts[status] = sum(r.get("status") == status for r in rows)
    return counts


def cache_report(work: Path) -> dict:
    """Compiled Triton kernels per name after the warm-up and after the stages, and what the stages added
    (a kernel recompiled for another N, M or B, or a specialization the warm-up does not drive)."""
    def load(name):
        path = work / name
        return json.loads(path.read_text()) if path.exists() else None
    warm, after = load("cache_after_warmup.json"), load("cache_after_stages.json")
    rep: dict = {"after_warmup": warm, "after_stages": after}
    if warm is not None and after is not None:
        rep["added_by_stages"] = {k: n - warm.get(k, 0) for k, n in after.items() if n > warm.get(k, 0)}
    return rep


def _cell(x) -> str:
    return str(x if x is not None else "").replace("|", "/").replace("\n", " ")


def bench_markdown(rows: list[dict]) -> list[str]:
    """The measured rows with their ratio: the row's own ``ratio`` against its ``peer`` when the bench gives
    them, else against SDPA flash (no bias) at the same shape and mode."""
    if not rows:
        return ["No bench rows."]
    flash = {(r.get("shape"), r.get("mode")): r["ms"] for r in rows
             if r.get("provider") == "sdpa_flash" and r.get("status") == "ok"}
    lines = ["| kernel | shape | provider | mode | ms | ratio | against | status / reason |",
             "|---|---|---|---|---:|---:|---|---|"]
    for r in rows:
        ms = r.get("ms")
        ratio, peer = r.get("ratio"), r.get("peer")
        if ratio is None and ms:
            base = flash.get((r.get("shape"), str(r.get("mode", "")).replace("+map", "")))
            ratio, peer = (ms / base, "sdpa_flash") if base else (None, None)
        why = r["status"] if r.get("status") == "ok" else f"{r.get('status')}: {str(r.get('reason', ''))[:90]}"
        lines.append(f"| {_cell(r.get('kernel'))} | {_cell(r.get('shape'))} | {_cell(r.get('provider'))} | "
                     f"{_cell(r.get('mode'))} | {f'{ms:.3f}' if ms else ''} | "
                     f"{f'{float(ratio):.2f}' if ratio not in (None, '') else ''} | {_cell(peer)} | {_cell(why)} |")
    return lines


def markdown(report: dict, rows: list[dict]) -> str:
    """gpu_check.md: the machine, the bench rows with their ratios, the stage table, the compile cache."""
    env = report["env"]
    lines = [f"# gpu_check part {report['part']} ({report['mode']}): {'PASSED' if report['passed'] else 'FAILED'}",
             "", f"{env.get('device', 'cpu')}, torch {env.get('torch')}, triton {env.get('triton')}, "
             f"{env.get('date_utc')}, commit {env.get('commit')} ({env.get('commit_source', '')})", "",
             "## Bench", ""] + bench_markdown(rows)
    lines += ["", "## Stages", "", "| stage | status | s | limit s | reason / last line |", "|---|---|---:|---:|---|"]
    for st in report["stages"]:
        why = str(st.get("reason") or st.get("note") or "")[:120]
        lines.append(f"| {st['name']} | {st['status']} | {st.get('seconds', '')} | {st.get('limit_s', '')} | "
                     f"{_cell(why)} |")
    cache = report["cache"]
    if cache.get("after_stages") is not None:
        lines += ["", "## Triton cache (compiled kernels per name)", "",
                  "| kernel | after warm-up | after the stages |", "|---|---:|---:|"]
        warm = cache.get("after_warmup") or {}
        for name, n in cache["after_stages"].items():
            lines.append(f"| {name} | {warm.get(name, '')} | {n} |")
    return "\n".join(lines) + "\n"


def _write_bench(work: Path, out: Path, rows: list[dict]) -> None:
    """bench.csv / bench.json in OUT: the bench's own files when it finished, else built from its rows."""
    for name in ("bench.csv", "bench.json"):
        if (work / name).exists():
            shutil.copyfile(work / name, out / name)
    if rows and not (work / "bench.csv").exists():
        cols = list(dict.fromkeys(k for r in rows for k in r))
        with (out / "bench.csv").open("w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            wr.writeheader()
            wr.writerows(rows)
    if rows and not (work / "bench.json").exists():
        (out / "bench.json").write_text(json.dumps({"rows": rows, "note": "the bench did not finish"}, indent=1,
                                                   default=str))


def summary(work: Path, out: Path, mode: str, part: str = "all", quiet: bool = False) -> int:
    stages = read_stages(work)
    env = json.loads((work / "env.json").read_text()) if (work / "env.json").exists() else {}
    rows = bench_rows(work)
    passed = bool(stages) and all(stage_ok(st) for st in stages)
    report = {"mode": mode, "part": part, "passed": passed, "env": env, "stages": stages,
              "bench": bench_counts(rows), "cache": cache_report(work)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report, rows))
    with (out / "stages.csv").open("w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=STAGE_COLUMNS, extrasaction="ignore")
        wr.writeheader()
        wr.writerows(stages)
    _write_bench(work, out, rows)
    if quiet:
        return 0 if passed else 1
    print(f"\n== gpu_check part {part} ({mode}) on {env.get('device', 'cpu')}: {'PASSED' if passed else 'FAILED'}")
    for st in stages:
        why = st.get("reason") or st.get("note") or ""
        print(f"  {st['name']:<16} {st['status']:<8} {float(st.get('seconds', 0)):6.0f} s / "
              f"{st.get('limit_s', '')!s:>4} s  {why[:110]}")
    b = report["bench"]
    print(f"  bench rows: {b['rows']} ({b['ok']} measured, {b['skipped']} skipped, {b['error']} errors)")
    print(f"  results in {out}: {', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))}")
    return 0 if passed else 1


def print_cache(work: Path) -> int:
    rep = cache_report(work)
    after, warm = rep.get("after_stages") or {}, rep.get("after_warmup")
    if warm is None:
        print(f"cache: {sum(after.values())} compiled kernels after the stages (no warm-up count in this part)")
        return 0
    added = rep["added_by_stages"]
    for name, n in added.items():
        print(f"  +{n:<4d} {name}")
    ours = {k: n for k, n in added.items() if not k.startswith("triton_")}  # triton_*: torch.compile's kernels
    print(f"cache: {sum(warm.values())} compiled kernels after the warm-up (or as unpacked), "
          f"{sum(after.values())} after the stages"
          + (f" ({sum(ours.values())} of dare_kernels' compiled by the stages: a recompile across N, M or B, or "
             f"a case the warm-up does not drive)" if ours else " (none of dare_kernels' recompiled)")
          + (f"; {sum(added.values()) - sum(ours.values())} torch.compile kernels" if len(ours) < len(added) else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet = "--quiet" in argv
    argv = [a for a in argv if a != "--quiet"]
    if argv[:1] == ["commit"]:
        print(project_commit()[0])
        return 0
    if len(argv) < 2 or argv[0] not in ("env", "summary", "cache"):
        print(__doc__, file=sys.stderr)
        return 2
    work = Path(argv[1])
    work.mkdir(parents=True, exist_ok=True)
    if argv[0] == "cache":
        return print_cache(work)
    if argv[0] == "env":
        env = environment()
        (work / "env.json").write_text(json.dumps(env, indent=1, default=str))
        for k, v in env.items():
            print(f"  {k}: {v}")
        print(f"env: {env.get('device', 'no CUDA device')}, torch {env.get('torch')}, triton {env.get('triton')}, "
              f"missing {', '.join(env['missing_modules']) or 'nothing'}, commit {env['commit']}")
        return 0 if "dare_kernels_error" not in env and "torch_error" not in env else 1
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    return summary(work, Path(argv[2]), argv[3] if len(argv) > 3 else "device", argv[4] if len(argv) > 4 else "all",
                   quiet=quiet)


if __name__ == "__main__":
    sys.exit(main())
