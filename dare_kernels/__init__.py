"""dare_kernels: fused kernels for DARE text-to-video diffusion.

Public API:
    sra_attention      cross-attention with a per-text-token bias γ·log w and a head-averaged map (SPEC §1)
    info               which backends are usable here, and why not
"""

from __future__ import annotations

from . import _ext, switches
from .sra import sra_attention

__version__ = "0.1.0"

__all__ = ["sra_attention", "info", "__version__"]

# --- rectified CFG combine (SPEC §2) ---
from .cfg import rectified_cfg  # noqa: E402

__all__ += ["rectified_cfg"]



# --- DR-CFG token density, suppression, consistency loss (SPEC §3, §4) ---
from .density import TokenDensity
from .losses import sra_consistency_loss
from .suppression import (DegradedPrompt, Suppressed, TokenSuppressor, build_degraded_branch,
                          prompt_dropout)

__all__ += ["TokenDensity", "TokenSuppressor", "Suppressed", "prompt_dropout", "build_degraded_branch",
            "DegradedPrompt", "sra_consistency_loss"]



# --- diffusers integration ---
# lazy: `import dare_kernels` must not import diffusers / matplotlib (PEP 562 module __getattr__)
_LAZY_DIFFUSERS = {
    "apply_dare": "dare_kernels.integrations.diffusers",
    "DAREHandle": "dare_kernels.integrations.diffusers",
    "DAREGuidance": "dare_kernels.integrations.diffusers",
    "dare_guidance": "dare_kernels.integrations.diffusers",
    "render_maps": "dare_kernels.viz",
}
__all__ += list(_LAZY_DIFFUSERS)


def __getattr__(name):
    if name in _LAZY_DIFFUSERS:
        import importlib

        return getattr(importlib.import_module(_LAZY_DIFFUSERS[name]), name)
    raise AttributeError(f"module 'dare_kernels' has no attribute {name!r}")



def info() -> dict:
    """Versions, backends and switches, from the backend registry.

    {"version", "torch", "extension", "torch_mismatch", "build", "backends": {name: (ok, why)},
     "ops": {op: {"auto": {device: order}, "backends": {name: (ok, why)}}}, "switches": {name: {...}}}.
    "backends" is SRA attention's view (every op has the same backends).
    """
    import torch

    from . import backends as registry

    names = ("reference", "cpu", "cuda", "triton")
    ops = {}
    for op in registry.OPS:
        ops[op] = {
            "auto": {dev: registry.auto_order(op, dev) + (registry.LAST_RESORT[op],) for dev in ("cpu", "cuda")},
            "backends": {name: registry.available(op, name) for name in names},
        }
    return {
        "version": __version__,
        "torch": torch.__version__,
        "extension": "loaded" if _ext.EXT is not None else f"not loaded: {_ext.EXT_ERROR}",
        "torch_mismatch": _ext.TORCH_MISMATCH,
        "build": _ext.build_info(),
        "backends": ops["sra_attention"]["backends"],
        "ops": ops,
        "switches": switches.resolved(),
    }
