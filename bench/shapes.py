"""Model shapes of the benchmarks: the catalog's table (``dare_kernels.benchmarking.shapes``), re-exported so
bench files keep ``from shapes import ...``."""

from dare_kernels.benchmarking.shapes import (  # noqa: F401
    ATTN_SHAPES, CPU_ATTN_SHAPES, CPU_SCALE, LATENT_SHAPES, AttnShape,
)
