"""The catalog: model shapes, peers (baselines) and tolerances that bench/, tests/ and the GPU self-check share.

One import for all of it (``from dare_kernels.benchmarking import catalog``); the pieces live in
``shapes`` (model attention and latent shapes), ``peers`` (SDPA / FlexAttention / eager / diffusers guider
baselines and the SRA bias), ``tolerances`` (per-dtype tolerances against the float64 reference and the
comparison) and ``capabilities`` (what a backend declares unsupported).
"""

from __future__ import annotations

from ..reference import CFG_MODE_ID, CFG_MODES
from .capabilities import SHAPE_LIMITS, unsupported_reason
from .peers import (ATTN_PEERS, GUIDER_MODES, GUIDER_PEERS, diffusers_guider, eager_with_maps, flex_with_bias,
                    sdpa, sdpa_flash, sdpa_with_bias, sra_bias, unavailable)
from .shapes import (ATTN_SHAPES, CPU_ATTN_SHAPES, CPU_SCALE, LATENT_SHAPES, SELFTEST_SHAPES, TEST_CUT_SHAPES,
                     TINY_SHAPES, AttnShape)
from .tolerances import GRAD_TOL, TOL, Tolerance, Verdict, assert_close, compare, tolerance

__all__ = [
    "CFG_MODES", "CFG_MODE_ID", "SHAPE_LIMITS", "unsupported_reason",
    "ATTN_PEERS", "GUIDER_MODES", "GUIDER_PEERS", "diffusers_guider", "eager_with_maps", "flex_with_bias", "sdpa",
    "sdpa_flash", "sdpa_with_bias", "sra_bias", "unavailable",
    "ATTN_SHAPES", "CPU_ATTN_SHAPES", "CPU_SCALE", "LATENT_SHAPES", "SELFTEST_SHAPES", "TEST_CUT_SHAPES",
    "TINY_SHAPES", "AttnShape",
    "GRAD_TOL", "TOL", "Tolerance", "Verdict", "assert_close", "compare", "tolerance",
]
