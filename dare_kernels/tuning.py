"""Backend preferences filled from measurements (bench/results/). Edit only with numbers behind it."""

from __future__ import annotations

# GPU backends that ``backend="auto"`` may pick, best first. The CUDA SRA kernels join this list
# only once a GPU session has validated them against the reference and measured them faster.
_GPU_SRA_ORDER: tuple[str, ...] = ("triton",)


def preferred_gpu_backends() -> tuple[str, ...]:
    """GPU backends for SRA attention in the order ``auto`` tries them."""
    return _GPU_SRA_ORDER
