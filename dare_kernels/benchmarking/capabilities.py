"""What a check may skip as "unsupported" (anything else a backend raises fails): the backend registry's
declared capabilities, plus the shape limits it does not declare yet.

``unsupported_reason(op, backend, device, dtype, **shape_info)`` returns why ``backend`` does not take the
case, or None: ``dare_kernels.backends.unsupported_reason`` (extension / CUDA kernels / Triton loaded,
device, dtype, head dims D and Dv) and then ``SHAPE_LIMITS``. A backend that raises on a case this says it
supports is a failure of the self-check and of the conformance test, never a skip.
"""

from __future__ import annotations

import torch

from .. import backends

# per (op, backend): limits beyond the registry's head dims, as max_<dim> for a shape_info key <dim>
SHAPE_LIMITS: dict[tuple[str, str], dict[str, int]] = {
    # grid dimensions y / z of the CUDA launch (python/cuda/sra_attention_cuda.cpp checks them)
    ("sra_attention", "cuda"): {"max_B": 65535, "max_H": 65535},
}


def unsupported_reason(op: str, backend: str, device, dtype: torch.dtype, **shape_info) -> str | None:
    """Why ``backend`` does not support this ``op`` case (None: it does, so an exception is a bug).

    shape_info: any of B, H, N, M, D, Dv (ints).
    """
    why = backends.unsupported_reason(op, backend, device, dtype, head_dim=shape_info.get("D"),
                                      head_dim_v=shape_info.get("Dv"))
    if why is not None:
        return why
    for name, limit in SHAPE_LIMITS.get((op, backend), {}).items():
        dim = name[len("max_"):]
        value = shape_info.get(dim)
        if value is not None and value > limit:
            return f"backend={backend!r} takes {dim} <= {limit}, got {dim}={value}"
    return None
