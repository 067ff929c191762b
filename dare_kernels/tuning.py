"""Backend preferences filled from measurements (bench/results/). Edit only with numbers behind it."""

from __future__ import annotations

# GPU backends that ``backend="auto"`` may pick, best first. The CUDA SRA kernels join this list
# only once a GPU session has validated them against the reference and measured them faster.
_GPU_SRA_ORDER: tuple[str, ...] = ("triton",)


# Validation state of the CUDA SRA kernels (csrc/cuda/sra_attention_*.cu): compile-checked for sm_80 and
# sm_90a in CI (tools/nvcc_check.py) but not yet run on a GPU. Flip only after tests/test_sra_cuda.py and
# tools/sanitize_sra_cuda.sh pass on a GPU; "auto" then still needs measurements to prefer "cuda".
CUDA_SRA_VALIDATED_ON_GPU = False
CUDA_SRA_STATUS = "CUDA kernels built, not validated on a GPU (only backend='cuda' selects them)"


def preferred_gpu_backends() -> tuple[str, ...]:
    """GPU backends for SRA attention in the order ``auto`` tries them."""
    return _GPU_SRA_ORDER
