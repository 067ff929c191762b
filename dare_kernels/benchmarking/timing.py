"""Timing helpers shared by the bench files: input rotation, CPU wall-clock and CUDA-event timing.

Times are in seconds per call. Nothing here asserts a time; callers report quantiles and ratios.
"""

from __future__ import annotations

import itertools
import statistics
import time
from typing import Callable, Sequence

import torch


def quantiles(samples: Sequence[float]) -> tuple[float, float, float]:
    """(p20, p50, p80) of ``samples`` (linear interpolation between order statistics)."""
    s = sorted(float(x) for x in samples)
    if not s:
        raise ValueError("quantiles() needs at least one sample")
    if len(s) == 1:
        return s[0], s[0], s[0]

    def q(p: float) -> float:
        pos = p * (len(s) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    return q(0.2), statistics.median(s), q(0.8)


def make_input_sets(make: Callable[[torch.Generator], object], n: int = 3, seed: int = 0) -> list:
    """``n`` independent random input sets: ``make(generator)`` called with generators seeded seed..seed+n-1."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    sets = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        sets.append(make(g))
    return sets


def rotating(fn: Callable, input_sets: Sequence) -> Callable[[], object]:
    """A no-argument callable that calls ``fn`` on the next input set each time (cycling).

    An input set is a tuple (positional args), a dict (keyword args) or a single object (one arg).
    Rotating through a few sets keeps a small problem from being timed hot in cache every call.
    """
    if len(input_sets) == 0:
        raise ValueError("rotating() needs at least one input set")
    calls = []
    for s in input_sets:
        if isinstance(s, tuple):
            calls.append((s, {}))
        elif isinstance(s, dict):
            calls.append(((), s))
        else:
            calls.append(((s,), {}))
    it = itertools.cycle(calls)

    def call():
        args, kwargs = next(it)
        return fn(*args, **kwargs)

    return call


def cpu_time(fn: Callable[[], object], *, warmup: int = 1, rounds: int = 5, max_time: float | None = None) -> list[float]:
    """Wall-clock seconds of ``rounds`` calls of ``fn`` after ``warmup`` calls (stops early past ``max_time``)."""
    for _ in range(warmup):
        fn()
    out = []
    start = time.perf_counter()
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
        if max_time is not None and time.perf_counter() - start > max_time and len(out) >= 3:
            break
    return out


_L2_FLUSH: dict[int, torch.Tensor] = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _L2_FLUSH:
        # larger than any current L2 (H100: 50 MB, H200: 60 MB)
        _L2_FLUSH[idx] = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)
    return _L2_FLUSH[idx]


def cuda_time(fn: Callable[[], object], *, warmup: int = 3, rounds: int = 20, max_time: float = 2.0,
              flush_l2: bool = True, device: torch.device | str | None = None) -> list[float]:
    """Seconds per call of ``fn`` on the GPU, each call timed by its own pair of CUDA events.

    ``warmup`` untimed calls first (compilation, autotuning, allocator); before every timed call
    the L2 cache is overwritten (``flush_l2``) so no provider is timed with warm inputs.
    Stops after ``rounds`` calls, or earlier once ``max_time`` seconds of GPU time are spent
    (at least 5 calls).
    """
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    buf = _flush_buffer(device) if flush_l2 else None
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
    done = 0
    spent = 0.0
    for i in range(rounds):
        if buf is not None:
            buf.zero_()
        starts[i].record()
        fn()
        ends[i].record()
        done += 1
        if done >= 5 and done % 5 == 0:
            torch.cuda.synchronize(device)
            spent = sum(starts[j].elapsed_time(ends[j]) for j in range(done)) / 1e3
            if spent > max_time:
                break
    torch.cuda.synchronize(device)
    return [starts[j].elapsed_time(ends[j]) / 1e3 for j in range(done)]


def feed_benchmark(benchmark, samples: Sequence[float], timer: str) -> None:
    """Put externally measured per-call ``samples`` (seconds) into a pytest-benchmark fixture's stats.

    pytest-benchmark then prints them in its table like its own measurements, and the bench
    conftest writes them to the CSV; ``extra_info["timer"]`` records how they were taken.
    """
    benchmark.extra_info["timer"] = timer
    if not samples:
        raise ValueError("feed_benchmark() needs at least one sample")
    if getattr(benchmark, "_mode", None):
        raise RuntimeError(f"the benchmark fixture was already used ({benchmark._mode})")
    benchmark._mode = "feed_benchmark(...)"  # counts as used (pytest-benchmark warns otherwise)
    if getattr(benchmark, "disabled", False):
        return
    stats = benchmark._make_stats(1)  # pytest-benchmark's fixture API (stable since 3.x)
    for s in samples:
        stats.update(float(s))


def bench_cuda(benchmark, fn: Callable[[], object], **kwargs) -> None:
    """Time ``fn`` with CUDA events (``cuda_time`` keyword arguments) and hand the samples to ``benchmark``."""
    feed_benchmark(benchmark, cuda_time(fn, **kwargs), timer="cuda_events")


def bench_cpu(benchmark, fn: Callable[[], object], *, rounds: int | None = None, warmup_rounds: int = 1) -> object:
    """Time ``fn`` with pytest-benchmark (``benchmark.pedantic`` when ``rounds`` is given)."""
    benchmark.extra_info.setdefault("timer", "perf_counter")
    if rounds is None:
        return benchmark(fn)
    return benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
