"""Shared set-up of the CPU sra_attention benchmarks (test_bench_sra_cpu.py, sra_cpu_interleaved.py): the input
sets and the eager peers of the forward with maps.

An input set is a dict: q [B, H, N, D], k and v [B, H, M, D] and w [B, M] in the benchmark's dtype, and the
bias γ·log w as a [B, 1, 1, M] additive mask in that dtype (the SDPA / eager peers' form of the weights).
"""

from __future__ import annotations

import torch

STRENGTH = 1.0  # γ of every provider


def input_set(shape, dtype: torch.dtype, g: torch.Generator) -> dict:
    """One random input set of ``shape`` (an AttnShape), drawn from ``g`` in the order q, k, v, w."""
    q = torch.randn(shape.B, shape.H, shape.N, shape.D, generator=g).to(dtype)
    k = torch.randn(shape.B, shape.H, shape.M, shape.D, generator=g).to(dtype)
    v = torch.randn(shape.B, shape.H, shape.M, shape.D, generator=g).to(dtype)
    w = torch.rand(shape.B, shape.M, generator=g) + 0.05
    bias = (STRENGTH * torch.log(w)).to(dtype).view(shape.B, 1, 1, shape.M)
    return dict(q=q, k=k, v=v, w=w.to(dtype), bias=bias)


def eager_maps(x, shape):
    """What a user writes: attention in the input dtype, map averaged in float32."""
    s = x["q"] @ x["k"].transpose(-1, -2) * (shape.D ** -0.5) + x["bias"]
    p = torch.softmax(s, dim=-1)
    return p @ x["v"], p.float().mean(1)


def eager_maps_fp32(x, shape):
    """The strongest eager peer for bf16 inputs: everything upcast to float32 first."""
    qf, kf, vf = (x[n].float() for n in ("q", "k", "v"))
    s = qf @ kf.transpose(-1, -2) * (shape.D ** -0.5) + x["bias"].float()
    p = torch.softmax(s, dim=-1)
    return (p @ vf).to(x["q"].dtype), p.mean(1)
