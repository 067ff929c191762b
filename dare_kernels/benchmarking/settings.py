"""The benchmark suite's environment switches, read in one place (``bench_switch``).

| switch | meaning |
| --- | --- |
| DARE_KERNELS_BENCH_QUICK=1 | the quick, time-budgeted run (``dare-kernels bench``'s default; 0 = full) |
| DARE_KERNELS_BENCH_BUDGET_S=<s> | start no case after this many seconds of cases; later ones are skip rows |
| DARE_KERNELS_BENCH_CSV_DIR=<dir> | folder of the result CSVs (default: the untracked bench/results/local) |
| DARE_KERNELS_BENCH_RUN_ID=<id> | run id written in every row |
| DARE_KERNELS_BENCH_FLOORS=tiny | tiny floor measurements (plumbing tests only: numbers meaningless) |

The old names (``DARE_BENCH_QUICK`` ...) are still read, with a one-time warning.
"""

from __future__ import annotations

import os
import warnings

PREFIX = "DARE_KERNELS_BENCH_"
_OLD_PREFIX = "DARE_BENCH_"
NAMES = ("QUICK", "BUDGET_S", "CSV_DIR", "RUN_ID", "FLOORS")
_warned: set[str] = set()


def bench_switch(name: str, default: str | None = None) -> str | None:
    """Value of the bench switch ``name`` (one of NAMES, without prefix): DARE_KERNELS_BENCH_<name>,
    else the old DARE_BENCH_<name> (warned once), else ``default``."""
    if name not in NAMES:
        raise ValueError(f"unknown bench switch {name!r}; expected one of {NAMES}")
    value = os.environ.get(PREFIX + name)
    if value is not None:
        return value
    old = os.environ.get(_OLD_PREFIX + name)
    if old is not None:
        if name not in _warned:
            _warned.add(name)
            warnings.warn(f"{_OLD_PREFIX}{name} is renamed {PREFIX}{name}; the old name will be dropped",
                          DeprecationWarning, stacklevel=2)
        return old
    return default


def is_on(value: str | None) -> bool:
    """A switch value that means "on" ("1", "yes", "true", ...; empty, "0", "no", "false", "off" mean off)."""
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


def quick() -> bool:
    """True for the quick run (``--quick``/``--bench-quick`` set DARE_KERNELS_BENCH_QUICK=1 for the bench files)."""
    return is_on(bench_switch("QUICK"))


def budget_s() -> float | None:
    """DARE_KERNELS_BENCH_BUDGET_S as seconds, or None when unset or <= 0."""
    try:
        value = float(bench_switch("BUDGET_S") or 0)
    except ValueError as exc:
        raise ValueError(f"{PREFIX}BUDGET_S must be a number of seconds, got {bench_switch('BUDGET_S')!r}") from exc
    return value if value > 0 else None
