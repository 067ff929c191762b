"""Time budget of a benchmark run: which cases run, with how many rounds, and why the others are skipped.

The quick run (``dare-kernels bench``, ``make bench``) is a budget, not a list: every bench file gets an
equal share of what is left of the budget when it starts, and a case may spend up to ``CASE_SHARE`` times
its fair part of what is left of its file's share (at least ``MIN_CASE_S``). Before a case's timed calls:

1. a floor estimate: an ``eager*`` provider multiplies in the row's dtype with torch.matmul, so one call
   needs at least flops / (that dtype's measured matmul rate); on a CPU without native bf16 that rate is
   about 1 GFLOP/s and such a case is skipped before it runs;
2. one probe call, timed and stopped past the case's allowance: rounds are then cut to what fits
   (at least ``MIN_ROUNDS``), or the case is skipped with the time one call takes;
3. set-up outside the timed calls (a torch.compile, a model build) is remembered per kind of case, and
   the next case of that kind is skipped when it alone would not fit; so is the probe call (per test,
   provider and dtype), so a slow kind of call is not probed again and again.

Every skip reason names the measured number it was decided on; the report lists them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

MIN_ROUNDS = 3      # rounds a timed case needs for a median
CASE_SHARE = 3.0    # a case may use this many times its fair part of its file's remaining share
MIN_CASE_S = 3.0    # ... and at least this many seconds
COMPILE_PRIOR_S = 30.0  # set-up of a compiling case before one of its kind was measured (20-60 s on 2 cores)
COMPILING = ("compile", "flex")  # kinds (test and provider names) that torch.compile in their set-up


def compiles(kind: str) -> bool:
    """Whether a case of ``kind`` compiles in its set-up (provider names: *_compiled, flex_*)."""
    return any(c in kind for c in COMPILING)


def fmt_s(seconds: float) -> str:
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    if seconds >= 1:
        return f"{seconds:.1f} s"
    return f"{seconds * 1e3:.3g} ms"


def matmul_dtype(provider: str, dtype: str) -> str | None:
    """Dtype a provider's products run in when it is plain torch.matmul (``eager*``; ``*_fp32`` upcasts), else None."""
    p = str(provider)
    if not p.startswith("eager"):
        return None
    return "float32" if p.endswith("_fp32") else dtype


@dataclass
class Budget:
    """Seconds of cases for a whole run, shared out per bench file (``files``: cases per file, in run order)."""

    total_s: float
    files: dict[str, int] = field(default_factory=dict)
    clock: object = time.monotonic
    _start: float = field(default=None, init=False)
    _file: str | None = field(default=None, init=False)
    _file_end: float = field(default=0.0, init=False)
    _left_in_file: int = field(default=0, init=False)
    _overhead: dict[str, float] = field(default_factory=dict, init=False)
    allowance: float = field(default=0.0, init=False)  # seconds the current case may take (set by admit)

    def now(self) -> float:
        if self._start is None:
            self._start = self.clock()
        return self.clock() - self._start

    def left(self) -> float:
        return self.total_s - self.now()

    def _enter_file(self, name: str) -> None:
        if name == self._file:
            return
        order = list(self.files)
        later = order[order.index(name):] if name in order else [name]
        self._file = name
        self._file_end = self.now() + max(0.0, self.left()) / max(1, len(later))
        self._left_in_file = self.files.get(name, 1)

    def file_left(self) -> float:
        return self._file_end - self.now()

    def case_allowance(self) -> float:
        """Seconds the case now starting may take."""
        fair = max(0.0, self.file_left()) / max(1, self._left_in_file)
        return min(max(MIN_CASE_S, CASE_SHARE * fair), max(0.0, self.left()))

    def admit(self, file: str, kind: str) -> str | None:
        """Called as a case starts: None to run it, else the skip reason. Counts the case against its file."""
        self._enter_file(file)
        self._left_in_file = max(1, self._left_in_file)
        self.allowance = self.case_allowance()
        try:
            if self.left() <= 0:
                return f"time budget of {self.total_s:.0f} s for this run spent before this case"
            if self.file_left() <= 0:
                return (f"this file's share of the {self.total_s:.0f} s budget was spent before this case "
                        "(`dare-kernels bench --full` runs every case)")
            overhead = self._overhead.get(kind)
            if overhead is not None and overhead > self.allowance:
                return (f"set-up of the previous case of this kind (compile, model build) took {fmt_s(overhead)} here, "
                        f"more than the {fmt_s(self.allowance)} a case may take in this run")
            if overhead is None and compiles(kind) and COMPILE_PRIOR_S > self.allowance:
                return (f"its torch.compile takes about {fmt_s(COMPILE_PRIOR_S)} on a 2-core CPU, more than the "
                        f"{fmt_s(self.allowance)} a case may take in this run (`dare-kernels bench --full` runs it)")
            return None
        finally:
            self._left_in_file -= 1

    def record_overhead(self, kind: str, seconds: float) -> None:
        """Seconds a case of ``kind`` spent outside its timed calls (set-up, compile)."""
        self._overhead[kind] = seconds

    def plan(self, per_call_s: float, wanted_rounds: int | None, spent_s: float, how: str) -> tuple[int | None, str | None]:
        """(rounds, None) that fit what is left of the case's allowance, or (None, skip reason).

        ``per_call_s``: measured (or estimated, ``how`` says which) seconds of one call; ``spent_s``: seconds
        the case has used so far; ``wanted_rounds``: what the bench file asked for (None: calibrated)."""
        left = self.allowance - spent_s
        need = MIN_ROUNDS * per_call_s
        if need > left:
            return None, (f"{how} {fmt_s(per_call_s)} here: {MIN_ROUNDS} rounds would take {fmt_s(need)}, "
                          f"more than the {fmt_s(max(0.0, left))} left for a case in this run "
                          "(`dare-kernels bench --full` runs it)")
        fit = int(left / max(per_call_s, 1e-9))
        rounds = max(MIN_ROUNDS, fit if wanted_rounds is None else min(wanted_rounds, fit))
        return rounds, None
