"""Every environment switch of dare_kernels in one table, and the one parser of the Python-side ones.

Scopes: ``build`` (setup.py, tools/setup_env.sh; setup.py cannot import the package, so it reads its own
switches, named here), ``python`` (read by this package at run time), ``cpp`` (read by the compiled
extension; ``dare_kernels._C.cpu_switches()`` reports what it resolved), ``bench`` (the benchmark harness),
``test`` (the test suite). Audience: ``user`` switches are few and documented for users; ``measurement``
switches exist to compare code paths in tests and benchmarks and may change without notice.

Python-side values are parsed once, on first use, and cached; ``reload()`` re-reads the environment (and
asks the extension to re-read its own). ``python -m dare_kernels info`` prints ``resolved()``.
Variables named by other projects (TRITON_INTERPRET, ATEN_CPU_CAPABILITY, ...) keep their names; the
ones this package reacts to are listed in ``FOREIGN``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

__all__ = ["Switch", "TABLE", "FOREIGN", "get", "reload", "resolved", "markdown_table"]

PREFIX = "DARE_KERNELS_"
SCOPES = ("build", "python", "cpp", "bench", "test")


@dataclass(frozen=True)
class Switch:
    """One environment switch: ``allowed`` is a tuple of strings, or "bool" / "int" / "float" / "path" / "str"."""

    name: str
    default: str
    allowed: Any
    scope: str
    audience: str  # "user" or "measurement"
    doc: str


_BOOL = "bool"

TABLE: tuple[Switch, ...] = (
    # --- user-facing -------------------------------------------------------------------------------------
    Switch("DARE_KERNELS_BUILD_EXT", "1", _BOOL, "build", "user",
           "0 installs the pure-Python package (no compiled kernels)"),
    Switch("DARE_KERNELS_CUDA", "auto", ("auto", "0", "1"), "build", "user",
           "build the CUDA kernels: auto = when torch has CUDA and nvcc is found"),
    Switch("DARE_KERNELS_REQUIRE_EXT", "1", _BOOL, "test", "user",
           "1: the tests require the compiled extension to load; 0 lets a pure-Python install pass them (a failed extension build fails the install either way)"),
    Switch("DARE_KERNELS_BUILD_DIR", "build/cmake-<python, torch, cpu or cuda>", "path", "build", "user",
           "CMake build folder, kept between builds"),
    Switch("DARE_KERNELS_OFFLINE", "0", _BOOL, "build", "user",
           "make setup without a package index: build with what is installed"),
    Switch("DARE_KERNELS_DISABLE_EXT", "0", _BOOL, "python", "user",
           "1 does not load the compiled extension (PyTorch fallback); read when the package is imported"),
    Switch("DARE_KERNELS_CPU_ISA", "auto", ("auto", "avx2", "avx512"), "cpp", "user",
           "CPU vector path: avx2 keeps the kernels on the build's at::vec (AVX2) code, avx512 requires AVX-512"),
    Switch("DARE_KERNELS_CPU_BF16_DOT", "auto", ("auto", "0", "qk", "1"), "cpp", "user",
           "bf16 SRA block products with AVX512-BF16: auto = where the CPU has it, 0 = fp32 products, qk = S only"),
    Switch("DARE_KERNELS_CHECK_INPUTS", "0", _BOOL, "python", "user",
           "1 also checks GPU token weights for NaN / inf / negative values (a host sync per call; CPU: always)"),
    Switch("DARE_KERNELS_CPU_GEMM", "auto", ("auto", "native", "brgemm"), "cpp", "user",
           "bf16/fp16 SRA block products: auto = PyTorch's cpublas::brgemm (AMX tiles via oneDNN) where the CPU packs "
           "for the dtype, else native (our own products); brgemm forces cpublas::brgemm"),
    Switch("DARE_KERNELS_BENCH_QUICK", "1", _BOOL, "bench", "user",
           "dare-kernels bench / make bench run the quick, time-budgeted suite; 0 runs the full one (make bench-full)"),
    # --- measurement-only --------------------------------------------------------------------------------
    Switch("DARE_KERNELS_TRITON_AUTOTUNE", "0", _BOOL, "python", "measurement",
           "1 autotunes the Triton SRA kernels once per size class; 0 launches the sweep table's (else the first "
           "spill-free) configuration: one compile per kernel (read at import)"),
    Switch("DARE_KERNELS_CPU_ROWS", "auto", ("auto", "avx512f"), "cpp", "measurement",
           "avx512f runs the fp32 softmax rows built without AVX512-BF16 on a CPU that has it"),
    Switch("DARE_KERNELS_CPU_BLAS", "auto", ("auto", "fallback"), "cpp", "measurement",
           "fallback uses the built-in block products instead of libtorch's sgemm_ / oneDNN brgemm"),
    Switch("DARE_KERNELS_CPU_BRGEMM", "1", _BOOL, "cpp", "measurement",
           "0 takes MKL's sgemm_ instead of oneDNN's brgemm for the fp32 forward block products"),
    Switch("DARE_KERNELS_CPU_HUGE_PAGES", "1", _BOOL, "cpp", "measurement",
           "0 stops advising transparent huge pages for large outputs (read once per process)"),
    Switch("DARE_KERNELS_CPU_STREAM_OUT_BYTES", str(48 << 20), "int", "cpp", "measurement",
           "outputs from this many bytes are written with non-temporal stores"),
    Switch("DARE_KERNELS_CPU_SCORE_BLOCK", "262144", "int", "cpp", "measurement",
           "elements of a CPU SRA score block plus its map rows (values below 1024 keep the default)"),
    Switch("DARE_KERNELS_CUDA_SRA_PATH", "auto", ("auto", "exact", "online"), "cpp", "measurement",
           "forces the exact-softmax or the online-softmax CUDA SRA forward"),
    Switch("DARE_KERNELS_CUDA_CFG_PATH", "auto", ("auto", "single_pass", "two_pass"), "cpp", "measurement",
           "forces one launch path of the CUDA rectified-CFG combine"),
    Switch("DARE_KERNELS_BENCH_FLOORS", "measured", ("measured", "tiny"), "bench", "measurement",
           "tiny: placeholder floors for tests of the report plumbing (numbers meaningless)"),
    Switch("DARE_KERNELS_BENCH_CSV_DIR", "bench/results/local", "path", "bench", "measurement",
           "where benchmark runs append their CSV rows (untracked; the committed bench/results/ with --publish)"),
    Switch("DARE_KERNELS_BENCH_RUN_ID", "<timestamp>", "str", "bench", "measurement",
           "run id written with every CSV row"),
    Switch("DARE_KERNELS_BENCH_BUDGET_S", "0", "float", "bench", "measurement",
           "time budget of a benchmark run in seconds (0 = the command's default: 200 quick on CPU, none full)"),
    Switch("DARE_KERNELS_AOT_CACHE", "<~/.cache/dare_kernels>", "path", "test", "measurement",
           "folder of python -m dare_kernels.triton.aot_check's cache of compiled-resource rows"),
)

# variables named by their owners that change what dare_kernels does (printed by ``info``, never renamed)
FOREIGN: tuple[tuple[str, str], ...] = (
    ("TRITON_INTERPRET", "1 runs the Triton kernels on CPU tensors (Triton's interpreter); read live"),
    ("ATEN_CPU_CAPABILITY", "default / avx2 keep PyTorch, and the CPU kernels' AVX-512 paths, below AVX-512"),
    ("MAX_JOBS", "parallel compile jobs of the extension build"),
    ("CUDA_HOME", "CUDA toolkit root for the CUDA build"),
)

_BY_NAME = {s.name: s for s in TABLE}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_cache: dict[str, Any] = {}


def spec(name: str) -> Switch:
    """The table entry of ``name`` (KeyError for a name that is not in the table)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"{name} is not a dare_kernels switch (see dare_kernels/switches.py)") from None


