"""The custom ops' shared parts, one module per op: schema text, fake implementations and autograd.

Every compiled backend (C++ in dare_kernels._C, Triton in dare_kernels/triton/) defines its ops with the
schema documented in its op module and calls that module's ``register_backend_ops`` with their names.
These modules import nothing of the package but each other's leaves: backends and wrappers build on them.
"""

from __future__ import annotations

import torch


def resolve_op(qualname: str):
    """The default overload of a registered custom op, e.g. ``"dare_kernels::sra_attention_fwd"``."""
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name).default
