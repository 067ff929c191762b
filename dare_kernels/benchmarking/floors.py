"""Physical floors of a device, measured in the same run as the kernels.

- matmul peak: GFLOP/s of a large square matmul (2·n³ FLOPs) in float32 and bfloat16;
- copy bandwidth: GB/s of a large tensor copy (bytes read + bytes written).

The report divides a kernel's achieved FLOP/s and byte/s by these, so "fraction of the floor"
compares like with like on the same machine under the same load.
"""

from __future__ import annotations

import time

import torch

from .settings import bench_switch
from .timing import cpu_time, cuda_time, quantiles

CALL_S = 0.25  # a CPU matmul floor call is sized to about this long (a bf16 matmul without native support is slow)


def _sizes(device_type: str, quick: bool) -> dict[str, int]:
    if bench_switch("FLOORS") == "tiny":  # tests of the plumbing only: numbers meaningless
        return {"matmul_n": 256, "copy_numel": 1024 * 1024}
    if device_type == "cuda":
        return {"matmul_n": 8192, "copy_numel": 256 * 1024 * 1024}  # 1 GiB fp32
    # the copy streams 2 x 256 MiB: larger than any CPU cache, so it is a memory bandwidth, not a cache one
    return {"matmul_n": 1024 if quick else 2048, "copy_numel": 64 * 1024 * 1024}


def _cpu_matmul_n(dtype: torch.dtype, n_max: int) -> int:
    """Largest n <= n_max (multiple of 128, >= 256) whose n x n matmul takes about CALL_S here, from one
    timed n=256 call: a non-native bf16 matmul (about 1 GFLOP/s on AVX2-only CPUs) would take seconds at 2048."""
    a = torch.randn(256, 256).to(dtype)
    torch.mm(a, a)
    t0 = time.perf_counter()
    torch.mm(a, a)
    rate = 2 * 256 ** 3 / max(time.perf_counter() - t0, 1e-9)
    n = int((CALL_S * rate / 2) ** (1 / 3)) // 128 * 128
    return max(256, min(n_max, n))


def measure_floors(device_type: str = "cpu", quick: bool = False) -> list[dict]:
    """Rows (CSV dicts without the environment columns) for the matmul peaks and the copy bandwidth.

    Each row: kernel="floor", provider "matmul" or "copy", metric "throughput", unit GFLOP/s or GB/s,
    p20/p50/p80 of the throughput, and flops / bytes per call.
    """
    sizes = _sizes(device_type, quick)
    device = torch.device(device_type)
    rows = []

    def timed(fn):
        if device_type == "cuda":
            return cuda_time(fn, warmup=3, rounds=20, max_time=2.0, flush_l2=False)
        return cpu_time(fn, warmup=1, rounds=7 if not quick else 3, max_time=3.0)

    for dtype in (torch.float32, torch.bfloat16):
        n = sizes["matmul_n"]
        if device_type == "cpu" and n > 256:
            n = _cpu_matmul_n(dtype, n)
        g = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        samples = timed(lambda a=a, b=b, c=c: torch.mm(a, b, out=c))
        flops = 2.0 * n ** 3
        p20, p50, p80 = quantiles([flops / s / 1e9 for s in samples])
        rows.append(dict(kernel="floor", provider="matmul", mode="floor", metric="throughput", unit="GFLOP/s",
                         shape=f"mm-{n}", dims=f"{n}x{n}x{n}", dtype=str(dtype).replace("torch.", ""),
                         status="ok", p50=p50, p20=p20, p80=p80, rounds=len(samples), flops=flops,
                         timer="cuda_events" if device_type == "cuda" else "perf_counter"))
        del a, b, c

    numel = sizes["copy_numel"]
    src = torch.full((numel,), 1.5, device=device)  # values do not matter to a copy
    dst = torch.empty_like(src)
    samples = timed(lambda: dst.copy_(src))
    nbytes = 2.0 * numel * src.element_size()
    p20, p50, p80 = quantiles([nbytes / s / 1e9 for s in samples])
    rows.append(dict(kernel="floor", provider="copy", mode="floor", metric="throughput", unit="GB/s",
                     shape=f"copy-{numel * 4 >> 20}MiB", dims=str(numel), dtype="float32", status="ok",
                     p50=p50, p20=p20, p80=p80, rounds=len(samples), bytes=nbytes,
                     timer="cuda_events" if device_type == "cuda" else "perf_counter"))
    return rows
