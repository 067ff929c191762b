"""The result CSV: one row per measurement (or skip), appended to ``bench/results/<device-slug>.csv``.

Rows are never overwritten. If a file was written with an older column set, the file is rewritten
once with the union of columns, keeping every old row (missing values stay empty).
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Iterable, Mapping

COLUMNS: tuple[str, ...] = (
    "run_id", "timestamp", "kernel", "provider", "mode", "metric", "unit", "shape", "dims", "dtype",
    "status", "reason", "p50", "p20", "p80", "mean", "rounds", "flops", "bytes", "peak_mem_bytes",
    "peak_mem_method", "scale", "timer", "group", "test", "device", "device_type", "threads", "torch", "triton", "commit",
    "cpu_path",
)

NUMERIC = ("p50", "p20", "p80", "mean", "rounds", "flops", "bytes", "peak_mem_bytes", "scale", "threads")


_DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
                  "f16": "float16", "bf16": "bfloat16", "fp64": "float64", "double": "float64"}


def normalize_dtype(name) -> str:
    """Canonical dtype name of a row: "torch.bfloat16", "bf16" -> "bfloat16" (so rows of different files pair)."""
    s = str(name or "").replace("torch.", "").strip()
    return _DTYPE_ALIASES.get(s.lower(), s)


def slugify(text: str) -> str:
    """Lower-case file-name-safe slug: runs of anything but [a-z0-9] become one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cpu_model_name() -> str:
    """CPU model from /proc/cpuinfo ("model name"), falling back to platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device_type: str) -> str:
    """Human name of the device that runs ``device_type`` ("cpu" or "cuda") tensors."""
    if device_type == "cuda":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.cuda.current_device())
        return "cuda (unavailable)"
    return cpu_model_name()


def slug_for(device_type: str, name: str) -> str:
    """``<device_type>-<slug of name>``, e.g. ``cpu-amd-epyc`` or ``cuda-nvidia-h100-80gb-hbm3``."""
    name = slugify(name)
    return name if name.startswith(device_type) else f"{device_type}-{name}"


def device_slug(device_type: str) -> str:
    """File stem of this machine's CSV for ``device_type`` ("cpu" or "cuda")."""
    return slug_for(device_type, device_name(device_type))


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """Short commit hash of the checkout, with "-dirty" when tracked files differ from it; "" outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        if not sha:
            return ""
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device_type: str, cwd: str | os.PathLike | None = None) -> dict[str, str]:
    """The columns every row of one run shares: device, versions, commit, thread count."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        triton_version = ""
    return {
        "device": device_name(device_type),
        "device_type": device_type,
        "threads": str(torch.get_num_threads()) if device_type == "cpu" else "",
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": git_commit(cwd),
        "cpu_path": cpu_path() if device_type == "cpu" else "",
    }


def cpu_path() -> str:
    """The CPU SRA path per dtype as this process runs it ("float32: avx2 / ...; bfloat16: ..."), from the
    extension (ISA and product kernel after the switches); empty without the extension."""
    try:
        from .. import _ext
    except Exception:  # noqa: BLE001 - a report row says "unknown" rather than failing the run
        return ""
    paths = _ext.cpu_paths()
    return "; ".join(f"{k.removeprefix('cpu_path_')}: {v}" for k, v in paths.items())


