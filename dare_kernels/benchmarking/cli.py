"""``dare-kernels bench`` (run the suite, then the table) and ``dare-kernels report`` (table + plots from CSVs).

``dare-kernels bench`` is the quick, time-budgeted run (``make bench``: a few minutes on a 2-core CPU);
``--full`` is the exhaustive suite (``make bench-full``). Results go to the untracked bench/results/local/
unless ``--publish`` (the committed bench/results/) or ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
from pathlib import Path

from .settings import bench_switch, budget_s, is_on

# pytest exit statuses of a run that ended on its own: all passed, some benchmark failed (error rows), or nothing
# selected; 2 (interrupted), 3 (internal error), 4 (usage) and a signal leave the run partial
RUN_ENDED = (0, 1, 5)
QUICK_BUDGET_S = {"cpu": 200.0, "cuda": 300.0, "all": 300.0}  # seconds of cases in the default (quick) run
FULL_BUDGET_S = {"cpu": 0.0, "cuda": 480.0, "all": 0.0}       # --full: none on CPU; one device call on CUDA


def find_bench_dir(explicit: str | None = None) -> Path:
    """The repository's bench/ folder: --bench-dir, ./bench, or next to the (editable) package."""
    candidates = [Path(explicit)] if explicit else []
    candidates += [Path.cwd() / "bench", Path(__file__).resolve().parents[2] / "bench"]
    for c in candidates:
        if (c / "conftest.py").is_file():
            return c.resolve()
    raise SystemExit("dare-kernels bench: no bench/ folder with conftest.py found (run it from the repository "
                     "root or pass --bench-dir)")


def _bench_files(bench_dir: Path, device: str) -> list[str]:
    pats = {"cpu": ["test_bench_*_cpu.py"], "cuda": ["test_bench_*_gpu.py"],
            "all": ["test_bench_*_cpu.py", "test_bench_*_gpu.py"]}[device]
    files = sorted({f for p in pats for f in glob.glob(str(bench_dir / p))})
    return files


def results_dirs(bench_dir: Path, out: str | None, csv_dir: str | None, publish: bool) -> tuple[Path, Path]:
    """(report folder, CSV folder): --out / --csv-dir, else bench/results with --publish, else the untracked
    bench/results/local (DARE_KERNELS_BENCH_CSV_DIR moves the CSVs)."""
    default = bench_dir / "results" if publish else bench_dir / "results" / "local"
    out_dir = Path(out) if out else default
    return out_dir, Path(csv_dir or bench_switch("CSV_DIR") or out_dir)


def _cmd_bench(args: argparse.Namespace) -> int:
    from . import report
    from .results import device_slug, mark_run_complete, new_run_id

    import importlib.util

    if importlib.util.find_spec("pytest_benchmark") is None:
        print("dare-kernels bench: pytest-benchmark is not installed here (pip install -e '.[bench]', or make bench)",
              file=sys.stderr)
        return 2
    env_quick = bench_switch("QUICK")
    if args.full and args.quick:
        raise SystemExit("dare-kernels bench: --quick and --full exclude each other")
    quick = not args.full and (args.quick or env_quick is None or is_on(env_quick))
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    bench_dir = find_bench_dir(args.bench_dir)
    files = _bench_files(bench_dir, device)
    if not files:
        print(f"no bench files for --device {device} under {bench_dir}", file=sys.stderr)
        return 2
    out_dir, csv_dir = results_dirs(bench_dir, args.out, args.csv_dir, args.publish)
    run_id = new_run_id()
    cmd = [sys.executable, "-m", "pytest", *files, "--benchmark-only", "-p", "no:cacheprovider",
           "-p", "dare_kernels.benchmarking.progress", "-q", "--no-header", "-rN",
           f"--rootdir={bench_dir.parent}", "--bench-run-id", run_id, "--bench-csv-dir", str(csv_dir),
           "--benchmark-quiet"]  # the comparison table below replaces pytest-benchmark's own tables
    if quick:
        cmd.append("--bench-quick")
    budget = args.budget_s if args.budget_s is not None else budget_s()
    if budget is None:
        budget = (QUICK_BUDGET_S if quick else FULL_BUDGET_S)[device]
    if budget > 0:
        cmd += ["--bench-budget-s", str(budget)]
    if args.filter:
        cmd += ["-k", args.filter]
    cmd += args.pytest_args or []
    env = dict(os.environ)
    env["DARE_KERNELS_BENCH_QUICK"] = "1" if quick else "0"
    env.pop("DARE_BENCH_QUICK", None)
    what = f"quick, {budget:.0f} s budget" if quick else ("full" + (f", {budget:.0f} s budget" if budget > 0 else ""))
    print(f"dare-kernels bench: {len(files)} file(s), device {device}, run {run_id} ({what}); "
          f"results -> {csv_dir}", flush=True)
    # Ctrl-C here raises KeyboardInterrupt after pytest stops: the run gets no end-of-run row
    rc = subprocess.call(cmd, cwd=str(bench_dir.parent), env=env)
    if rc not in (0, 1):  # 1: some benchmark failed (recorded as error rows); still report
        print(f"pytest exited with {rc}", file=sys.stderr)
    # both files: GPU cases skipped on a machine without a GPU are rows of the CPU file; the
    # report keeps only this run's rows
    csvs = sorted({p for p in (csv_dir / f"{device_slug(d)}.csv" for d in ("cpu", "cuda")) if p.is_file()})
    if not csvs:
        print("no result rows were written", file=sys.stderr)
        return rc or 1
    if rc in RUN_ENDED:  # the run ended on its own (budget skips are rows of it): mark it complete
        for p in csvs:
            mark_run_complete(p, run_id, note=f"pytest exit status {rc}")
    else:
        print(f"run {run_id} did not end on its own (pytest exit status {rc}): it stays partial", file=sys.stderr)
    written = report.write_report(csvs, out_dir, run=run_id, plots=not args.no_plots)
    for md in written["md"]:
        print()
        print(md.read_text())
    for p in written["md"] + written["png"]:
        print(f"wrote {p}")
    return 0 if rc in (0, 1, 5) else rc


