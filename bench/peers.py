"""The benchmark peers: the catalog's baselines (``dare_kernels.benchmarking.peers``), re-exported so bench
files keep ``import peers``."""

from dare_kernels.benchmarking.peers import (  # noqa: F401
    ATTN_PEERS, GUIDER_MODES, GUIDER_PEERS, diffusers_guider, eager_with_maps, flash_attn_nobias, flex_with_bias,
    guider_compiled, guider_eager, make_guider, sdpa, sdpa_flash, sdpa_with_bias, sra_bias, unavailable,
    xformers_nobias, xformers_with_bias,
)
