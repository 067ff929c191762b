"""Peer baselines on CPU at the scaled model shapes: SDPA (with/without bias), eager attention with
maps, compiled FlexAttention, FlashAttention / xFormers (skipped here with the reason), and
diffusers' guiders eager and compiled. The floors (matmul peak, copy bandwidth) are measured by
bench/conftest.py in the same run."""

from __future__ import annotations

import pytest
import torch

from harness import quick
from peer_cases import attn_params, run_attn_peer

DEVICE = "cpu"
DTYPES = (torch.float32,) if quick() else (torch.float32, torch.bfloat16)


@pytest.mark.parametrize("shape,provider,mode,dtype", attn_params(DEVICE, DTYPES))
def test_attn_peer(benchmark, shape, provider, mode, dtype):
    run_attn_peer(benchmark, provider, mode, shape, dtype, DEVICE)


# diffusers' guiders (eager and compiled) are measured beside rectified_cfg, same modes and
# rescale, in test_bench_cfg_<device>.py: one place, so report rows pair like with like.
