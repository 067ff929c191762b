"""Benchmark-suite plumbing: every pytest-benchmark result (and every skip) becomes a CSV row.

Rows go to ``bench/results/local/<device-slug>.csv`` (untracked; appended; ``--bench-csv-dir`` or
DARE_KERNELS_BENCH_CSV_DIR moves them, e.g. to the committed bench/results/, ``--bench-no-csv`` turns
writing off). Before the first benchmark on a device and again at the end of the session, the physical
floors of that device (matmul peak, copy bandwidth) are measured and written as rows of the same run,
so the report's "fraction of the floor" uses numbers from the same machine and load.

Options: ``--bench-quick`` (smaller shapes and rounds; same as DARE_KERNELS_BENCH_QUICK=1, read by
harness.quick()), ``--bench-budget-s`` (the time budget of dare_kernels/benchmarking/budget.py: cases
that would not fit are skip rows with the measured reason).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:  # so bench files can `import harness, peers, shapes`
    sys.path.insert(0, str(BENCH_DIR))

from dare_kernels.benchmarking import results as _results  # noqa: E402
from dare_kernels.benchmarking.budget import Budget, compiles, fmt_s, matmul_dtype  # noqa: E402
from dare_kernels.benchmarking.settings import bench_switch, budget_s, is_on  # noqa: E402
from dare_kernels.benchmarking.timing import quantiles  # noqa: E402

LOCAL_RESULTS = BENCH_DIR / "results" / "local"  # untracked: a user's runs never touch committed files

_INFO_KEYS = ("kernel", "provider", "mode", "shape", "dims", "dtype", "flops", "bytes", "peak_mem_bytes",
              "scale", "timer")


def pytest_addoption(parser):
    g = parser.getgroup("dare-bench", "dare_kernels benchmark suite")
    g.addoption("--bench-quick", action="store_true", default=False,
                help="quick subset: fewer/smaller shapes and rounds (also DARE_KERNELS_BENCH_QUICK=1)")
    g.addoption("--bench-csv-dir", default=None,
                help="folder of the result CSVs (default bench/results/local, untracked; or DARE_KERNELS_BENCH_CSV_DIR)")
    g.addoption("--bench-no-csv", action="store_true", default=False, help="do not write result rows")
    g.addoption("--bench-run-id", default=None, help="run id written in every row (default: time + pid)")
    g.addoption("--bench-budget-s", type=float, default=None,
                help="time budget of the cases in seconds: shared out per file, a case that would not fit is a "
                     "skip row with the measured reason (also DARE_KERNELS_BENCH_BUDGET_S)")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class _Recorder:
    """Collects rows per device and appends them to that device's CSV as they come."""

    def __init__(self, config):
        self.config = config
        self.enabled = not config.getoption("--bench-no-csv")
        d = config.getoption("--bench-csv-dir") or bench_switch("CSV_DIR") or LOCAL_RESULTS
        self.csv_dir = Path(d)
        self.run_id = config.getoption("--bench-run-id") or bench_switch("RUN_ID") or _results.new_run_id()
        self.quick = bool(config.getoption("--bench-quick")) or is_on(bench_switch("QUICK"))
        self._env: dict[str, dict] = {}
        self._floors_done: set[str] = set()
        self.floor_devices: list[str] = []  # devices whose floors were measured at the start
        self.rates: dict[tuple[str, str], float] = {}  # (device type, dtype) -> measured matmul GFLOP/s
        self.rows_written = 0
        budget = config.getoption("--bench-budget-s") or budget_s() or 0
        self.budget_s = budget if budget > 0 else None
        self.budget = Budget(self.budget_s) if self.budget_s else None
        self.case_start = 0.0
        self.case_timed = 0.0  # seconds of the current case inside timed / probe calls
        self.files_started: set[str] = set()
        self.last_call: dict[str, float] = {}  # seconds of the last probe call per (test, provider, dtype)
        self.start = time.monotonic()

    def env(self, device_type: str) -> dict:
        if device_type not in self._env:
            self._env[device_type] = _results.environment(device_type, cwd=BENCH_DIR)
        return self._env[device_type]

    def csv_path(self, device_type: str) -> Path:
        return self.csv_dir / f"{_results.device_slug(device_type)}.csv"

    def write(self, device_type: str, rows: list[dict]) -> None:
        if not self.enabled or not rows:
            return
        if device_type == "cuda" and not _cuda_available():
            device_type = "cpu"  # GPU cases skipped on a machine without one: rows of this machine's file
        env = self.env(device_type)
        stamped = [dict(env, run_id=self.run_id, timestamp=_results.utc_now(), **r) for r in rows]
        self.rows_written += _results.append_rows(self.csv_path(device_type), stamped)

    def ensure_floors(self, device_type: str) -> None:
        if device_type in self._floors_done or not self.enabled:
            return
        self._floors_done.add(device_type)
        if device_type == "cuda":
            import torch

            if not torch.cuda.is_available():
                return
        self.floor_devices.append(device_type)
        self.measure_floors(device_type, "floors-start")

    def measure_floors(self, device_type: str, label: str) -> None:
        from dare_kernels.benchmarking.floors import measure_floors

        try:
            rows = measure_floors(device_type, quick=self.quick)
        except Exception as e:  # noqa: BLE001 - a failed floor is recorded, not fatal
            rows = [dict(kernel="floor", provider="matmul", mode="floor", metric="throughput", status="error",
                         reason=f"{type(e).__name__}: {e}"[:300])]
        for r in rows:
            if r.get("provider") == "matmul" and r.get("status") == "ok" and r.get("p50"):
                self.rates[(device_type, _results.normalize_dtype(r.get("dtype")))] = float(r["p80"] or r["p50"])
        self.write(device_type, [dict(r, test=label) for r in rows])


