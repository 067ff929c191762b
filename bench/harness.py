"""Helpers every bench file may import (``from harness import ...``; bench/ is on sys.path under pytest).

- ``quick()``: the quick run is on (``--bench-quick`` or ``DARE_KERNELS_BENCH_QUICK=1``; what gets measured
  within it is decided by the time budget, dare_kernels/benchmarking/budget.py).
- ``cpu_scale()``, ``attn_shapes(device)``, ``latent_shapes(device)``: which shapes a run covers.
- ``rotating``, ``make_input_sets``, ``bench_cpu``, ``bench_cuda``: timing with rotated inputs
  (re-exported from ``dare_kernels.benchmarking.timing``).
- ``set_info(benchmark, ...)``: fill ``benchmark.extra_info`` with the fields bench/README.md lists.
- ``attn_flops`` / ``attn_bytes``: per-call work of an attention pass, for the floor fractions.
"""

from __future__ import annotations

import torch

from dare_kernels.benchmarking.settings import quick  # noqa: F401  (re-exported: the one parse of the switch)

from dare_kernels.benchmarking.timing import (  # noqa: F401  (re-exported)
    bench_cpu, bench_cuda, cpu_time, cuda_time, feed_benchmark, make_input_sets, quantiles, rotating,
)
from shapes import ATTN_SHAPES, CPU_SCALE, LATENT_SHAPES, AttnShape

__all__ = [
    "bench_cpu", "bench_cuda", "cpu_time", "cuda_time", "feed_benchmark", "make_input_sets", "quantiles", "rotating",
    "quick", "cpu_scale", "latent_names", "scale_for", "attn_shapes", "latent_shapes", "dims", "attn_flops", "attn_bytes",
    "set_info", "peak_memory", "ATTN_SHAPES", "LATENT_SHAPES", "AttnShape",
]

QUICK_CPU_SCALE = 32        # quick CPU runs divide N by this instead of CPU_SCALE
QUICK_SHAPES = ("wan-1.3b", "animatediff-d40")
QUICK_LATENTS = ("wan-49f-480x720",)


def cpu_scale() -> int:
    """Factor N is divided by on CPU (recorded in every row's ``scale``)."""
    return QUICK_CPU_SCALE if quick() else CPU_SCALE


def scale_for(device: str) -> int:
    return 1 if device == "cuda" else cpu_scale()


def attn_shapes(device: str = "cpu") -> list[AttnShape]:
    """Model attention shapes for a run on ``device``: real sizes on CUDA, N / cpu_scale() on CPU."""
    names = QUICK_SHAPES if quick() else tuple(ATTN_SHAPES)
    return [ATTN_SHAPES[n].scaled(scale_for(device)) for n in names]


def latent_names() -> list[str]:
    """Names of the video-latent shapes a run covers (bench/shapes.LATENT_SHAPES keys)."""
    return list(QUICK_LATENTS if quick() else LATENT_SHAPES)


def latent_shapes(device: str = "cpu") -> dict[str, tuple[int, ...]]:
    """Video-latent shapes [C, F, H, W] per CFG branch; on CPU the frame count is divided by cpu_scale()//4."""
    names = QUICK_LATENTS if quick() else tuple(LATENT_SHAPES)
    out = {}
    for n in names:
        c, f, h, w = LATENT_SHAPES[n]
        if device != "cuda":
            f = max(1, f // max(1, cpu_scale() // 4))
        out[n] = (c, f, h, w)
    return out


def dims(shape: AttnShape) -> str:
    return f"B={shape.B} H={shape.H} N={shape.N} M={shape.M} D={shape.D}"


def attn_flops(shape: AttnShape, mode: str = "fwd") -> float:
    """Matmul FLOPs of one attention call: 4·B·H·N·M·D forward, 2.5× that backward (5 matmuls vs 2)."""
    fwd = 4.0 * shape.B * shape.H * shape.N * shape.M * shape.D
    base = mode.split("+map")[0]
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}.get(base, fwd)


def attn_bytes(shape: AttnShape, dtype: torch.dtype, mode: str = "fwd", with_map: bool = False) -> float:
    """Minimum bytes one attention call moves: q, k, v read and o written (and the fp32 map if asked)."""
    el = torch.empty((), dtype=dtype).element_size()
    qo = 2 * shape.B * shape.H * shape.N * shape.D * el
    kv = 2 * shape.B * shape.H * shape.M * shape.D * el
    total = float(qo + kv)
    if with_map:
        lo, hi = shape.map_keys or (0, shape.M)
        total += 4.0 * shape.B * shape.N * (hi - lo)
    base = mode.split("+map")[0]
    return {"bwd": 2.0 * total, "fwd+bwd": 3.0 * total}.get(base, total)


def set_info(benchmark, *, kernel: str, provider: str, mode: str, shape: str, dtype, device: str = "cpu",
             flops: float | None = None, bytes: float | None = None, peak_mem_bytes: int | None = None,
             dims: str | None = None, scale: int | None = None) -> None:
    """Fill ``benchmark.extra_info`` with the fields the CSV writer reads (see bench/README.md)."""
    info = benchmark.extra_info
    info.update(kernel=kernel, provider=provider, mode=mode, shape=shape,
                dtype=str(dtype).replace("torch.", ""), device=device)
    info["scale"] = scale if scale is not None else scale_for(device)
    for k, v in (("flops", flops), ("bytes", bytes), ("peak_mem_bytes", peak_mem_bytes), ("dims", dims)):
        if v is not None:
            info[k] = v


def peak_memory(fn, device: str = "cpu") -> int | None:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before.

    CUDA: the caching allocator's peak. CPU has no allocator statistics: a dispatch-mode tracker
    counts the storage of every tensor an ATen op returns while it is alive (weak references),
    which sees the intermediates of eager code exactly but only the outputs of a fused C++ op
    (its internal scratch is invisible); the row's ``peak_mem_method`` says which was used.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - before)
    tracker = _LiveTensorBytes()
    with tracker:
        out = fn()
    del out
    return tracker.peak


class _LiveTensorBytes:
    """Context manager: peak bytes of op-output storages alive at once (CPU peak-memory estimate)."""

    def __init__(self):
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def _track(self, t: torch.Tensor) -> None:
        import weakref

        st = t.untyped_storage()
        key = st.data_ptr()
        if key == 0 or key in self.live:
            return
        self.live[key] = st.nbytes()
        self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(t, self._free, key)

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                        tracker._track(t)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)
