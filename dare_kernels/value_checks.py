"""Checks that read tensor values (docs/SPEC.md §1.1): token weights must be finite and non-negative.

Reading values is free on CPU tensors and costs a host synchronisation on a GPU (and breaks CUDA graph
capture), so the checks run on CPU tensors always and on other devices only with
``DARE_KERNELS_CHECK_INPUTS=1``; never on meta tensors or while torch.compile traces.
"""

from __future__ import annotations

import torch

from . import switches

__all__ = ["reads_values", "check_weight_values"]


def reads_values(t: torch.Tensor) -> bool:
    """Whether a wrapper reads ``t``'s values: CPU always, GPU only with DARE_KERNELS_CHECK_INPUTS=1."""
    if t.device.type == "meta" or torch.compiler.is_compiling():
        return False
    if t.device.type == "cpu":
        return True
    return bool(switches.get("DARE_KERNELS_CHECK_INPUTS"))


def check_weight_values(w: torch.Tensor, name: str, *, force: bool = False) -> None:
    """Raise ValueError naming ``name`` when ``w`` holds NaN, ±inf or a negative value.

    Runs when :func:`reads_values` says so, or always with ``force=True`` (a caller that syncs anyway).
    One reduction decides (one host sync on a GPU); the message then says which kind of value was found.
    """
    if not (force or reads_values(w)):
        return
    wd = w.detach()
    if bool((~torch.isfinite(wd) | (wd < 0)).any()):
        found = [kind for kind, bad in (("NaN", torch.isnan(wd)), ("infinite", torch.isinf(wd)),
                                        ("negative", wd < 0)) if bool(bad.any())]
        raise ValueError(f"{name} must be finite and >= 0 (0 drops a key; docs/SPEC.md §1.1), "
                         f"found {' and '.join(found)} values")
