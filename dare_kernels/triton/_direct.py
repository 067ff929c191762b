"""When an eager call may skip the custom-op layers and call a Triton op's body directly.

``torch.library.custom_op``'s Python layers (argument defaults, ADInplaceOrView, the autograd wrapper, the
aliasing check) cost tens of µs of host time per call (tools/host_overhead.py), more than a small kernel takes on
a GPU. The Triton modules offer dispatcher-free twins of their ops (``DIRECT_OPS``, read by
dare_kernels/backends.py) that call the body directly when nothing between the caller and the kernels needs the
dispatcher, and the registered op otherwise.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def direct_ok(tensors, needs_grad: bool = False) -> bool:
    """Whether a call on ``tensors`` may bypass the registered op: not under torch.compile, no gradient to
    record, plain tensors (no FakeTensor or subclass), no torch function or dispatch mode (FlopCounterMode,
    FakeTensorMode), no functorch transform (vmap, grad)."""
    if needs_grad or torch.compiler.is_compiling():
        return False
    if torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active():
        return False
    if _get_current_dispatch_mode() is not None:
        return False
    return all(t is None or type(t) is torch.Tensor for t in tensors)
