"""diffusers integration on GPU: a real-size Wan 2.1 T2V 1.3B transformer (random weights), one sampling step.

Shape "wan-1.3b" of bench/shapes.py: 81 frames at 480x832 -> 21x30x52 = 32760 video tokens, 512 text tokens,
30 blocks, 12 heads x 128, bfloat16, CFG batch 2 (uncond + cond in one forward).
Providers: stock (diffusers' processors), dare_ones (patched, weights 1), dare_maps (patched, weights,
maps captured), eager_maps (explicit-softmax DARE processor, see test_bench_diffusers_cpu.py).
``peak_mem_bytes`` = torch.cuda.max_memory_allocated over one step. Skips without CUDA.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from test_bench_diffusers_cpu import setup_provider  # noqa: E402  (bench/ is on sys.path under pytest rootdir)

BATCH = 2  # same as test_bench_diffusers_cpu.BATCH, which setup_provider uses for the weights


def _build():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    ).to("cuda", torch.bfloat16).eval()
    x = torch.randn(BATCH, 16, 21, 60, 104, device="cuda", dtype=torch.bfloat16)
    e = torch.randn(BATCH, 512, 4096, device="cuda", dtype=torch.bfloat16)
    t = torch.full((BATCH,), 500.0, device="cuda")

    def call():
        out = model(x, t, e, return_dict=False)[0]
        torch.cuda.synchronize()
        return out

    return model, call


@pytest.mark.parametrize("provider", ["stock", "dare_ones", "dare_maps", "eager_maps"])
def test_bench_wan13b_step(benchmark, provider):
    model, call = _build()
    handle = setup_provider(model, provider, 512)  # weights [2, 512] (CPU; moved to the device once per forward)
    benchmark.group = "diffusers wan-1.3b step bfloat16"
    benchmark.extra_info.update({"kernel": "diffusers_transformer", "provider": provider,
                                 "mode": "fwd+map" if provider.endswith("maps") else "fwd",
                                 "shape": "wan-1.3b", "dtype": "bfloat16", "batch": BATCH, "layers": 30})
    with torch.no_grad():
        call()
        torch.cuda.reset_peak_memory_stats()
        call()
        benchmark.extra_info["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
        benchmark.pedantic(call, rounds=3, iterations=1, warmup_rounds=0)
    if handle is not None:
        handle.remove()
