"""Loading the compiled extension ``dare_kernels._C``, only where it can run correctly.

Importing the package never fails because of the extension. It is not loaded (``EXT`` is None,
``EXT_ERROR`` says why, and ``backend="auto"`` takes the PyTorch fallback) when:
- ``DARE_KERNELS_DISABLE_EXT=1``;
- the CPU lacks what the build was compiled for (x86-64: AVX2, FMA and F16C): importing it would end in
  SIGILL, so it is not imported at all;
- it fails to import (not built; an undefined symbol: built against another torch);
- it was built against another torch than the one running (recorded in ``_C.build_info()``).
The last three, and a CPU without the ISA, each give one RuntimeWarning that names the fix.
"""

from __future__ import annotations

import functools
import importlib
import platform

import torch

from . import switches
from ._warn import warn_once

EXT = None
EXT_ERROR: str | None = None
# set when the extension and the running torch disagree: {"built": version, "running": version}
TORCH_MISMATCH: dict | None = None

REBUILD = "rebuild it against this torch: `pip install --no-build-isolation -e .` (or `make setup`)"
# instruction-set extensions the x86-64 build is compiled with (CMakeLists.txt: -mavx2 -mfma -mf16c)
X86_REQUIRED_FLAGS = ("avx2", "fma", "f16c")
CPUINFO = "/proc/cpuinfo"


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), or None where that cannot be read."""
    try:
        with open(CPUINFO) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def missing_cpu_features() -> list[str]:
    """Instruction-set extensions the build needs and this CPU lacks (empty: fine, or not x86-64)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    flags = cpu_flags()
    if flags is None:  # no /proc/cpuinfo: PyTorch's own dispatch probe (AVX2 there implies FMA; F16C unknown)
        cap = torch.backends.cpu.get_cpu_capability()
        return [] if cap in ("AVX2", "AVX512") else ["avx2", "fma"]
    return [f for f in X86_REQUIRED_FLAGS if f not in flags]


def _base_version(v: str) -> str:
    return str(v).split("+")[0]


def _load() -> None:
    global EXT, EXT_ERROR, TORCH_MISMATCH
    if switches.get("DARE_KERNELS_DISABLE_EXT"):
        EXT_ERROR = "disabled by DARE_KERNELS_DISABLE_EXT=1"
        return
    missing = missing_cpu_features()
    if missing:
        EXT_ERROR = (f"this CPU lacks {', '.join(missing)}, which the x86-64 build of dare_kernels._C needs "
                     f"({', '.join(X86_REQUIRED_FLAGS)}); the extension was not imported")
        warn_once("ext-cpu-isa", f"dare_kernels: {EXT_ERROR}. Every op runs on the PyTorch fallback (slow).")
        return
    try:
        ext = importlib.import_module("dare_kernels._C")
    except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
        EXT_ERROR = f"{type(exc).__name__}: {exc}"
        if "undefined symbol" in str(exc):
            TORCH_MISMATCH = {"built": "unknown (the extension does not load)", "running": str(torch.__version__)}
            warn_once("ext-torch-abi",
                      f"dare_kernels: the compiled extension does not load with torch {torch.__version__} "
                      f"(undefined symbol: it was built against another torch); {REBUILD}. "
                      "Until then every op runs on the PyTorch fallback (slow).")
        return
    built = str(dict(ext.build_info()).get("torch_version", "unknown"))
    if built != "unknown" and _base_version(built) != _base_version(torch.__version__):
        TORCH_MISMATCH = {"built": built, "running": str(torch.__version__)}
        EXT_ERROR = f"built against torch {built}, running torch {torch.__version__}"
        warn_once("ext-torch-abi",
                  f"dare_kernels: the compiled extension was built against torch {built} but torch "
                  f"{torch.__version__} is running; {REBUILD}. Until then it is not used and every op runs on "
                  "the PyTorch fallback (slow).")
        return
    EXT = ext


_load()


@functools.lru_cache(maxsize=None)
def _static_build_info() -> dict:
    return dict(EXT.build_info())


def cpu_paths() -> dict:
    """The CPU SRA forward's path per input dtype as the switches stand now, {"cpu_path_float32": "<ISA of
    the softmax rows> / <product kernel>", ... bfloat16, float16} (e.g. "avx2 / cpublas::brgemm (amx-bf16,
    packed)"); empty when the extension is not loaded or predates cpu_paths()."""
    if EXT is None or not hasattr(EXT, "cpu_paths"):
        return {}
    names = {"Float": "float32", "BFloat16": "bfloat16", "Half": "float16"}
    return {f"cpu_path_{names.get(k, k)}": v for k, v in dict(EXT.cpu_paths()).items()}


def build_info() -> dict:
    """What the compiled extension was built with, and the CPU path each dtype takes now (cpu_paths();
    empty when the extension is not loaded)."""
    if EXT is None:
        return {}
    return {**_static_build_info(), **cpu_paths()}


def has_cpu_kernels() -> bool:
    return EXT is not None


def has_cuda_kernels() -> bool:
    return EXT is not None and bool(build_info().get("with_cuda", False))