def new_run_id() -> str:
    """Identifier shared by every row of one benchmark session (UTC time + pid)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def append_rows(path: str | os.PathLike, rows: Iterable[Mapping[str, object]]) -> int:
    """Append ``rows`` (dicts keyed by column) to the CSV at ``path``; create it with a header if new.

    Unknown keys become extra columns after ``COLUMNS``. Returns the number of rows written.
    """
    rows = [dict(r) for r in rows]
    if not rows:
        return 0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wanted = list(COLUMNS)
    for r in rows:
        wanted += [k for k in r if k not in wanted]
    if path.exists() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        missing = [c for c in wanted if c not in header]
        if missing:  # migrate once: union of columns, every old row kept
            old = read_rows(path, numeric=False)
            header = header + missing
            tmp = path.with_suffix(path.suffix + ".tmp")
            with tmp.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=header)
                w.writeheader()
                for r in old:
                    w.writerow({k: r.get(k, "") for k in header})
            os.replace(tmp, path)
        fieldnames = header
        mode = "a"
    else:
        fieldnames = wanted
        mode = "w"
    with path.open(mode, newline="") as f:
        w = csv.DictWriter(f, fieldnames=fieldnames)
        if mode == "w":
            w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in fieldnames})
    return len(rows)


def read_rows(path: str | os.PathLike, numeric: bool = True) -> list[dict]:
    """Rows of a result CSV as dicts; with ``numeric`` the NUMERIC columns are floats (None if empty)."""
    with Path(path).open(newline="") as f:
        rows = list(csv.DictReader(f))
    if numeric:
        for r in rows:
            for k in NUMERIC:
                v = r.get(k)
                if v is None or v == "":
                    r[k] = None
                else:
                    try:
                        r[k] = float(v)
                    except ValueError:
                        r[k] = None
    return rows


# ---------------------------------------------------------------------------------------------
# complete and partial runs
# ---------------------------------------------------------------------------------------------

# The row that marks a run complete: appended by ``dare-kernels bench`` once its pytest run has ended on its
# own (a run cut off by Ctrl-C, a kill at a time limit or a crash never gets one). Rows of a run are appended as
# they are measured, so without this mark a cut-off run would look like a finished one.
RUN_END = {"kernel": "run", "provider": "dare-kernels bench", "mode": "end", "metric": "run", "status": "complete"}


def is_run_end(row: Mapping[str, object]) -> bool:
    return row.get("kernel") == RUN_END["kernel"] and row.get("status") == RUN_END["status"]


def mark_run_complete(path: str | os.PathLike, run_id: str, note: str = "") -> bool:
    """Append the end-of-run row of ``run_id`` to the CSV at ``path`` when the file holds rows of that run.

    The row copies the run's device columns, so the report groups it with them. Returns whether it was written.
    """
    path = Path(path)
    if not path.is_file():
        return False
    mine = [r for r in read_rows(path, numeric=False) if r.get("run_id") == run_id]
    if not mine:
        return False
    shared = {k: mine[0].get(k, "") for k in ("device", "device_type", "threads", "torch", "triton", "commit")}
    append_rows(path, [dict(shared, **RUN_END, run_id=run_id, timestamp=utc_now(), reason=note)])
    return True


def complete_runs(rows: Iterable[Mapping[str, object]]) -> set[str]:
    """Run ids that have their end-of-run row."""
    return {str(r.get("run_id") or "") for r in rows if is_run_end(r)}


# ---------------------------------------------------------------------------------------------
# the device check's bench.csv (tools/gpu_check_bench.py), committed under bench/results/<run>/
# ---------------------------------------------------------------------------------------------

DEVICE_CHECK_COLUMNS = ("kernel", "shape", "dims", "dtype", "provider", "mode", "status", "ms", "p20_ms", "p80_ms")


def is_device_check_csv(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a device check's bench.csv (times in ms, no run id) rather than a result CSV."""
    with Path(path).open(newline="") as f:
        header = next(csv.reader(f), [])
    return "run_id" not in header and all(c in header for c in DEVICE_CHECK_COLUMNS)


def _float(v) -> float | None:
    try:
        return float(v) if v not in (None, "") else None
    except ValueError:
        return None


def read_device_check(path: str | os.PathLike) -> list[dict]:
    """Rows of a device check's bench.csv in the result-CSV columns (seconds; numeric columns as floats).

    Versions, device and commit come from the env.json beside it (its ``commit`` field is the project's; a
    corrected one keeps the recorded value as ``commit_recorded``). The file is written when the bench stage
    ends (rows measured so far go to bench_rows.jsonl), so the run it holds is complete: an end-of-run row is
    added. Its run id is ``<date>-device-check`` (the date of env.json, else the folder name).
    """
    import json

    path = Path(path)
    env_path = path.with_name("env.json")
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    date = str(env.get("date_utc") or "")
    stamp = re.sub(r"[^0-9TZ]", "", date) if date else path.parent.name
    run_id = f"{stamp}-device-check"
    with path.open(newline="") as f:
        raw = list(csv.DictReader(f))
    shared = {"run_id": run_id, "timestamp": date, "device_type": "cuda" if env.get("cuda_available", True) else "cpu",
              "torch": str(env.get("torch") or ""), "triton": str(env.get("triton") or ""),
              "commit": str(env.get("commit") or "unknown"), "threads": None}
    rows = []
    for r in raw:
        ms, p20, p80 = (_float(r.get(k)) for k in ("ms", "p20_ms", "p80_ms"))
        t = ms / 1e3 if ms is not None else None
        tflops, gbps = _float(r.get("tflops")), _float(r.get("gbps"))
        rows.append(dict(shared, kernel=r.get("kernel", ""), provider=r.get("provider", ""), mode=r.get("mode", ""),
                         metric="time", unit="s", shape=r.get("shape", ""), dims=r.get("dims", ""),
                         dtype=normalize_dtype(r.get("dtype")), status=r.get("status", ""),
                         reason=r.get("reason", ""), p50=t, p20=p20 / 1e3 if p20 is not None else None,
                         p80=p80 / 1e3 if p80 is not None else None, mean=None, rounds=_float(r.get("rounds")),
                         flops=tflops * 1e12 * t if tflops and t else None,
                         bytes=gbps * 1e9 * t if gbps and t else None, peak_mem_bytes=_float(r.get("peak_mem_bytes")),
                         timer="cuda events, L2 flushed", test="device check",
                         device=r.get("device") or str(env.get("device") or "")))
    device = next((r["device"] for r in rows if r["device"]), str(env.get("device") or ""))
    rows.append(dict(shared, **RUN_END, device=device, reason=f"{path.name} is written at the end of the bench stage"))
    return rows


def read_results(path: str | os.PathLike) -> list[dict]:
    """Rows of a result CSV or of a device check's bench.csv, in the result-CSV columns (numeric as floats)."""
    return read_device_check(path) if is_device_check_csv(path) else read_rows(path)
