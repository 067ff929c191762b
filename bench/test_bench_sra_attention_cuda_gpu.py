"""GPU benchmark of the CUDA SRA attention kernels (backend="cuda") beside the Triton kernels and SDPA with a
float bias, on the model shapes of bench/shapes.py. Skips without a CUDA device or a CUDA build.

The issue's acceptance: forward >= the Triton kernel at the Wan-1.3B and LTX shapes; ``auto`` only prefers
"cuda" (dare_kernels/tuning.py) once these numbers and tests/test_sra_cuda.py say so on a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from dare_kernels import backends
from dare_kernels.sra import sra_attention

from shapes import ATTN_SHAPES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPES = ["wan-1.3b", "ltx-video", "animatediff-d40", "animatediff-d160", "cogvideox-5b"]
PROVIDERS = ["dare_cuda", "dare_triton", "sdpa_bias"]
MODES = ["fwd", "fwd+map", "fwd+bwd"]


def _inputs(shape, dtype):
    s = ATTN_SHAPES[shape]
    q = torch.randn(s.B, s.N, s.H, s.D, device="cuda", dtype=dtype).transpose(1, 2)
    k = torch.randn(s.B, s.M, s.H, s.D, device="cuda", dtype=dtype).transpose(1, 2)
    v = torch.randn(s.B, s.M, s.H, s.D, device="cuda", dtype=dtype).transpose(1, 2)
    w = torch.rand(s.B, s.M, device="cuda") + 0.1
    return s, q, k, v, w


def _flops(s, mode):
    fwd = 4.0 * s.B * s.H * s.N * s.M * s.D
    return fwd * (3.5 if mode == "fwd+bwd" else 1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES)
def test_sra_attention_gpu(benchmark, shape, provider, mode, dtype):
    s, q, k, v, w = _inputs(shape, dtype)
    keys = s.map_keys or (0, s.M)
    benchmark.group = f"sra_attention {mode} {shape} {str(dtype).split('.')[-1]}"
    benchmark.extra_info.update(kernel="sra_attention", provider=provider, mode=mode, shape=shape,
                                dtype=str(dtype).split(".")[-1], flops=_flops(s, mode))
    if provider in ("dare_cuda", "dare_triton"):
        backend = provider.split("_")[1]
        why = backends.unsupported_reason("sra_attention", backend, q.device, dtype)
        if why is not None:
            pytest.skip(why)

        def run():
            need_grad = mode == "fwd+bwd"
            qq, kk, vv = (t.detach().requires_grad_(need_grad) for t in (q, k, v))
            res = sra_attention(qq, kk, vv, w, return_attn_map=mode != "fwd",
                                attn_map_keys=keys if mode != "fwd" else None, backend=backend)
            if need_grad:
                o, amap = res
                torch.autograd.backward([o, amap], [torch.ones_like(o), torch.ones_like(amap)])
            torch.cuda.synchronize()
    else:
        if mode != "fwd":
            pytest.skip("SDPA returns no attention map (and its backward with a float mask is not the peer here)")
        bias = torch.log(w).to(dtype).view(s.B, 1, 1, s.M)

        def run():
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1 / math.sqrt(s.D))
            torch.cuda.synchronize()

    run()  # warm-up (JIT, autotuning)
    torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(run, rounds=10, warmup_rounds=2)
    benchmark.extra_info["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
