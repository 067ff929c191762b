"""Declared limits of each backend: what a check may skip as "unsupported" (anything else that raises fails).

``unsupported_reason(op, backend, device, dtype, **shape_info)`` returns why ``backend`` does not take the
case, or None. It combines the availability rules of the wrapper (``dare_kernels.sra._unavailable``:
extension built, device, dtype, Triton importable) with the shape limits declared here. A backend that
raises on a case this says it supports is a failure of the self-check, never a skip.
"""

from __future__ import annotations

import torch

# per (op, backend): the largest head dims (D of query/key, Dv of value), batch and heads a backend takes
SHAPE_LIMITS: dict[tuple[str, str], dict[str, int]] = {
    # csrc/include/sra_attention_params.h kSraMaxHeadDim; grid dimensions y / z of the launch
    ("sra_attention", "cuda"): {"max_D": 256, "max_Dv": 256, "max_B": 65535, "max_H": 65535},
    # the autotuner's configs and the dispatcher's tiles are sized for power-of-two head dims up to 256
    ("sra_attention", "triton"): {"max_D": 256, "max_Dv": 256},
}


def unsupported_reason(op: str, backend: str, device, dtype: torch.dtype, **shape_info) -> str | None:
    """Why ``backend`` does not support this ``op`` case (None: it does, so an exception is a bug).

    shape_info: any of B, H, N, M, D, Dv (ints).
    """
    if op != "sra_attention":
        raise ValueError(f"no capability table for op {op!r}")
    from ..sra import _unavailable

    if backend != "reference":
        why = _unavailable(backend, torch.device(device), dtype)
        if why is not None:
            return why
    for name, limit in SHAPE_LIMITS.get((op, backend), {}).items():
        dim = name[len("max_"):]
        value = shape_info.get(dim)
        if value is not None and value > limit:
            return f"backend={backend!r} takes {dim} <= {limit}, got {dim}={value}"
    return None
