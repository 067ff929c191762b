"""rectified_cfg rows of the device-check bench: CFG with guidance_rescale 0.7 on a stacked [uncond; cond]
video latent [2, C, F, H, W] (bfloat16), one zero-argument call per provider.

    torch_eager        the PyTorch formula (dare_kernels.reference.rectified_cfg_ref, what one writes by hand)
    copy               a copy of the same bytes: the bandwidth floor
    dare_triton / dare_cuda   rectified_cfg(backend=...)
    diffusers_guider   diffusers' ClassifierFreeGuidance with guidance_rescale (skipped without diffusers)
"""

from __future__ import annotations

import importlib.util

import torch

from .attention import Skip, _dare_unavailable


def cfg_inputs(lat: tuple[int, ...], device: str, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, *lat[1:], generator=g)
    return torch.cat([u, u + 0.3 * torch.randn(1, *lat[1:], generator=g)]).to(device=device, dtype=dtype)


def cfg_call(provider: str, preds: torch.Tensor):
    from _cfg_common import RESCALE, SCALE

    if provider.startswith("dare_"):
        backend = provider.removeprefix("dare_")
        why = _dare_unavailable("cfg", backend, preds)
        if why:
            raise Skip(why)
        import dare_kernels as dk
        return lambda: dk.rectified_cfg(preds, SCALE, mode="cfg", guidance_rescale=RESCALE, backend=backend)
    if provider == "torch_eager":
        from dare_kernels.reference import rectified_cfg_ref
        return lambda: rectified_cfg_ref(preds, SCALE, mode="cfg", guidance_rescale=RESCALE)
    if provider == "diffusers_guider":
        if importlib.util.find_spec("diffusers") is None:
            raise Skip("diffusers is not installed here")
        from _cfg_common import guider_fn
        run = guider_fn("cfg")
        return lambda: run(preds)
    if provider == "copy":
        dst = torch.empty_like(preds)
        return lambda: dst.copy_(preds)
    raise ValueError(f"unknown provider {provider!r}")


def cfg_bytes(provider: str, preds: torch.Tensor) -> float:
    """Bytes one call must move: a copy reads and writes everything; the combine reads both branches, writes one."""
    in_bytes = preds.numel() * preds.element_size()
    return (2.0 if provider == "copy" else 1.5) * in_bytes
