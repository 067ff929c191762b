"""Backend preferences filled from measurements (bench/results/). Edit only with numbers behind it.

dare_kernels/backends.py reads these: ``AUTO_ORDER`` is what ``backend="auto"`` tries, best first, per op
and device type; a backend whose ``*_VALIDATED_ON_GPU`` flag is False is never tried by ``auto`` on a GPU.
"""

from __future__ import annotations

# op -> device type -> backends "auto" tries, best first. The CUDA kernels join a GPU list only once a GPU
# session has validated them against the reference and measured them faster.
AUTO_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "sra_attention": {"cuda": ("triton",), "cpu": ("cpu",)},
    "rectified_cfg": {"cuda": ("triton",), "cpu": ("cpu",)},
}

# Validation state of the CUDA SRA kernels (csrc/cuda/sra_attention_*.cu): compile-checked for sm_80 and
# sm_90a in CI (tools/nvcc_check.py) but not yet run on a GPU. Flip only after tests/test_sra_cuda.py and
# tools/sanitize_sra_cuda.sh pass on a GPU; "auto" then still needs measurements to prefer "cuda".
CUDA_SRA_VALIDATED_ON_GPU = False

# The CUDA rectified-CFG kernels (csrc/cuda/rectified_cfg*.cu) are compile-checked only, like the SRA ones.
CUDA_CFG_VALIDATED_ON_GPU = False

