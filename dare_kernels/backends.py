"""The backend registry: which backend runs an op here, declared as data, below the public wrappers.

Layers (imports go down only):
    sra.py, cfg.py              public functions: input checks, then ``choose`` and the op call
    backends.py (this)          capabilities per (op, backend), the auto order, unavailable reasons, warn-once,
                                the custom ops of a backend
    triton/<op>.py, _C          the kernels: they define the custom ops and register them with their op module
    ops/<op>.py                 schema text, fake implementations, autograd (shared by every compiled backend)

A capability says what a backend takes (devices, dtypes, head dims) and whether it has been validated on
a GPU; ``unsupported_reason`` turns it, plus what is loaded here, into a reason or None. ``backend="auto"``
tries ``tuning.AUTO_ORDER`` (never a GPU backend that is not validated on a GPU) and otherwise takes the
op's last resort with a one-time warning: the memory-safe PyTorch fallback for SRA attention, the PyTorch
reference for the CFG combine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import _ext, tuning
from ._warn import warn_once
from .ops import rectified_cfg as _cfg_ops
from .ops import resolve_op
from .ops import sra_attention as _sra_ops

__all__ = ["CHOICES", "FLOAT_DTYPES", "Capability", "CAPABILITIES", "capability", "unsupported_reason",
           "auto_order", "choose", "ops_for", "available", "triton_status"]

OPS = ("sra_attention", "rectified_cfg")
# what ``backend=`` accepts in every public function
CHOICES = ("auto", "cpu", "triton", "cuda", "reference")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# what "auto" falls back to when no compiled backend can run the inputs
LAST_RESORT = {"sra_attention": "fallback", "rectified_cfg": "reference"}
_LAST_RESORT_TEXT = {
    "fallback": "the PyTorch fallback (SDPA with the bias; maps and LSE from the reference in row chunks), "
                "which is slow",
    "reference": "the slow PyTorch reference",
}


@dataclass(frozen=True)
class Capability:
    """What one backend of one op takes. ``validated_on_gpu`` is None for a CPU-only backend."""

    op: str
    backend: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    dtype_note: str                     # why another dtype is refused ({dtype} is filled in)
    op_names: tuple[str, ...]           # qualified custom ops: (fwd, bwd) or (fused, stats, combine)
    label: str                          # how messages name the kernels
    max_head_dim: int | None = None     # head dims D and Dv up to this (None: any)
    validated_on_gpu: bool | None = None


_SRA_CPP = ("dare_kernels::sra_attention_fwd", "dare_kernels::sra_attention_bwd")
_CFG_CPP = ("dare_kernels::rectified_cfg_fused", "dare_kernels::rectified_cfg_stats",
            "dare_kernels::rectified_cfg_combine")

CAPABILITIES: tuple[Capability, ...] = (
    Capability("sra_attention", "cpu", ("cpu",), FLOAT_DTYPES, "the CPU kernels take floating-point inputs",
               _SRA_CPP, "C++ SRA"),
    Capability("sra_attention", "cuda", ("cuda",), (torch.float16, torch.bfloat16),
               "the CUDA kernels take float16 and bfloat16, got {dtype} (use backend='triton' for float32, or cast)",
               _SRA_CPP, "CUDA SRA", max_head_dim=256, validated_on_gpu=tuning.CUDA_SRA_VALIDATED_ON_GPU),
    Capability("sra_attention", "triton", ("cuda",), _TRITON_DTYPES,
               "the Triton kernels take float16, bfloat16 and float32",
               ("dare_kernels::sra_attention_fwd_triton", "dare_kernels::sra_attention_bwd_triton"),
               "Triton SRA", validated_on_gpu=True),
    Capability("rectified_cfg", "cpu", ("cpu",), FLOAT_DTYPES, "the CPU kernels take floating-point inputs",
               _CFG_CPP, "C++ rectified-CFG"),
    Capability("rectified_cfg", "cuda", ("cuda",), _TRITON_DTYPES,
               "the CUDA kernels take float16, bfloat16 and float32", _CFG_CPP, "CUDA rectified-CFG",
               validated_on_gpu=tuning.CUDA_CFG_VALIDATED_ON_GPU),
    Capability("rectified_cfg", "triton", ("cuda",), _TRITON_DTYPES,
               "the Triton kernels take float16, bfloat16 and float32",
               ("dare_kernels::rectified_cfg_fused_triton", "dare_kernels::rectified_cfg_stats_triton",
                "dare_kernels::rectified_cfg_combine_triton"),
               "Triton rectified-CFG", validated_on_gpu=True),
)
_BY_KEY = {(c.op, c.backend): c for c in CAPABILITIES}
_REGISTER = {"sra_attention": _sra_ops.register_backend_ops, "rectified_cfg": _cfg_ops.register_backend_ops}


def capability(op: str, backend: str) -> Capability:
    """The declared capability of ``backend`` for ``op`` (KeyError naming both when there is none)."""
    try:
        return _BY_KEY[(op, backend)]
    except KeyError:
        raise KeyError(f"no backend {backend!r} is declared for {op!r}") from None


# ---------------------------------------------------------------------------------------------
# what is loaded here
# ---------------------------------------------------------------------------------------------

def triton_status() -> tuple[bool, str]:
    """(usable, reason). Triton runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 (read live)."""
    try:
        import triton
    except Exception as exc:
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, "TRITON_INTERPRET=1 (CPU interpreter)"
    if not torch.cuda.is_available():
        return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"
    return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"


def _cpp_ops_present(cap: Capability) -> bool:
    return all(hasattr(torch.ops.dare_kernels, name.split("::")[1]) for name in cap.op_names)


def _register_cpp_ops() -> None:
    """Fakes and autograd for the extension's ops (the extension defines them when it loads)."""
    if _ext.EXT is None:
        return
    for op in OPS:
        cap = capability(op, "cpu")
        if _cpp_ops_present(cap):
            _REGISTER[op](*cap.op_names)


