"""pytest plugin used by ``dare-kernels bench``: one progress line per benchmark instead of dots, with the
time spent and an ETA (the mean time of the cases done so far times the cases left; in a budgeted run at
most what is left of the budget):

    [ 12/48  25%  1m02s ETA 4m08s] sra_attention fwd+map wan-1.3b float32 eager_maps ........ 81.6 ms
"""

from __future__ import annotations

import statistics
import time

import pytest

_state = {"total": 0, "done": 0, "start": 0.0}


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def eta_s(done: int, total: int, elapsed: float, budget_left: float | None = None) -> float | None:
    """Seconds still to go: mean time per finished case x cases left (None before the first), capped by
    ``budget_left`` (a budgeted run skips what would not fit)."""
    if done <= 0:
        return None
    eta = elapsed / done * max(0, total - done)
    if budget_left is not None:
        eta = min(eta, max(0.0, budget_left))
    return eta


def _fmt(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def pytest_collection_finish(session):
    _state.update(total=len(session.items), done=0, start=time.perf_counter())


@pytest.hookimpl(tryfirst=True)
def pytest_report_teststatus(report, config):
    # silence pytest's per-test letters; the lines below replace them
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        return report.outcome, "", report.outcome.upper()
    return None


def _describe(item) -> str:
    fx = getattr(item, "funcargs", {}).get("benchmark")
    info = getattr(fx, "extra_info", {}) or {}
    parts = [str(info[k]) for k in ("kernel", "mode", "shape", "dtype", "provider") if info.get(k)]
    return " ".join(parts) if len(parts) >= 3 else item.name


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    final = (call.when == "call") or (call.when == "setup" and not report.passed)
    if not final:
        return
    _state["done"] += 1
    tr = item.config.pluginmanager.get_plugin("terminalreporter")
    if tr is None:
        return
    done, total = _state["done"], max(1, _state["total"])
    el = time.perf_counter() - _state["start"]
    budget = getattr(getattr(item.config, "_dare_recorder", None), "budget", None)
    eta = eta_s(done, total, el, budget.left() if budget is not None else None)
    head = f"[{done:>3}/{total} {100 * done // total:>3}% {_clock(el)}{' ETA ' + _clock(eta) if eta is not None else ''}]"
    what = _describe(item)
    if report.skipped:
        why = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        tail = f"skipped: {why.removeprefix('Skipped: ')}"
    elif report.failed:
        tail = f"FAILED: {call.excinfo.typename if call.excinfo else ''}"
    else:
        fx = getattr(item, "funcargs", {}).get("benchmark")
        data = list(getattr(getattr(getattr(fx, "stats", None), "stats", None), "data", []) or [])
        tail = _fmt(statistics.median(data)) if data else "done"
    tr.ensure_newline()
    tr.write_line(f"{head} {what} {'.' * max(2, 70 - len(what))} {tail}")
