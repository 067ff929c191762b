"""rectified_cfg on CPU vs diffusers' guiders (eager and torch.compile'd) and a plain copy, side by side.

Bytes: the fused path reads the K=2 branches twice (statistics, combine) and writes one branch:
2.5x the input bytes. The copy provider copies the input tensor (reads and writes 1x: 2x the input
bytes), so bandwidth fractions compare like with like.
"""

from __future__ import annotations

import pytest
import torch

from _cfg_common import MODES, cycling, dare_call, guider_fn, latent_inputs, peer_call
from harness import latent_names

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVIDERS = ("dare_cpu", "diffusers_guider", "diffusers_guider_compiled", "copy")


def _info(benchmark, provider, mode, shape, dtype, nbytes):
    # every case runs guidance_rescale=0.7 (the comparison), so the mode says so
    benchmark.extra_info.update(kernel="rectified_cfg", provider=provider, mode=f"{mode}+rescale", shape=shape, dtype=dtype,
                                bytes=nbytes, device="cpu", threads=torch.get_num_threads())


@pytest.fixture
def threads():
    """Thread count of the run: the machine's, like every other benchmark, so rows pair across files.
    (bench/cfg_cpu_interleaved.py measures single-thread ratios on a loaded machine.)"""
    return torch.get_num_threads()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", latent_names())
def test_bench_rectified_cfg_cpu(benchmark, shape, mode, dtype, provider, threads):
    benchmark.group = f"rectified_cfg fwd {shape} {mode} {dtype} {threads}thr"
    dt = DTYPES[dtype]
    inputs = latent_inputs(shape, dt)
    in_bytes = inputs[0].numel() * inputs[0].element_size()
    if provider == "dare_cpu":
        fn = dare_call("cpu", mode, inputs)
        nbytes = int(2.5 * in_bytes)
    elif provider == "diffusers_guider_compiled":
        pytest.importorskip("diffusers")
        if dtype != "fp32":
            pytest.skip("compiled guider measured in fp32 only (compile time on a 2-core machine)")
        torch._dynamo.reset()
        compiled = torch.compile(guider_fn(mode), fullgraph=False, dynamic=False)
        compiled(inputs[0])  # compile outside the timing
        fn = cycling(compiled, inputs)
        nbytes = int(2.5 * in_bytes)
    else:
        fn, nbytes = peer_call(provider, mode, inputs)
    fn()
    _info(benchmark, provider, mode, shape, dtype, nbytes)
    benchmark(fn)
