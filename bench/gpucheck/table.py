"""Timing, peak memory and the files of the device-check bench: rows as they come, ratios in front.

Files under the output folder, all rewritten after every row (a run cut anywhere leaves them current):
    bench_rows.jsonl   one JSON object per row, appended the moment the row is done
    bench.json         {"device", "ratios": [...], "rows": [...]}: the ratios lead
    bench_ratios.csv   one line per (unit, mode, dare backend, peer): peer ms / dare ms (> 1: dare is faster),
                       and dare's peak memory over the peer's for rows that record it
    bench.csv          the rows (ms, quantiles, TFLOP/s, GB/s, peak_mem_mb, status, reason)
    bench.md           the ratio table, then the row table (for the device check's summary)
Timing: CUDA events with the L2 flushed before each call (``dare_kernels.benchmarking.timing.cuda_time``) on a
GPU; wall-clock medians of a few calls on CPU (the rehearsal). Peak memory (CUDA only): one more call after the
timed ones, ``torch.cuda.max_memory_allocated`` after a reset, less what was allocated before the call.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import torch

from .attention import Skip
from .plan import base_mode

COMPILE_RESERVE_S = 45.0  # a compiled provider does not start with less budget left than this (GPU)
CSV_COLUMNS = ("part", "kernel", "shape", "dims", "dtype", "provider", "mode", "role", "status", "ms", "p20_ms",
               "p80_ms", "rounds", "tflops", "gbps", "peak_mem_mb", "wall_s", "reason", "device")
RATIO_COLUMNS = ("kernel", "shape", "dtype", "mode", "dare", "peer", "peer_mode", "peer_ms", "dare_ms", "ratio",
                 "mem_ratio")


def measure(fn, device: str) -> list[float]:
    """Seconds per call: CUDA events with an L2 flush on a GPU (2 warm-up calls, up to 20 timed); on CPU (the
    rehearsal, where the numbers only show that the row runs) the wall clock of 2 calls, the first one cold."""
    from dare_kernels.benchmarking.timing import cpu_time, cuda_time

    if device == "cuda":
        return cuda_time(fn, warmup=2, rounds=20, max_time=1.0)
    return cpu_time(fn, warmup=0, rounds=2)


def peak_memory_mb(fn) -> float:
    """MiB one call of ``fn`` allocates at its peak beyond what was allocated before it (CUDA)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def ratios(rows: list[dict]) -> list[dict]:
    """peer ms / dare ms for every measured dare row against every measured peer of its unit at its mode and,
    for a map mode, against the reference peers and the same dare backend at the mode without the map."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("ms")]
    by_key = {(r["kernel"], r["shape"], r["dtype"], r["provider"], r["mode"]): r for r in ok}
    out = []
    for d in ok:
        if not str(d["provider"]).startswith("dare_"):
            continue
        unit = (d["kernel"], d["shape"], d["dtype"])
        peers = [r for r in ok if (r["kernel"], r["shape"], r["dtype"]) == unit and r["mode"] == d["mode"]
                 and not str(r["provider"]).startswith("dare_")]
        base = base_mode(d["mode"])
        if base is not None:
            peers += [r for r in ok if (r["kernel"], r["shape"], r["dtype"]) == unit and r["mode"] == base
                      and r.get("role") == "reference"]
            same = by_key.get((*unit, d["provider"], base))
            if same is not None:
                peers.append(same)
        for p in peers:
            mem = None
            if d.get("peak_mem_mb") and p.get("peak_mem_mb"):
                mem = d["peak_mem_mb"] / p["peak_mem_mb"]
            out.append(dict(kernel=d["kernel"], shape=d["shape"], dtype=d["dtype"], mode=d["mode"],
                            dare=d["provider"], peer=p["provider"], peer_mode=p["mode"], peer_ms=p["ms"],
                            dare_ms=d["ms"], ratio=p["ms"] / d["ms"], mem_ratio=mem))
    return out


def _fmt(x, spec: str = ".3f") -> str:
    return "" if x is None or x == "" else format(x, spec)


def markdown(device: str, rows: list[dict], ratio_rows: list[dict]) -> str:
    lines = [f"## Bench ratios on {device} (peer ms / dare ms: > 1 means dare is faster)", "",
             "| shape | dtype | mode | dare | peer (mode) | peer ms | dare ms | ratio | dare / peer peak mem |",
             "|---|---|---|---|---|---:|---:|---:|---:|"]
    for r in ratio_rows:
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['mode']} | {r['dare']} | {r['peer']} ({r['peer_mode']}) | "
                     f"{_fmt(r['peer_ms'])} | {_fmt(r['dare_ms'])} | {_fmt(r['ratio'], '.2f')} | "
                     f"{_fmt(r['mem_ratio'], '.2f')} |")
    if not ratio_rows:
        lines.append("| (no dare row with a measured peer yet) | | | | | | | | |")
    lines += ["", f"## Bench rows on {device}", "",
              "| part | kernel | shape | dtype | provider | mode | ms | TFLOP/s | GB/s | peak MiB | status / reason |",
              "|---|---|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        why = "ok" if r.get("status") == "ok" else f"{r.get('status')}: {str(r.get('reason', ''))[:100]}"
        lines.append(f"| {r.get('part', '')} | {r['kernel']} | {r['shape']} | {r['dtype']} | {r['provider']} | "
                     f"{r['mode']} | {_fmt(r.get('ms'))} | {_fmt(r.get('tflops'), '.1f')} | {_fmt(r.get('gbps'), '.0f')} | "
                     f"{_fmt(r.get('peak_mem_mb'), '.0f')} | {why.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


class Table:
    """The rows of one run, on a time budget; ``run`` measures one row, ``write`` the summary files."""

    def __init__(self, out: Path, device: str, budget_s: float, rows_per_provider: int | None = None):
        self.out, self.device, self.rows = Path(out), device, []
        self.rows_per_provider, self.measured = rows_per_provider, {}
        self.deadline = time.monotonic() + budget_s
        self.device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu (rehearsal)"
        self.jsonl = self.out / "bench_rows.jsonl"
        self.dare_errors = 0

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, row: dict) -> None:
        row = dict(row, device=self.device_name)
        self.rows.append(row)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        ms = f"{row['ms']:.3f} ms" if row.get("ms") is not None else row["status"]
        print(f"  {row['kernel']:<15} {row['shape']:<20} {row.get('dtype', ''):<9} {row['provider']:<20} "
              f"{row['mode']:<12} {ms}" + (f"  ({row['reason']})" if row.get("reason") else ""), flush=True)
        self.write()

    def _skip(self, base: dict, reason: str) -> None:
        self.add(dict(base, status="skipped", reason=reason))

    def run(self, base: dict, make, flops: float, nbytes: float, compiled: bool = False) -> None:
        """Measure one row: ``make()`` returns the zero-argument call (or raises Skip with the reason)."""
        if self.left() <= 0 or (compiled and self.device == "cuda" and self.left() < COMPILE_RESERVE_S):
            return self._skip(base, f"time budget: {max(0.0, self.left()):.0f} s left")
        key = (base.get("part"), base["kernel"], base["provider"])
        if self.rows_per_provider is not None and self.measured.get(key, 0) >= self.rows_per_provider:
            return self._skip(base, f"at most {self.rows_per_provider} rows per provider here")
        self.measured[key] = self.measured.get(key, 0) + 1
        is_dare = str(base["provider"]).startswith("dare_")
        t0 = time.monotonic()
        fn = None
        try:
            fn = make()
            samples = sorted(measure(fn, self.device))
            peak = peak_memory_mb(fn) if self.device == "cuda" else None
        except Skip as why:
            return self._skip(base, str(why))
        except Exception as exc:  # noqa: BLE001 - a failing row is recorded and the table goes on
            if isinstance(exc, NotImplementedError) and not is_dare:  # a peer's documented gap (Flex CPU backward)
                return self._skip(base, f"not supported here: {str(exc)[:160]}")
            if "is not available" in str(exc):  # the library's own "backend=... is not available: why"
                return self._skip(base, str(exc)[:240])
            self.dare_errors += is_dare
            self.add(dict(base, status="error", reason=f"{type(exc).__name__}: {str(exc)[:200]}",
                          wall_s=round(time.monotonic() - t0, 2)))
            if self.device == "cuda":
                torch.cuda.empty_cache()
            return None
        finally:
            close = getattr(fn, "close", None)
            if close is not None:
                close()
        med = samples[len(samples) // 2]
        self.add(dict(base, status="ok", ms=med * 1e3, p20_ms=samples[int(0.2 * (len(samples) - 1))] * 1e3,
                      p80_ms=samples[int(0.8 * (len(samples) - 1))] * 1e3, rounds=len(samples),
                      tflops=flops / med / 1e12 if flops else None, gbps=nbytes / med / 1e9 if nbytes else None,
                      peak_mem_mb=peak, wall_s=round(time.monotonic() - t0, 2)))
        return None

    def write(self) -> None:
        ratio_rows = ratios(self.rows)
        (self.out / "bench.json").write_text(json.dumps({"device": self.device_name, "ratios": ratio_rows,
                                                         "rows": self.rows}, indent=1, default=str))
        with (self.out / "bench_ratios.csv").open("w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=RATIO_COLUMNS, extrasaction="ignore")
            wr.writeheader()
            wr.writerows(ratio_rows)
        with (self.out / "bench.csv").open("w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            wr.writeheader()
            wr.writerows(self.rows)
        (self.out / "bench.md").write_text(markdown(self.device_name, self.rows, ratio_rows))
