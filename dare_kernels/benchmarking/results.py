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
    }


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
