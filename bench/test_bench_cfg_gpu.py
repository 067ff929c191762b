"""rectified_cfg on a GPU: CUDA two-pass and single-pass, Triton, the eager diffusers guider, and a copy.

Bytes recorded per provider are what its algorithm must move (K=2): two-pass and Triton 2.5x the
input bytes (read twice, write once); single-pass 1.5x (read once, write once: the floor). The copy
provider moves 2x the input bytes; bandwidth fraction = (bytes/time) / (copy bytes/copy time).
Skips without CUDA.
"""

from __future__ import annotations


import pytest
import torch

import dare_kernels as dk
from _cfg_common import MODES, dare_call, latent_inputs, peer_call
from shapes import LATENT_SHAPES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PROVIDERS = ("dare_cuda_two_pass", "dare_cuda_single_pass", "dare_triton", "diffusers_guider", "copy")


def _synced(fn):
    def call():
        r = fn()
        torch.cuda.synchronize()
        return r

    return call


@pytest.fixture
def monkeypatch(monkeypatch):
    """pytest's monkeypatch; its undo also re-reads the C++ switch table (parsed once, csrc/include/switches.h)."""
    yield monkeypatch
    monkeypatch.undo()
    getattr(dk._ext.EXT, "reload_cpu_switches", lambda: None)()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", list(LATENT_SHAPES))
def test_bench_rectified_cfg_gpu(benchmark, shape, mode, dtype, provider, monkeypatch):
    benchmark.group = f"rectified_cfg fwd {shape} {mode} {dtype} gpu"
    dt = DTYPES[dtype]
    inputs = latent_inputs(shape, dt, device="cuda")
    in_bytes = inputs[0].numel() * inputs[0].element_size()
    if provider.startswith("dare_cuda"):
        path = "two_pass" if provider.endswith("two_pass") else "single_pass"
        monkeypatch.setenv("DARE_KERNELS_CUDA_CFG_PATH", path)
        getattr(dk._ext.EXT, "reload_cpu_switches", lambda: None)()  # the C++ switch table is parsed once
        fn = dare_call("cuda", mode, inputs)
        nbytes = int((2.5 if path == "two_pass" else 1.5) * in_bytes)
    elif provider == "dare_triton":
        fn = dare_call("triton", mode, inputs)
        nbytes = int(2.5 * in_bytes)
    else:
        fn, nbytes = peer_call(provider, mode, inputs)
    fn = _synced(fn)
    fn()
    benchmark.extra_info.update(kernel="rectified_cfg", provider=provider, mode=mode, shape=shape, dtype=dtype,
                                bytes=nbytes, device=torch.cuda.get_device_name())
    benchmark(fn)