def pytest_configure(config):
    if config.getoption("--bench-quick"):
        os.environ["DARE_KERNELS_BENCH_QUICK"] = "1"
    config._dare_recorder = _Recorder(config)


def pytest_collection_modifyitems(session, config, items):
    rec = config._dare_recorder
    if rec.budget is None:
        return
    # a compile costs 20-60 s on a 2-core CPU: in a budgeted run compiled providers come last in their file,
    # so they get what the plain cases leave
    order = {}
    for i, it in enumerate(items):
        order.setdefault(str(it.path), i)
    items.sort(key=lambda it: (order[str(it.path)], compiles(_kind(it))))
    counts: dict[str, int] = {}
    for it in items:
        if _is_bench(it):
            counts[str(it.path)] = counts.get(str(it.path), 0) + 1
    rec.budget.files = counts


def _kind(item) -> str:
    """What makes two cases alike in set-up cost: the test function and its provider."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    prov = params.get("provider", "")
    return f"{item.path.name}::{getattr(item, 'originalname', item.name)}[{prov}]"


def pytest_sessionstart(session):
    rec = session.config._dare_recorder
    if rec.budget is not None:
        rec.budget.now()  # the budget counts from here: floors and collection are part of the run
    bs = getattr(session.config, "_benchmarksession", None)
    if rec.quick and bs is not None:  # fewer rounds: enough for a median, not for a paper
        bs.options.update(max_time=0.25, min_rounds=3, min_time=0.000005, warmup=True, warmup_iterations=1)


def pytest_report_header(config):
    rec = config._dare_recorder
    where = rec.csv_dir if rec.enabled else "not written (--bench-no-csv)"
    budget = f", budget {rec.budget_s:.0f} s" if rec.budget_s else ""
    return [f"dare bench: run {rec.run_id}, quick={rec.quick}{budget}, CSV rows -> {where}"]


def _is_bench(item) -> bool:
    return "benchmark" in getattr(item, "fixturenames", ())


def _device_of(item, info: dict) -> str:
    dev = str(info.get("device") or "").lower()
    if dev.startswith("cuda"):
        return "cuda"
    if dev == "cpu":
        return "cpu"
    return "cuda" if item.path.name.endswith("_gpu.py") else "cpu"  # by the file-name convention


def _meta_from_item(item) -> dict:
    """What a row can say about a test that never filled extra_info (skipped before it ran)."""
    meta: dict = {}
    fx = getattr(item, "funcargs", {}).get("benchmark")
    if fx is not None:
        meta.update({k: v for k, v in fx.extra_info.items()})
    params = getattr(getattr(item, "callspec", None), "params", {})
    for k in ("kernel", "provider", "mode", "shape", "dtype"):
        for name in (k, f"{k}_name"):
            if k not in meta and name in params:
                v = params[name]
                meta[k] = getattr(v, "name", None) or str(v).replace("torch.", "")
    marker = item.get_closest_marker("benchmark")
    group = (getattr(fx, "group", None) if fx is not None else None) or (marker.kwargs.get("group") if marker else None)
    if group and "kernel" not in meta:  # convention: "<kernel> <pass> <shape> <dtype>"
        parts = str(group).split()
        for key, val in zip(("kernel", "mode", "shape", "dtype"), parts):
            meta.setdefault(key, val)
    meta.setdefault("kernel", item.path.stem.replace("test_bench_", "").rsplit("_", 1)[0])
    test_name = getattr(item, "originalname", None) or item.name
    meta.setdefault("provider", test_name)
    meta.setdefault("mode", test_name.removeprefix("test_"))
    meta["group"] = group or ""
    return meta


def _ms(v):
    return v / 1e3 if isinstance(v, (int, float)) else None


def _row(item, info: dict, **extra) -> dict:
    row = {k: info.get(k) for k in _INFO_KEYS if info.get(k) is not None}
    for k, v in info.items():  # any other scalar extra_info travels too (e.g. notes)
        if k not in row and k not in ("device",) and isinstance(v, (int, float, str)) and k not in _results.COLUMNS:
            row[k] = v
    row.setdefault("metric", "time")
    row.setdefault("unit", "s")
    if "dtype" in row:
        row["dtype"] = _results.normalize_dtype(row["dtype"])
    if "dims" not in row and all(k in info for k in "BHNMD"):
        row["dims"] = " ".join(f"{k}={info[k]}" for k in "BHNMD")
    row["test"] = item.nodeid
    row.update(extra)
    return row


def pytest_runtest_setup(item):
    if _is_bench(item) and not item.config.getoption("benchmark_disable", False):
        rec = item.config._dare_recorder
        # device of the file: measure its floors before the first benchmark of the session on it
        rec.ensure_floors("cuda" if item.path.name.endswith("_gpu.py") else "cpu")
        rec.case_start, rec.case_timed = time.monotonic(), 0.0
        if rec.budget is not None:
            why = rec.budget.admit(str(item.path), _kind(item))
            if why:
                rec.case_start = 0.0
                pytest.skip(why)


def pytest_runtest_teardown(item):
    rec = item.config._dare_recorder
    if rec.budget is not None and rec.case_start and _is_bench(item):
        # the first case of a file also pays the file's lazy imports (diffusers models ...): not a cost of its kind
        if str(item.path) in rec.files_started:
            rec.budget.record_overhead(_kind(item), time.monotonic() - rec.case_start - rec.case_timed)
        rec.files_started.add(str(item.path))
        rec.case_start = 0.0


class _ProbeTimeout(Exception):
    pass


def _probe(fn, limit_s: float) -> float:
    """Seconds of one call of ``fn``; a call still running after ``limit_s`` is stopped (SIGALRM, main
    thread: it lands when the current ATen op returns) and _ProbeTimeout raised."""
    use_alarm = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()

    def _stop(signum, frame):
        raise _ProbeTimeout()

    old = signal.signal(signal.SIGALRM, _stop) if use_alarm else None
    t0 = time.perf_counter()
    try:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, max(limit_s, 0.01))
        fn()
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    return time.perf_counter() - t0


def _budgeted_class(base):
    """A subclass of pytest-benchmark's fixture whose timed calls go through the run's time budget."""

    class BudgetedBenchmark(base):
        def _gate(self, call, wanted_rounds):
            """Rounds to run (None: pytest-benchmark calibrates), after a floor estimate and one probe call."""
            rec = self._dare_rec
            budget = rec.budget
            info = self.extra_info
            spent = time.monotonic() - rec.case_start if rec.case_start else 0.0
            dtype = _results.normalize_dtype(info.get("dtype"))
            mm = matmul_dtype(info.get("provider", ""), dtype)
            rate = rec.rates.get((_device_of(self._dare_item, info), mm)) if mm else None
            if rate and info.get("flops"):
                est = float(info["flops"]) / (rate * 1e9)
                _, why = budget.plan(est, wanted_rounds, spent,
                                     f"at the measured {mm} matmul rate ({rate:.3g} GFLOP/s; eager peers multiply in "
                                     "the input dtype) one call needs at least")
                if why:
                    pytest.skip(why)
            like = f"{_kind(self._dare_item)}[{dtype}]"  # the same test, provider and dtype: a similar call
            prev = rec.last_call.get(like)
            if prev is not None:
                _, why = budget.plan(prev, wanted_rounds, spent, "a call of the previous case like this one took")
                if why:
                    pytest.skip(why)
            limit = budget.allowance - spent
            if limit <= 0:
                pytest.skip(f"its set-up (inputs, model, compile) took {fmt_s(spent)}, more than the "
                            f"{fmt_s(budget.allowance)} a case may take in this run (`dare-kernels bench --full` runs it)")
            t0 = time.monotonic()
            try:
                per_call = _probe(call, limit)
                rec.last_call[like] = per_call
            except _ProbeTimeout:
                rec.last_call[like] = limit
                pytest.skip(f"one call ran past the {fmt_s(limit)} left for a case in this run and was stopped "
                            "(`dare-kernels bench --full` runs it)")
            finally:
                rec.case_timed += time.monotonic() - t0
            rounds, why = budget.plan(per_call, wanted_rounds, spent + per_call, "one call takes")
            if why:
                pytest.skip(why)
            if rounds * per_call > 20:
                tr = self._dare_item.config.pluginmanager.get_plugin("terminalreporter")
                if tr is not None:
                    tr.write_line(f"    ... {rounds} rounds of {fmt_s(per_call)}: about {fmt_s(rounds * per_call)}")
            return rounds

        def pedantic(self, target, args=(), kwargs=None, setup=None, teardown=None, rounds=1, warmup_rounds=0,
                     iterations=1):
            if self._dare_rec.budget is None or self.disabled or setup is not None:
                return super().pedantic(target, args, kwargs, setup, teardown, rounds, warmup_rounds, iterations)
            kw = kwargs or {}
            n = self._gate(lambda: target(*args, **kw), rounds)
            t0 = time.monotonic()
            try:  # the probe call was one warm-up
                return super().pedantic(target, args, kwargs, setup, teardown, n, max(0, warmup_rounds - 1), iterations)
            finally:
                self._dare_rec.case_timed += time.monotonic() - t0

        def __call__(self, function_to_benchmark, *args, **kwargs):
            if self._dare_rec.budget is None or self.disabled:
                return super().__call__(function_to_benchmark, *args, **kwargs)
            self._gate(lambda: function_to_benchmark(*args, **kwargs), None)
            t0 = time.monotonic()
            try:
                return super().__call__(function_to_benchmark, *args, **kwargs)
            finally:
                self._dare_rec.case_timed += time.monotonic() - t0

    BudgetedBenchmark.__name__ = base.__name__
    return BudgetedBenchmark


_BUDGETED: dict[type, type] = {}


@pytest.fixture
def benchmark(benchmark, request):
    """pytest-benchmark's fixture (the same object, as its plugin requires), its timed calls budgeted."""
    rec = request.config._dare_recorder
    if rec.budget is not None:
        cls = type(benchmark)
        if cls not in _BUDGETED:
            _BUDGETED[cls] = _budgeted_class(cls)
        benchmark.__class__ = _BUDGETED[cls]
        benchmark._dare_rec, benchmark._dare_item = rec, request.node
    return benchmark


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not _is_bench(item):
        return
    rec = item.config._dare_recorder
    if report.skipped and call.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if reason.startswith("Skipped: "):
            reason = reason[len("Skipped: "):]
        if "--benchmark-skip" in reason or "--benchmark-only" in reason:
            return
        meta = _meta_from_item(item)
        rec.write(_device_of(item, meta), [_row(item, meta, status="skipped", reason=reason)])
    elif report.failed and call.when in ("setup", "call"):
        meta = _meta_from_item(item)
        msg = str(call.excinfo.value).strip().splitlines()[0] if call.excinfo else "failed"
        reason = f"{call.excinfo.typename if call.excinfo else 'error'}: {msg}"[:300]
        rec.write(_device_of(item, meta), [_row(item, meta, status="error", reason=reason)])
    elif report.passed and call.when == "call":
        fx = getattr(item, "funcargs", {}).get("benchmark")
        stats = getattr(fx, "stats", None)
        data = list(getattr(getattr(stats, "stats", None), "data", []) or [])
        meta = _meta_from_item(item)
        if not data:
            return  # benchmarks disabled: nothing measured
        p20, p50, p80 = quantiles(data)
        timing = dict(p50=p50, p20=p20, p80=p80, mean=sum(data) / len(data), rounds=len(data))
        if isinstance(meta.get("median_ms"), (int, float)):
            # a device-side median (e.g. triton.testing.do_bench) beats host timing of async launches
            timing = dict(p50=meta["median_ms"] / 1e3, p20=_ms(meta.get("p20_ms")), p80=_ms(meta.get("p80_ms")),
                          mean=None, rounds=meta.get("rounds"))
            meta.setdefault("timer", "device_median_ms")
        meta.setdefault("timer", "perf_counter")
        rec.write(_device_of(item, meta), [_row(item, meta, status="ok", **timing)])


def pytest_sessionfinish(session, exitstatus):
    rec = session.config._dare_recorder
    if rec.rows_written:  # floors again at the end: load drift during the run shows up as two rows
        for device_type in rec.floor_devices:
            rec.measure_floors(device_type, "floors-end")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rec = config._dare_recorder
    if rec.enabled and rec.rows_written:
        terminalreporter.write_line(f"dare bench: {rec.rows_written} rows appended under {rec.csv_dir} "
                                    f"(run {rec.run_id}); `dare-kernels report` renders them")