def _parse(s: Switch, raw: str | None) -> Any:
    if raw is None or raw.strip() == "":  # set but empty reads as unset
        raw = s.default
    raw = raw.strip()
    if s.allowed == _BOOL:
        low = raw.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"{s.name} must be 0 or 1 (also true/false, yes/no, on/off), got {raw!r}")
    if s.allowed == "int":
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{s.name} must be an integer, got {raw!r}") from None
    if s.allowed == "float":
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{s.name} must be a number, got {raw!r}") from None
    if isinstance(s.allowed, tuple):
        if raw not in s.allowed:
            raise ValueError(f"{s.name} must be one of {', '.join(s.allowed)}, got {raw!r}")
    return raw


def get(name: str) -> Any:
    """The parsed value of a Python-side switch (bool, int, float or str), read once and cached.

    None for an unset switch whose default is computed by its reader (shown as ``<...>`` in the table).
    Raises ValueError naming the switch for a value it does not take.
    """
    if name in _cache:
        return _cache[name]
    s = spec(name)
    raw = os.environ.get(name)
    if s.default.startswith("<") and (raw is None or not raw.strip()):
        value = None
    else:
        value = _parse(s, raw)
    _cache[name] = value
    return value


def reload() -> None:
    """Forget the cached values (re-read on next use) and ask the extension to re-read its switches.

    Switches documented as read at import (DARE_KERNELS_DISABLE_EXT, DARE_KERNELS_TRITON_AUTOTUNE) keep the
    effect they had when the package (or the Triton module) was imported.
    """
    _cache.clear()
    ext = _loaded_extension()
    if ext is not None:
        ext.reload_cpu_switches()


