"""CPU benchmarks of sra_attention (the fused C++ kernel) against its PyTorch peers.

Groups (peers side by side, per shape of bench/shapes.CPU_ATTN_SHAPES and dtype fp32 / bf16):
- "sra_attention fwd":        dare_cpu vs sdpa_bias (F.scaled_dot_product_attention with the same bias
                               γ·log w as a float [B,1,1,M] attn_mask), no maps.
- "sra_attention fwd+map":    dare_cpu with return_attn_map=True vs eager_maps (softmax of the biased
                               logits, P@V, P.mean(1) in the input dtype, as a user writes it) and, for
                               bf16, eager_maps_fp32 (the same upcast to float32 first: the strongest
                               eager peer); all record peak_mem_bytes.
- "sra_attention fwd+bwd":    dare_cpu vs sdpa_bias, gradient w.r.t. q, k, v.

Peak memory probe (``peak_rss_growth``): glibc's malloc_trim(0) returns freed heap pages, the kernel's
peak-RSS counter is reset (write "5" to /proc/self/clear_refs), the call runs, and VmHWM - VmRSS(before)
is the peak resident growth of the call, outputs included. torch's CPU allocator has no peak statistic
of its own and tracemalloc does not see its allocations; the RSS figure counts every page the call
touches (it cannot see memory reused from pages that stayed resident, which malloc_trim minimises).
extra_info["peak_over_outputs"] = peak_mem_bytes / bytes(o + map), the issue's "≤ 1.5×" criterion.
Linux only; elsewhere the field is left out.
"""

from __future__ import annotations

import ctypes
import gc

import pytest
import torch
import torch.nn.functional as F

from dare_kernels import _ext, sra_attention

from _sra_cpu_common import STRENGTH, eager_maps, eager_maps_fp32, input_set
from shapes import CPU_ATTN_SHAPES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _rss_probe_available() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        open("/proc/self/status").read()
        ctypes.CDLL("libc.so.6").malloc_trim
        return True
    except Exception:  # noqa: BLE001
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_rss_growth(fn) -> tuple[int, object]:
    """Peak resident-memory growth in bytes while ``fn()`` runs (its result kept alive), and the result."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM")
    return (peak - before) * 1024, result


class Inputs:
    """Two random input sets of one shape, rotated between calls (nothing stays in cache for a provider)."""

    def __init__(self, shape, dtype, requires_grad=False):
        g = torch.Generator().manual_seed(0)
        self.sets = []
        for _ in range(2):
            x = input_set(shape, dtype, g)
            if requires_grad:
                for n in ("q", "k", "v"):
                    x[n].requires_grad_()
            x["go"] = torch.randn(shape.B, shape.H, shape.N, shape.D, generator=g).to(dtype)
            self.sets.append(x)
        self.i = 0

    def next(self):
        self.i ^= 1
        return self.sets[self.i]


def _info(benchmark, shape, dtype_name, provider, mode, flops):
    benchmark.extra_info.update(
        kernel="sra_attention", provider=provider, mode=mode, shape=shape.name, dtype=dtype_name,
        flops=flops, n_scale=1, threads=torch.get_num_threads(),
        B=shape.B, H=shape.H, N=shape.N, M=shape.M, D=shape.D,
    )


def _flops(shape, passes=1.0):
    return int(4 * shape.B * shape.H * shape.N * shape.M * shape.D * passes)


def _rounds(shape):
    return 3 if shape.N * shape.M * shape.H * shape.D > 1e9 else 10


SHAPES = list(CPU_ATTN_SHAPES.values())


def over_cases(*providers):
    """Parametrise a benchmark over ``providers`` x SHAPES x DTYPES (case ids provider-shape-dtype)."""
    def mark(test):
        test = pytest.mark.parametrize("provider", list(providers))(test)
        test = pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)(test)
        return pytest.mark.parametrize("dtype_name", list(DTYPES))(test)
    return mark


def case_inputs(benchmark, provider, shape, dtype_name, pass_name, requires_grad=False) -> Inputs:
    """Start a case: skip dare_cpu without the compiled kernels, name its group, make its input sets."""
    if provider == "dare_cpu" and not _ext.has_cpu_kernels():
        pytest.skip(f"the compiled CPU kernels are not loaded ({_ext.EXT_ERROR})")
    benchmark.group = f"sra_attention {pass_name} {shape.name} {dtype_name}"
    return Inputs(shape, DTYPES[dtype_name], requires_grad)


# ---------------------------------------------------------------------------------------------
# forward, no maps
# ---------------------------------------------------------------------------------------------

@over_cases("dare_cpu", "sdpa_bias")
def test_fwd(benchmark, provider, shape, dtype_name):
    ins = case_inputs(benchmark, provider, shape, dtype_name, "fwd")
    if provider == "dare_cpu":
        def fn():
            x = ins.next()
            return sra_attention(x["q"], x["k"], x["v"], x["w"], strength=STRENGTH, backend="cpu")
    else:
        def fn():
            x = ins.next()
            return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], attn_mask=x["bias"])
    _info(benchmark, shape, dtype_name, provider, "fwd", _flops(shape))
    benchmark.pedantic(fn, rounds=_rounds(shape), warmup_rounds=1)


# ---------------------------------------------------------------------------------------------
# forward with the head-averaged map
# ---------------------------------------------------------------------------------------------

@over_cases("dare_cpu", "eager_maps", "eager_maps_fp32")
def test_fwd_map(benchmark, provider, shape, dtype_name):
    if provider == "eager_maps_fp32" and dtype_name == "fp32":
        pytest.skip("same as eager_maps for float32 inputs")
    ins = case_inputs(benchmark, provider, shape, dtype_name, "fwd+map")
    if provider == "dare_cpu":
        def fn():
            x = ins.next()
            return sra_attention(x["q"], x["k"], x["v"], x["w"], strength=STRENGTH, return_attn_map=True, backend="cpu")
    else:
        eager = eager_maps if provider == "eager_maps" else eager_maps_fp32

        def fn():
            return eager(ins.next(), shape)
    _info(benchmark, shape, dtype_name, provider, "fwd+map", _flops(shape))
    if _rss_probe_available():
        fn()
        peak, (o, amap) = peak_rss_growth(fn)
        out_bytes = o.numel() * o.element_size() + amap.numel() * amap.element_size()
        benchmark.extra_info.update(peak_mem_bytes=peak, out_bytes=out_bytes,
                                    peak_over_outputs=round(peak / out_bytes, 3), mem_probe="peak_rss_growth")
        del o, amap
    benchmark.pedantic(fn, rounds=_rounds(shape), warmup_rounds=1)


# ---------------------------------------------------------------------------------------------
# forward + backward (no maps)
# ---------------------------------------------------------------------------------------------

@over_cases("dare_cpu", "sdpa_bias")
def test_fwd_bwd(benchmark, provider, shape, dtype_name):
    ins = case_inputs(benchmark, provider, shape, dtype_name, "fwd+bwd", requires_grad=True)

    def fn():
        x = ins.next()
        if provider == "dare_cpu":
            o = sra_attention(x["q"], x["k"], x["v"], x["w"], strength=STRENGTH, backend="cpu")
        else:
            o = F.scaled_dot_product_attention(x["q"], x["k"], x["v"], attn_mask=x["bias"])
        q, k, v = x["q"], x["k"], x["v"]
        return torch.autograd.grad(o, (q, k, v), x["go"])

    _info(benchmark, shape, dtype_name, provider, "fwd+bwd", _flops(shape, 3.5))
    benchmark.pedantic(fn, rounds=_rounds(shape), warmup_rounds=1)

