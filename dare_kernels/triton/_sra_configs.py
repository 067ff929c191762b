"""Launch configurations of the SRA Triton kernels: autotune lists, their pruning, the heuristic configs
used with autotuning off, and the shared-memory formulas the dispatcher decides with.

Pure Python (no GPU query): everything takes the compute capability ``arch`` (major·10 + minor) so that
``aot_check --all`` can enumerate exactly what the autotuner or the dispatcher can pick on each GPU and
compile it without one. A config is ``triton.Config({BLOCK_N, BLOCK_M}, num_warps, num_stages)``.

Every list below is pruned by ``aot_check --all`` (Triton's bundled ptxas, sm_90 and sm_80, head dims
40/64/80/128/160/256, fp16/bf16/fp32): no pickable config spills registers or exceeds the shared memory
of its architecture; ``bench/results/triton_resources.md`` has the table.
"""

from __future__ import annotations

import functools

import triton

# opt-in shared memory per block (bytes): H100/H200 227 KB, A100 163 KB, other Ampere / Ada 99 KB
SMEM_LIMIT = {90: 232448, 80: 166912, 87: 166912}
SMEM_LIMIT_OTHER = 101376

# the head-looped fused-map forward keeps [BLOCK_N, next_pow2(M)] scores and map in registers and the
# whole K and V of a head in shared memory: used while next_pow2(M) <= FUSED_MAP_MAX_M and K+V fit
# min(FUSED_MAP_MAX_SMEM, FUSED_MAP_SMEM_SHARE · the GPU's shared memory); longer keys take the online
# forward plus the map-from-LSE kernel
FUSED_MAP_MAX_M = 512
FUSED_MAP_MAX_SMEM = 128 * 1024
FUSED_MAP_SMEM_SHARE = 0.6


def smem_limit(arch: int) -> int:
    """Opt-in shared memory per block of compute capability ``arch`` (90 = sm_90), in bytes."""
    return SMEM_LIMIT.get(arch, SMEM_LIMIT_OTHER)


def pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(x)))


def _cfg(n, m, w, s):
    kw = {"BLOCK_N": n} if m is None else {"BLOCK_N": n, "BLOCK_M": m}
    return triton.Config(kw, num_warps=w, num_stages=s)


# ---------------------------------------------------------------------------------------------
# shared-memory formulas (bytes), checked against the compiler by aot_check for every pickable case
# ---------------------------------------------------------------------------------------------

def fused_map_kv_bytes(block_m: int, block_d: int, block_dv: int, elem_bytes: int) -> int:
    """K and V of one head in shared memory: BLOCK_M·(BLOCK_D + BLOCK_DV) elements of the input dtype."""
    return block_m * (block_d + block_dv) * elem_bytes


def fused_map_smem(block_n: int, block_m: int, block_d: int, block_dv: int, elem_bytes: int) -> int:
    """Shared memory of ``sra_fwd_map_kernel``: K, V, the Q tile and the P tile (dot operands, one stage)."""
    return (block_m * (block_d + block_dv) + block_n * (block_d + block_m)) * elem_bytes


def use_fused_map(block_m: int, block_d: int, block_dv: int, elem_bytes: int, arch: int) -> bool:
    """Whether the forward with a map runs as the head-looped kernel (else online + map-from-LSE)."""
    cap = min(FUSED_MAP_MAX_SMEM, int(FUSED_MAP_SMEM_SHARE * smem_limit(arch)))
    return (block_m <= FUSED_MAP_MAX_M and fused_map_kv_bytes(block_m, block_d, block_dv, elem_bytes) <= cap
            and fused_map_smem(16, block_m, block_d, block_dv, elem_bytes) <= smem_limit(arch))


# ---------------------------------------------------------------------------------------------
# autotune lists and their pruning (named_args / kwargs as Triton's autotuner passes them)
# ---------------------------------------------------------------------------------------------

def fwd_configs(arch: int):
    if arch >= 90:  # H100/H200: large tiles, deeper pipelines, 8 warps for D=128 tiles
        tiles = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 4, 4), (128, 32, 8, 3), (64, 64, 4, 4),
                 (64, 128, 4, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 32, 4, 4)]
    else:  # Ampere (A100/RTX 30xx): smaller pipelines
        tiles = [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 4), (128, 128, 8, 2),
                 (64, 128, 4, 2)]
    return [_cfg(*t) for t in tiles]


def prune_fwd(configs, named_args, arch: int = 90, **kwargs):
    M = named_args["M"]
    bd = max(kwargs.get("BLOCK_D", 64), kwargs.get("BLOCK_DV", 64))
    mcap = pow2(M)
    out = []
    for c in configs:
        bn, bm = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"]
        if bm > mcap:  # no wider key block than the keys
            continue
        if bd >= 256 and bn * bm > 64 * 64:  # D=256: keep tiles within registers / shared memory
            continue
        if bd >= 128 and bn * bm >= 128 * 128 and c.num_stages >= 3:  # 230 KB of shared memory at D=128
            continue
        if kwargs.get("IEEE") == 1 and bd >= 128 and (bn * bm > 64 * 64 or c.num_stages > 2):
            continue  # float32 tiles take twice the registers and shared memory
        if bd >= 160 and c.num_stages > 3:
            continue
        out.append(c)
    return out or [_cfg(64, min(32, mcap), 4, 2)]


def fused_map_configs(arch: int):
    # the head loop is not pipelined across heads: 2 stages
    tiles = [(64, 4, 2), (32, 4, 2), (16, 4, 2), (64, 8, 2), (32, 8, 2), (16, 8, 2)]
    return [_cfg(n, None, w, s) for n, w, s in tiles]