def _loaded_extension():
    # the extension as dare_kernels._ext accepted it; never imported from here (_ext imports this module,
    # and decides whether the extension may load at all)
    ext_module = sys.modules.get("dare_kernels._ext")
    return getattr(ext_module, "EXT", None)


def resolved() -> dict[str, dict[str, str]]:
    """{name: {"value", "source", "scope", "audience"}} for every switch in the table.

    source: "env" (set in the environment), "default", or "extension" (the value the compiled extension
    resolved, from ``_C.cpu_switches()``). Build and bench switches show the environment or the default.
    """
    ext = _loaded_extension()
    cpp = {}
    if ext is not None:
        cpp = {str(k): str(v) for k, v in dict(ext.cpu_switches()).items()}
    out = {}
    for s in TABLE:
        raw = os.environ.get(s.name)
        if s.name in cpp:
            value, source = cpp[s.name], "extension"
        elif s.scope == "python":
            try:
                value, source = _text(get(s.name)), "env" if raw is not None else "default"
            except ValueError as exc:
                value, source = f"invalid ({exc})", "env"
        else:
            value, source = (raw, "env") if raw is not None else (s.default, "default")
        out[s.name] = {"value": value, "source": source, "scope": s.scope, "audience": s.audience}
    for name, _doc in FOREIGN:
        raw = os.environ.get(name)
        out[name] = {"value": "" if raw is None else raw, "source": "env" if raw is not None else "unset",
                     "scope": "foreign", "audience": "user"}
    return out


def _text(value: Any) -> str:
    return ("1" if value else "0") if isinstance(value, bool) else str(value)


def _allowed_text(s: Switch) -> str:
    if s.allowed == _BOOL:
        return "0, 1"
    if isinstance(s.allowed, tuple):
        return ", ".join(s.allowed)
    return f"*{s.allowed}*"


def markdown_table() -> str:
    """The README's switch table: user-facing switches first, then the measurement-only ones."""
    lines = ["| switch | default | values | scope | what it does |", "| --- | --- | --- | --- | --- |"]
    for audience, title in (("user", None), ("measurement", "**measurement only** (tests, benchmarks)")):
        if title:
            lines.append(f"| {title} | | | | |")
        for s in TABLE:
            if s.audience == audience:
                lines.append(f"| `{s.name}` | `{s.default}` | {_allowed_text(s)} | {s.scope} | {s.doc} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m dare_kernels.switches: print the README table
    print(markdown_table())
