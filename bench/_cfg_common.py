"""Shared set-up of the rectified-CFG benchmarks: inputs, diffusers guiders, the dare call per mode and the
providers the CPU and GPU files share."""

from __future__ import annotations

import torch

import dare_kernels as dk
from dare_kernels import backends
from dare_kernels.benchmarking.peers import diffusers_guider
from dare_kernels.benchmarking.shapes import LATENT_SHAPES
from dare_kernels.reference import CFG_MODES as MODES

RESCALE = 0.7            # guidance_rescale φ of every provider
SCALE = 5.0              # guidance scale s
APG_THRESHOLD = 15.0     # diffusers' default adaptive_projected_guidance_rescale (norm threshold τ)
ROTATE = 3               # input sets cycled between calls so no provider runs from a warm cache alone


def latent_inputs(shape_name: str, dtype: torch.dtype, device: str = "cpu", batch: int = 1):
    """ROTATE stacked predictions [2*batch, C, F, H, W] (uncond, cond; cond correlated with uncond)."""
    shape = (batch,) + LATENT_SHAPES[shape_name]
    sets = []
    g = torch.Generator().manual_seed(0)
    for _ in range(ROTATE):
        u = torch.randn(shape, generator=g)
        c = u + 0.3 * torch.randn(shape, generator=g)
        sets.append(torch.cat([u, c]).to(dtype=dtype, device=device))
    return sets


def make_guider(mode: str):
    """The diffusers guider of ``mode`` with this benchmark's parameters (early step, CFG-Zero* not zeroed)."""
    return diffusers_guider(mode, SCALE, RESCALE, apg_threshold=APG_THRESHOLD, zero_init_steps=0,
                            step=1, num_inference_steps=10)


def guider_fn(mode: str):
    """preds [2B, ...] -> guided prediction, through the diffusers guider (the chunk is a free view)."""
    guider = make_guider(mode)

    def run(preds):
        u, c = preds.chunk(2)
        return guider.forward(pred_cond=c, pred_uncond=u)["pred"]

    return run


def dare_kwargs(mode: str) -> dict:
    kw = dict(mode=mode, guidance_rescale=RESCALE)
    if mode == "apg":
        kw["norm_threshold"] = APG_THRESHOLD
    return kw


def cycling(fn, inputs):
    """A zero-argument callable running fn on the next input set each call."""
    state = {"i": 0}

    def call():
        x = inputs[state["i"] % len(inputs)]
        state["i"] += 1
        return fn(x)

    return call


def dare_call(backend: str, mode: str, inputs):
    """rectified_cfg on ``backend`` into a preallocated ``out=``, cycling ``inputs``; skips when it cannot run."""
    import pytest  # here: the interleaved script and tools/gpu_check_bench.py import this module without it

    why = backends.unsupported_reason("rectified_cfg", backend, inputs[0].device, inputs[0].dtype)
    if why is not None:
        pytest.skip(why)
    out = torch.empty_like(inputs[0][: inputs[0].shape[0] // 2])
    kw = dare_kwargs(mode)
    return cycling(lambda p: dk.rectified_cfg(p, SCALE, out=out, backend=backend, **kw), inputs)


def peer_call(provider: str, mode: str, inputs) -> tuple:
    """(call, bytes it must move) of a peer both devices measure: "diffusers_guider" (eager; reads the K=2
    branches twice and writes one, 2.5x the input bytes like the fused path) or "copy" (reads and writes 1x)."""
    in_bytes = inputs[0].numel() * inputs[0].element_size()
    if provider == "diffusers_guider":
        import pytest

        pytest.importorskip("diffusers")
        return cycling(guider_fn(mode), inputs), int(2.5 * in_bytes)
    if provider == "copy":
        dst = torch.empty_like(inputs[0])
        return cycling(lambda p: dst.copy_(p), inputs), 2 * in_bytes
    raise ValueError(f"unknown provider {provider!r}")