def _import_triton_module(op: str):
    # importing the module defines the ops and registers them with their op module
    if op == "sra_attention":
        from .triton import sra_attention as module
    else:
        from .triton import rectified_cfg as module
    return module


def _load_reason(cap: Capability, device: torch.device) -> str | None:
    """Why the backend cannot run on ``device`` because of what is (not) built or installed here."""
    b = cap.backend
    if b == "cpu":
        if device.type != "cpu":
            return f"backend='cpu' needs CPU tensors, got {device}"
        if _ext.EXT is None:
            return f"the compiled extension is not loaded ({_ext.EXT_ERROR})"
        if not _cpp_ops_present(cap):
            return f"the extension has no {cap.op} ops (rebuild it)"
    elif b == "cuda":
        if device.type != "cuda":
            return f"backend='cuda' needs CUDA tensors, got {device}"
        if not _ext.has_cuda_kernels():
            return ("the extension was built without CUDA kernels" if _ext.EXT is not None
                    else f"the compiled extension is not loaded ({_ext.EXT_ERROR})")
    elif b == "triton":
        ok, why = triton_status()
        if not ok:
            return why
        if device.type not in cap.devices and why.startswith("triton "):
            return f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {device}"
    return None


def unsupported_reason(op: str, backend: str, device, dtype: torch.dtype, *, head_dim: int | None = None,
                       head_dim_v: int | None = None) -> str | None:
    """Why ``backend`` cannot run ``op`` on these inputs here, or None when it can.

    Checks what is loaded (extension, CUDA kernels, Triton), then the declared capability (dtype, head dims
    D / Dv where given). A GPU self-check can judge a backend's exception by it: an exception on inputs this
    calls supported is a defect of the backend.
    """
    if backend == "reference":
        return None
    cap = capability(op, backend)
    device = torch.device(device)
    why = _load_reason(cap, device)
    if why is not None:
        return why
    if dtype not in cap.dtypes:
        return cap.dtype_note.format(dtype=dtype)
    if cap.max_head_dim is not None:
        dims = [d for d in (head_dim, head_dim_v) if d is not None]
        if any(d > cap.max_head_dim for d in dims):
            return f"the {cap.label} kernels take head dims up to {cap.max_head_dim}, got {dims}"
    if backend == "triton":
        try:
            _import_triton_module(op)
        except ImportError as exc:
            return f"the {cap.label} kernels are not available ({exc})"
    return None


def available(op: str, backend: str) -> tuple[bool, str]:
    """(usable, why) of ``backend`` for ``op`` on its own device, whatever the dtype (for ``info``)."""
    if backend == "reference":
        return True, "always available (PyTorch ops)"
    cap = capability(op, backend)
    device = torch.device("cpu" if backend == "cpu" else "cuda")
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            return False, why
        if why.startswith("TRITON_INTERPRET"):
            device = torch.device("cpu")
    why = _load_reason(cap, device)
    if why is None and backend == "cuda" and not torch.cuda.is_available():
        why = "no CUDA device"
    if why is not None:
        return False, why
    note = {"cpu": "fused C++ kernels in dare_kernels._C", "triton": triton_status()[1]}.get(backend, "")
    if cap.validated_on_gpu is False:
        why_not = tuning.AUTO_EVIDENCE.get(op, {}).get(backend, "not validated on a GPU")
        note = f"{cap.label} kernels built; {why_not} (only backend='{backend}' selects them)"
    return True, note