def prune_fused_map(configs, named_args, arch: int = 90, **kwargs):
    bm = kwargs["BLOCK_M"]
    bd, bdv = kwargs.get("BLOCK_D", 64), kwargs.get("BLOCK_DV", 64)
    elem = 4 if kwargs.get("IEEE") == 1 else 2
    # scores + map tile: 2·BLOCK_N·BLOCK_M float32 spread over num_warps·32 threads (beyond 64 it spills)
    out = [c for c in configs
           if 2 * c.kwargs["BLOCK_N"] * bm / (32 * c.num_warps) <= 64
           and c.kwargs["BLOCK_N"] * max(bd, bdv) / (32 * c.num_warps) <= 128
           and fused_map_smem(c.kwargs["BLOCK_N"], bm, bd, bdv, elem) <= smem_limit(arch)]
    return out or [_cfg(16, None, 4, 2)]


def map_configs(arch: int):
    tiles = [(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3), (128, 32, 4, 3), (32, 64, 4, 2)]
    return [_cfg(*t) for t in tiles]


def prune_map(configs, named_args, arch: int = 90, **kwargs):
    mcap = pow2(named_args["map_stop"] - named_args["map_start"])
    out = [c for c in configs if c.kwargs["BLOCK_M"] <= mcap]
    return out or [_cfg(64, 16, 4, 2)]


def bwd_configs(arch: int):
    if arch >= 90:
        tiles = [(64, 128, 8, 3), (64, 64, 8, 2), (64, 64, 8, 3), (64, 64, 4, 2), (32, 64, 4, 4),
                 (128, 64, 8, 2)]
    else:
        tiles = [(64, 32, 4, 3), (64, 64, 8, 2), (32, 64, 4, 3), (64, 64, 4, 2), (64, 128, 8, 2)]
    return [_cfg(*t) for t in tiles]


def prune_bwd(configs, named_args, arch: int = 90, **kwargs):
    mcap = pow2(named_args["M"])
    bd = max(kwargs.get("BLOCK_D", 64), kwargs.get("BLOCK_DV", 64))
    out = []
    for c in configs:
        bn, bm = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"]
        if bd >= 256 and bn * bm > 32 * 64:
            continue
        if bd >= 160 and (bn * bm > 64 * 64 or c.num_stages > 2):
            continue
        if kwargs.get("IEEE") == 1 and bd >= 128 and bn * bm > 32 * 64:
            continue  # float32 operands: twice the registers and shared memory
        out.append(c)
    # the dk/dv kernel tiles keys by BLOCK_M: no wider than the keys
    out = [c for c in out if c.kwargs["BLOCK_M"] <= mcap] or out
    return out or [_cfg(32, 32, 4, 2)]


TUNE_KEY = ["N", "M", "D", "DV", "HAS_W", "HAS_MASK"]

# kernel -> (config list, pruning, autotune key); the Δ kernel has one fixed config (DELTA_CONFIG)
TUNED = {
    "sra_fwd_kernel": (fwd_configs, prune_fwd, TUNE_KEY),
    "sra_fwd_map_kernel": (fused_map_configs, prune_fused_map, TUNE_KEY + ["map_start", "map_stop"]),
    "sra_map_kernel": (map_configs, prune_map, ["N", "M", "D", "map_start", "map_stop"]),
    "sra_bwd_dkdv_kernel": (bwd_configs, prune_bwd, TUNE_KEY + ["HAS_GMAP"]),
    "sra_bwd_dq_kernel": (bwd_configs, prune_bwd, TUNE_KEY + ["HAS_GMAP"]),
}
DELTA_CONFIG = dict(BLOCK_N=64, BLOCK_M=64, num_warps=4, num_stages=3)


def autotuned(fn, name: str, arch: int):
    """``fn`` wrapped in Triton's autotuner with the configs and pruning of ``arch``."""
    configs, prune, key = TUNED[name]
    return triton.autotune(configs=configs(arch), key=key,
                           prune_configs_by={"early_config_prune": functools.partial(prune, arch=arch)})(fn)


def heuristic(name: str, M: int, block_d: int, elem_bytes: int = 2, arch: int = 90) -> dict:
    """One launch configuration per kernel (used when autotuning is off). ``M`` is the key count (the
    map width for ``sra_map_kernel``), ``block_d`` the larger padded head dim."""
    big_d = block_d >= 256
    bm = min(32 if big_d else 128, pow2(M))
    if name == "sra_fwd_kernel":
        return dict(BLOCK_N=64 if big_d else 128, BLOCK_M=min(bm, 64), num_warps=8 if block_d >= 128 else 4,
                    num_stages=2 if block_d >= 128 else 3)
    if name == "sra_fwd_map_kernel":  # scores + map: 2·BLOCK_N·BLOCK_M float32 within 64 per thread
        bn = max(16, min(64, 4096 // pow2(M)))
        return dict(BLOCK_N=bn, num_warps=8 if 2 * bn * pow2(M) > 64 * 128 else 4, num_stages=2)
    if name == "sra_map_kernel":
        return dict(BLOCK_N=64, BLOCK_M=min(64, bm), num_warps=4, num_stages=2)
    # backward kernels
    return dict(BLOCK_N=32 if big_d else 64, BLOCK_M=min(32 if big_d else 64, pow2(M)),
                num_warps=8 if big_d else 4, num_stages=2)