def _cmd_report(args: argparse.Namespace) -> int:
    from . import report

    results = find_bench_dir(args.bench_dir) / "results"
    csvs = args.csv or sorted(glob.glob(str(results / "local" / "*.csv"))) or committed_csvs(results)
    if not csvs:
        print("no result CSVs (run `dare-kernels bench` first, or pass --csv)", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else Path(csvs[0]).parent
    written = report.write_report(csvs, out, run=args.run, plots=not args.no_plots)
    if args.print:
        for md in written["md"]:
            print(md.read_text())
    for p in written["md"] + written["png"]:
        print(f"wrote {p}")
    return 0


def committed_csvs(results: Path) -> list[str]:
    """The committed result CSVs: bench/results/*.csv (make bench-publish) and the device checks' bench.csv
    files (bench/results/<run>/bench.csv), CPU and GPU side by side."""
    return sorted(glob.glob(str(results / "*.csv"))) + sorted(glob.glob(str(results / "*" / "bench.csv")))


def add_parser(subparsers) -> None:
    """Register ``bench`` and ``report``."""
    p = subparsers.add_parser("bench", help="run the benchmark suite (pytest bench/ --benchmark-only), then the table")
    p.add_argument("--quick", action="store_true",
                   help="the default: small CPU shapes and a time budget (200 s of cases on CPU); a case that "
                        "would not fit is skipped with the measured reason")
    p.add_argument("--full", action="store_true", help="the exhaustive suite (make bench-full): every shape, no budget on CPU")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "all"), default="auto",
                   help="which bench files: *_cpu.py, *_gpu.py or both (auto: cuda if available, else cpu)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds of cases: shared out per bench file; cases that would not fit are skip rows "
                        "with the reason (default: 200 quick on CPU, 300 quick on CUDA, none --full on CPU, 480 "
                        "--full on CUDA so the run fits one 10-minute device call; 0 = no limit)")
    p.add_argument("--filter", "-k", default=None, help="pytest -k expression (e.g. 'sra and not bf16')")
    p.add_argument("--out", default=None, help="folder of the report and plots (default bench/results/local, untracked)")
    p.add_argument("--publish", action="store_true",
                   help="write rows and report into the committed bench/results/ (default: bench/results/local/)")
    p.add_argument("--csv-dir", default=None, help="folder of the result CSVs (default: --out)")
    p.add_argument("--bench-dir", default=None, help="the bench/ folder (default: ./bench)")
    p.add_argument("--no-plots", action="store_true", help="Markdown table only")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    p.set_defaults(func=_cmd_bench)

    r = subparsers.add_parser("report", help="Markdown table and PNG plots from bench/results/*.csv")
    r.add_argument("--csv", action="append", default=None,
                   help="result CSV or a device check's bench.csv (repeatable; default bench/results/local/*.csv, "
                        "else bench/results/*.csv and bench/results/*/bench.csv)")
    r.add_argument("--out", default=None, help="output folder (default: the first CSV's folder)")
    r.add_argument("--run", default="latest",
                   help="'latest' complete run per device (default; partial runs are listed), 'all', or a run id")
    r.add_argument("--bench-dir", default=None, help=argparse.SUPPRESS)
    r.add_argument("--no-plots", action="store_true", help="Markdown table only")
    r.add_argument("--print", action="store_true", help="also print the Markdown")
    r.set_defaults(func=_cmd_report)
