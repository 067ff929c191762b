"""GPU benchmarks of SRA attention: dare_kernels' Triton kernels against the usual peers (bench/README.md).

Per model shape of ``bench/shapes.py`` (bfloat16) and pass (fwd, fwd+map, bwd, fwd+bwd):
- ``dare_triton``  sra_attention(backend="triton") (``dare_cuda`` too when the extension has CUDA kernels)
- ``sdpa_flash``   SDPA without the bias, FlashAttention backend (the speed of light without SRA)
- ``sdpa_bias``    SDPA with γ·log w (and the key mask) as an additive [B, 1, 1, M] mask
- ``flex_compiled`` compiled FlexAttention with a per-key-bias score_mod
- ``eager_maps``   eager attention that also returns the head-averaged map
- ``flash_attn`` / ``xformers`` (no bias) when those packages are installed
Timing: pytest-benchmark rounds of the call plus ``torch.cuda.synchronize()``; ``extra_info["median_ms"]``
holds the CUDA-event median from ``triton.testing.do_bench`` (the number to compare). Nothing is asserted.
Skips without CUDA, with the reason.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from shapes import ATTN_SHAPES  # noqa: E402

from dare_kernels.benchmarking import peers  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU benchmarks)")

SHAPES = ["wan-1.3b", "ltx-video", "cogvideox-5b", "animatediff-d40", "animatediff-d80", "animatediff-d160"]
DTYPE = torch.bfloat16
PROVIDERS = ["dare_triton", "dare_cuda", "sdpa_flash", "sdpa_bias", "flex_compiled", "eager_maps",
             "flash_attn", "xformers"]
MODES = ["fwd", "fwd+map", "bwd", "fwd+bwd"]


def _inputs(shape, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    B, H, N, M, D = shape.B, shape.H, shape.N, shape.M, shape.D

    def rnd(*s):  # [B, N, H, D] memory, as diffusers' processors hand it over
        return torch.randn(*s, generator=g, device="cuda", dtype=DTYPE).transpose(1, 2)

    q, k, v = rnd(B, N, H, D), rnd(B, M, H, D), rnd(B, M, H, D)
    w = torch.rand(B, M, generator=g, device="cuda") * 1.9 + 0.1
    if shape.map_keys is not None:
        w[:, : shape.map_keys[0]] = 1.0  # joint attention: video keys unweighted
    mask = torch.ones(B, M, dtype=torch.bool, device="cuda")
    mask[:, M - max(1, M // 10):] = False  # text padding
    return q, k, v, w, mask


def _make_call(provider, mode, shape, q, k, v, w, mask):
    """A zero-argument callable running ``mode`` for ``provider``, or a skip reason string."""
    B, H, N, M, D = shape.B, shape.H, shape.N, shape.M, shape.D
    want_map = mode == "fwd+map"
    bias = peers.sra_bias(w, 1.0, torch.float32, key_padding_mask=mask)  # [B, 1, 1, M]
    fwd = None

    if provider in ("dare_triton", "dare_cuda"):
        backend = provider.split("_")[1]
        from dare_kernels import backends

        why = backends.unsupported_reason("sra_attention", backend, q.device, q.dtype)
        if why:
            return why
        from dare_kernels import sra_attention

        def fwd(q_, k_, v_, w_, map_=False):
            return sra_attention(q_, k_, v_, w_, key_padding_mask=mask, return_attn_map=map_,
                                 attn_map_keys=shape.map_keys if map_ else None, backend=backend)
        if mode == "fwd+map":
            return lambda: fwd(q, k, v, w, True)
        bwd_args = (q, k, v, w)
    elif provider in ("sdpa_flash", "sdpa_bias"):
        if want_map:
            return "SDPA returns no attention map"
        if provider == "sdpa_flash":
            fwd = peers.sdpa_flash
        else:
            mask4 = bias.to(DTYPE)

            def fwd(q_, k_, v_):
                return peers.sdpa_with_bias(q_, k_, v_, mask4)
        bwd_args = (q, k, v)
    elif provider == "flex_compiled":
        if want_map:
            return "FlexAttention returns no attention map"
        why = peers.unavailable("flex_bias", "cuda")
        if why:
            return why

        def fwd(q_, k_, v_):
            return peers.flex_with_bias(q_, k_, v_, bias)
        bwd_args = (q, k, v)
    elif provider == "eager_maps":
        need = 3 * 4 * B * H * N * M
        if need > 0.6 * torch.cuda.mem_get_info()[0]:
            return f"eager scores would take {need / 2**30:.0f} GiB"

        def fwd(q_, k_, v_):
            return peers.eager_with_maps(q_, k_, v_, bias, shape.map_keys, upcast=True)
        if mode == "fwd+map":
            return lambda: fwd(q, k, v)
        bwd_args = (q, k, v)
    elif provider == "flash_attn":
        why = peers.unavailable("flash_attn", "cuda", DTYPE)
        if why:
            return why
        if want_map:
            return "flash_attn returns no attention map"
        fwd = peers.flash_attn_nobias  # no bias (it has none per key)
        bwd_args = (q, k, v)
    elif provider == "xformers":
        why = peers.unavailable("xformers", "cuda")
        if why:
            return why
        if want_map:
            return "xformers returns no attention map"
        fwd = peers.xformers_nobias
        bwd_args = (q, k, v)
    else:
        return f"unknown provider {provider}"

    if mode == "fwd":
        return lambda: fwd(*bwd_args)
    leaves = [t.detach().requires_grad_() for t in bwd_args]
    if mode == "bwd":
        out = fwd(*leaves)
        out = out[0] if isinstance(out, tuple) else out
        go = torch.randn_like(out)
        return lambda: torch.autograd.grad(out, leaves, go, retain_graph=True)
    if mode == "fwd+bwd":
        go = torch.randn(B, H, N, v.shape[-1], device="cuda", dtype=DTYPE)

        def step():
            lv = [t.detach().requires_grad_() for t in bwd_args]
            o = fwd(*lv)
            o = o[0] if isinstance(o, tuple) else o
            torch.autograd.grad(o, lv, go.view(o.shape) if o.shape != go.shape else go)
        return step
    return f"{provider} has no {mode} path"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape_name", SHAPES)
def test_bench_sra_gpu(benchmark, shape_name, provider, mode):
    import triton.testing

    shape = ATTN_SHAPES[shape_name]
    benchmark.group = f"sra_attention {mode} {shape_name} bf16"
    inputs = [_inputs(shape, seed) for seed in range(2)]  # rotated between calls
    calls = []
    for inp in inputs:
        call = _make_call(provider, mode, shape, *inp)
        if isinstance(call, str):
            pytest.skip(call)
        calls.append(call)
    state = {"i": 0}

    def rotated():
        state["i"] += 1
        calls[state["i"] % len(calls)]()

    try:
        rotated()  # compile / autotune outside the timing
        torch.cuda.synchronize()
        median_ms = triton.testing.do_bench(rotated, warmup=25, rep=100, return_mode="median")
    except torch.cuda.OutOfMemoryError as exc:
        pytest.skip(f"out of memory: {str(exc)[:100]}")
    torch.cuda.reset_peak_memory_stats()

    def synced():
        rotated()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=10, iterations=1, warmup_rounds=2)
    B, H, N, M, D = shape.B, shape.H, shape.N, shape.M, shape.D
    flops_fwd = 4.0 * B * H * N * M * D
    flops = {"fwd": flops_fwd, "fwd+map": flops_fwd, "bwd": 2.5 * flops_fwd, "fwd+bwd": 3.5 * flops_fwd}[mode]
    io = 2 * (2 * B * H * N * D + 2 * B * H * M * D)
    if mode == "fwd+map":
        io += 4 * B * N * ((shape.map_keys[1] - shape.map_keys[0]) if shape.map_keys else M)
    benchmark.extra_info.update(
        kernel="sra_attention", provider=provider, mode=mode, shape=shape_name, dtype="bfloat16",
        flops=flops, bytes=io if mode in ("fwd", "fwd+map") else None, median_ms=median_ms,
        tflops=flops / median_ms / 1e9, peak_mem_bytes=torch.cuda.max_memory_allocated(),
        device=torch.cuda.get_device_name(),
    )