# ---------------------------------------------------------------------------------------------
# choice
# ---------------------------------------------------------------------------------------------

def auto_order(op: str, device) -> tuple[str, ...]:
    """Backends ``auto`` tries for ``op`` on ``device``, best first (GPU backends only once validated)."""
    device = torch.device(device)
    order = tuning.AUTO_ORDER.get(op, {}).get(device.type, ())
    if device.type == "cuda":
        order = tuple(b for b in order if capability(op, b).validated_on_gpu)
    return order


# (op, "auto" or "cpu", dtype) -> "cpu" for CPU inputs once the extension's ops were found usable: that cannot change
# within a process, and resolving it again costs over a microsecond per call
_CPU_CHOICE: dict[tuple, str] = {}
# (op, backend, dtype, head_dim, head_dim_v) -> the compiled backend chosen for CUDA inputs: what is built and
# installed cannot change within a process either, and resolving it (the device name, Triton's import) costs
# microseconds per call. Not for CPU tensors on Triton: TRITON_INTERPRET is read live there.
_CUDA_CHOICE: dict[tuple, str] = {}


def choose(op: str, backend: str, device, dtype: torch.dtype, *, head_dim: int | None = None,
           head_dim_v: int | None = None) -> str:
    """The backend that runs ``op`` for inputs on ``device`` / ``dtype``.

    An unknown name raises ValueError, an explicit but unusable backend RuntimeError with the reason;
    ``"auto"`` with nothing usable returns ``LAST_RESORT[op]`` ("fallback" or "reference") after a
    one-time warning that lists why each candidate was skipped.
    """
    if not isinstance(device, torch.device):
        device = torch.device(device)
    cpu_key = (op, backend, dtype) if device.type == "cpu" and backend in ("auto", "cpu") else None
    if cpu_key is not None:  # the per-call fast path (a dict lookup)
        hit = _CPU_CHOICE.get(cpu_key)
        if hit is not None:
            return hit
    cuda_key = (op, backend, dtype, head_dim, head_dim_v) if device.type == "cuda" else None
    if cuda_key is not None:
        hit = _CUDA_CHOICE.get(cuda_key)
        if hit is not None:
            return hit
    if backend not in CHOICES:
        raise ValueError(f"backend must be one of {CHOICES}, got {backend!r}")
    if backend == "reference":
        return "reference"
    shape = dict(head_dim=head_dim, head_dim_v=head_dim_v)
    if backend != "auto":
        why = unsupported_reason(op, backend, device, dtype, **shape)
        if why is not None:
            raise RuntimeError(f"{op}: backend={backend!r} is not available: {why}")
        if cpu_key is not None:
            _CPU_CHOICE[cpu_key] = backend
        if cuda_key is not None:
            _CUDA_CHOICE[cuda_key] = backend
        return backend
    reasons = []
    for candidate in auto_order(op, device):
        why = unsupported_reason(op, candidate, device, dtype, **shape)
        if why is None:
            if cpu_key is not None and candidate == "cpu":
                _CPU_CHOICE[cpu_key] = candidate
            if cuda_key is not None:
                _CUDA_CHOICE[cuda_key] = candidate
            return candidate
        reasons.append(f"{candidate}: {why}")
    last = LAST_RESORT[op]
    warn_once(
        f"{op}-{last}-{device.type}-{dtype}",
        f"dare_kernels.{op}: no compiled backend for {device.type} {dtype} inputs "
        f"({'; '.join(reasons) or 'none exists for this device'}); using {_LAST_RESORT_TEXT[last]}.",
        stacklevel=4,
    )
    return last


_OPS_CACHE: dict[tuple[str, str], tuple] = {}  # resolved OpOverloads (per-call lookups cost microseconds)


def ops_for(op: str, backend: str) -> tuple:
    """The custom ops of a compiled backend: (fwd, bwd) for SRA attention, (fused, stats, combine) for CFG."""
    ops = _OPS_CACHE.get((op, backend))
    if ops is None:
        cap = capability(op, backend)
        direct = {}
        if backend == "triton":  # a module may offer a dispatcher-free twin of an op for eager calls
            direct = getattr(_import_triton_module(op), "DIRECT_OPS", {})
        ops = _OPS_CACHE[(op, backend)] = tuple(direct.get(n) or resolve_op(n) for n in cap.op_names)
    return ops


_register_cpp_ops()
