"""The peer benchmarks as functions shared by test_bench_peers_cpu.py and test_bench_peers_gpu.py."""

from __future__ import annotations

import time

import pytest
import torch

from dare_kernels.benchmarking import peers
from harness import (attn_bytes, attn_flops, attn_shapes, bench_cpu, bench_cuda, dims, make_input_sets,
                     peak_memory, quick, rotating, set_info)

STRENGTH = 1.0
N_SETS = 3  # input sets cycled through, so caches do not flatter small problems

# (provider, mode): mode "+map" = also returns the head-averaged map; "fwd+bwd" = forward and backward
ATTN_CASES = (
    ("dare", "fwd"),
    ("dare", "fwd+map"),
    ("dare", "fwd+bwd"),
    ("dare", "fwd+bwd+map"),
    ("sdpa", "fwd"),
    ("sdpa_bias", "fwd"),
    ("sdpa_bias", "fwd+bwd"),
    ("eager_maps", "fwd+map"),
    ("eager_maps", "fwd+bwd+map"),
    ("flex_bias", "fwd"),
    ("flash_attn", "fwd"),
    ("xformers_bias", "fwd"),
)
COMPILED = ("flex_bias",)
CPU_EAGER_LOWP_GFLOP = 4.0  # eager bf16/fp16 attention on CPU only below this forward cost
CPU_CASE_BUDGET_S = 4.0     # timed seconds a CPU case aims for (at least 3 rounds)


def _dt(d) -> str:
    return str(d).replace("torch.", "")


def attn_params(device: str, dtypes) -> list:
    """pytest params (shape, provider, mode, dtype) of every attention peer at ``device``'s model shapes."""
    return [pytest.param(s, p, m, d, id=f"{s.name}-{p}-{m}-{_dt(d)}")
            for s in attn_shapes(device) for d in dtypes for p, m in ATTN_CASES]


def cpu_rounds(fn, most: int = 7) -> int:
    """Call ``fn`` once untimed (compile, first touch) and pick a round count from its duration:
    enough for a stable median, bounded so one slow case cannot take the whole suite."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if quick():
        return 3
    return max(3, min(most, int(CPU_CASE_BUDGET_S / max(first, 1e-6))))


def attn_inputs(shape, dtype, device, requires_grad=False):
    def make(g):
        def r(*s):
            t = torch.randn(*s, generator=g).to(device=device, dtype=dtype)
            return t.requires_grad_(requires_grad)

        q = r(shape.B, shape.H, shape.N, shape.D)
        k = r(shape.B, shape.H, shape.M, shape.D)
        v = r(shape.B, shape.H, shape.M, shape.D)
        w = (torch.rand(shape.B, shape.M, generator=g) + 0.05).to(device)  # token weights > 0
        return q, k, v, w

    return make_input_sets(make, n=N_SETS)


def _attn_call(provider: str, mode: str, map_keys):
    """(q, k, v, w) -> outputs of one timed call, the SRA bias computed inside (as a user would)."""
    if provider == "dare":
        from dare_kernels import sra_attention

        with_map = "map" in mode
        return lambda q, k, v, w: sra_attention(q, k, v, w, strength=STRENGTH, return_attn_map=with_map,
                                                attn_map_keys=map_keys if with_map else None)
    if provider == "sdpa":
        return lambda q, k, v, w: peers.sdpa(q, k, v)
    if provider == "sdpa_bias":
        return lambda q, k, v, w: peers.sdpa_with_bias(q, k, v, peers.sra_bias(w, STRENGTH, q.dtype))
    if provider == "eager_maps":
        return lambda q, k, v, w: peers.eager_with_maps(q, k, v, peers.sra_bias(w, STRENGTH, q.dtype), map_keys)
    if provider == "flex_bias":
        return lambda q, k, v, w: peers.flex_with_bias(q, k, v, peers.sra_bias(w, STRENGTH, q.dtype))
    if provider == "flash_attn":
        return lambda q, k, v, w: peers.flash_attn_nobias(q, k, v)
    if provider == "xformers_bias":
        return lambda q, k, v, w: peers.xformers_with_bias(q, k, v, peers.sra_bias(w, STRENGTH, q.dtype))
    raise ValueError(provider)


def _with_backward(fwd):
    def call(q, k, v, w):
        outs = fwd(q, k, v, w)
        outs = outs if isinstance(outs, tuple) else (outs,)
        grads = [torch.ones_like(o) for o in outs]
        return torch.autograd.grad(outs, (q, k, v), grads)

    return call


def run_attn_peer(benchmark, provider, mode, shape, dtype, device):
    """Benchmark one attention peer on one (scaled) model shape; skips with the reason when it can't run."""
    benchmark.group = f"sra_attention {mode} {shape.name} {_dt(dtype)}"
    bwd = "bwd" in mode
    with_map = "map" in mode
    label = provider
    if provider == "dare":  # our own kernel as backend="auto" picks it: C++ on CPU, Triton on CUDA
        label = "dare_cpu" if device == "cpu" else "dare_triton"
    set_info(benchmark, kernel="sra_attention", provider=label, mode=mode, shape=shape.name, dtype=dtype,
             device=device, dims=dims(shape), flops=attn_flops(shape, mode),
             bytes=attn_bytes(shape, dtype, mode, with_map))
    why = peers.unavailable(provider, device, dtype)
    if why:
        pytest.skip(why)
    if provider in COMPILED and quick() and shape.name != "animatediff-d40":
        pytest.skip("--quick: compiled peers only on animatediff-d40 (a compile takes 20-60 s on CPU)")
    fwd_gflop = attn_flops(shape, "fwd") / 1e9
    if device == "cpu" and dtype != torch.float32 and provider == "eager_maps" and fwd_gflop > CPU_EAGER_LOWP_GFLOP:
        pytest.skip(f"eager {_dt(dtype)} on CPU measured only on shapes under {CPU_EAGER_LOWP_GFLOP} GFLOP "
                    f"(this one: {fwd_gflop:.0f}) to bound the suite; on CPUs without native bf16 it is 20-30x "
                    f"slower than fp32 (test_bench_sra_cpu.py measures it at the CPU shapes)")
    if provider == "eager_maps":
        el = torch.empty((), dtype=dtype).element_size()
        need = (5 if bwd else 3) * shape.B * shape.H * shape.N * shape.M * el  # logits, scaled, probs (+ grads)
        limit = torch.cuda.mem_get_info()[0] * 0.8 if device == "cuda" else 6 * 2**30
        if need > limit:
            pytest.skip(f"eager attention materialises [B,H,N,M]: ~{need / 2**30:.1f} GiB > {limit / 2**30:.1f} GiB here")
    fn = _attn_call(provider, mode, shape.map_keys)
    if bwd:
        fn = _with_backward(fn)
    sets = attn_inputs(shape, dtype, device, requires_grad=bwd)
    if with_map:
        benchmark.extra_info["peak_mem_bytes"] = peak_memory(lambda: fn(*sets[0]), device)
        benchmark.extra_info["peak_mem_method"] = "cuda_allocator" if device == "cuda" else "live_op_outputs"
    timed = rotating(fn, sets)
    if device == "cuda":
        bench_cuda(benchmark, timed, warmup=3, rounds=10 if quick() else 30)
    else:
        bench_cpu(benchmark, timed, rounds=cpu_rounds(timed))
