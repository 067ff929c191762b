"""Loading the compiled extension ``dare_kernels._C`` and telling which backends are usable.

Importing the package never fails because of the extension: when it is missing or broken,
``EXT`` is None, ``EXT_ERROR`` says why, and every op falls back to the reference backend
with a one-time warning.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

from . import switches

EXT = None
EXT_ERROR: str | None = None

if switches.get("DARE_KERNELS_DISABLE_EXT"):
    EXT_ERROR = "disabled by DARE_KERNELS_DISABLE_EXT=1"
else:
    try:
        EXT = importlib.import_module("dare_kernels._C")
    except Exception as exc:  # ImportError, or an undefined symbol from a torch mismatch
        EXT_ERROR = f"{type(exc).__name__}: {exc}"


@functools.lru_cache(maxsize=None)
def build_info() -> dict:
    """What the compiled extension was built with (empty when it is not loaded)."""
    if EXT is None:
        return {}
    return dict(EXT.build_info())


def has_cpu_kernels() -> bool:
    return EXT is not None


def has_cuda_kernels() -> bool:
    return EXT is not None and bool(build_info().get("with_cuda", False))


def triton_status() -> tuple[bool, str]:
    """(usable, reason). Triton runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, "TRITON_INTERPRET=1 (CPU interpreter)"
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"
    return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Emit ``message`` as a RuntimeWarning once per process for ``key``."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve_backend(op: str, backend: str, choices: tuple[str, ...], device, dtype, unavailable, auto_order) -> str:
    """The backend an op runs for inputs on ``device`` / ``dtype``.

    ``unavailable(name, device, dtype)`` says why a backend cannot run (None when it can);
    ``auto_order`` lists what ``"auto"`` tries, best first. An explicit but unusable backend raises;
    ``"auto"`` with nothing usable falls back to ``"reference"`` with a one-time warning.
    """
    if backend not in choices:
        raise ValueError(f"backend must be one of {choices}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend != "auto":
        why = unavailable(backend, device, dtype)
        if why is not None:
            raise RuntimeError(f"{op}: backend={backend!r} is not available: {why}")
        return backend
    reasons = []
    for candidate in auto_order:
        why = unavailable(candidate, device, dtype)
        if why is None:
            return candidate
        reasons.append(f"{candidate}: {why}")
    warn_once(
        f"{op}-ref-{device.type}-{dtype}",
        f"dare_kernels.{op}: no compiled backend for {device.type} {dtype} inputs "
        f"({'; '.join(reasons) or 'none exists for this device'}); using the slow PyTorch reference.",
    )
    return "reference"


def common_unavailable(backend: str, device, dtype) -> str | None:
    """Device, extension and Triton checks every op's backends share (op-specific checks follow them).

    Returns why ``backend`` cannot run on ``device`` / ``dtype`` here, or None when these checks pass.
    """
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend='cpu' needs CPU tensors, got {device}"
        if EXT is None:
            return f"the compiled extension is not loaded ({EXT_ERROR})"
    elif backend == "cuda":
        if device.type != "cuda":
            return f"backend='cuda' needs CUDA tensors, got {device}"
        if not has_cuda_kernels():
            return "the extension was built without CUDA kernels" if EXT is not None else \
                f"the compiled extension is not loaded ({EXT_ERROR})"
    elif backend == "triton":
        ok, why = triton_status()
        if not ok:
            return why
        if device.type != "cuda" and why.startswith("triton "):
            return f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {device}"
        if dtype == torch.float64:
            return "the Triton kernels take float16, bfloat16 and float32"
    return None
