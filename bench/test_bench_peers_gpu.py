"""Peer baselines on CUDA at the real model shapes (every test skips with the reason without a GPU):
SDPA (with/without bias), eager attention with maps, compiled FlexAttention, FlashAttention and
xFormers when installed, and diffusers' guiders eager and compiled (bf16: one dtype keeps the run
inside one 10-minute device call). The floors (matmul peak, copy bandwidth) are measured by
bench/conftest.py in the same run."""

from __future__ import annotations

import pytest
import torch

from peer_cases import attn_params, run_attn_peer

DEVICE = "cuda"
DTYPES = (torch.bfloat16,)


@pytest.mark.parametrize("shape,provider,mode,dtype", attn_params(DEVICE, DTYPES))
def test_attn_peer(benchmark, shape, provider, mode, dtype):
    run_attn_peer(benchmark, provider, mode, shape, dtype, DEVICE)


# diffusers' guiders (eager and compiled) are measured beside rectified_cfg, same modes and
# rescale, in test_bench_cfg_<device>.py: one place, so report rows pair like with like.
