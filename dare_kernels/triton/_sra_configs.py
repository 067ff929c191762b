"""Launch configurations of the SRA Triton kernels: autotune lists, their pruning, the heuristic configs
used with autotuning off, and the shared-memory formulas the dispatcher decides with.

Pure Python (no GPU query): everything takes the compute capability ``arch`` (major·10 + minor) so that
``aot_check --all`` can enumerate exactly what the autotuner or the dispatcher can pick on each GPU and
compile it without one. A config is ``triton.Config({BLOCK_N, BLOCK_M}, num_warps, num_stages)``.

Every list below is pruned by ``aot_check --all`` (Triton's bundled ptxas, sm_90 and sm_80, head dims
40/64/80/128/160/256, fp16/bf16/fp32) under each Triton the pins allow (3.6, 3.7, 3.8): no pickable config
spills registers or exceeds the shared memory of its architecture on any of them, so one set of lists
serves every version; ``bench/results/triton_resources.md`` has the table, the per-version seeds
``bench/results/triton_resources-<version>.json`` the proof CI re-checks. The sm_90 tiles are chosen from
the Triton fused-attention tutorial's and this proof; none was timed on a GPU when chosen (the sweep
table, ``sweep_tables/``, holds measured choices once ``tools/triton_sweep.py`` has run on one).
"""

from __future__ import annotations

import functools
import json
import os
import warnings

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


# reduction / layout-conversion scratch Triton adds on top of the dot operands (aot_check: 64-512 B)
FUSED_MAP_SCRATCH = 1024


def fused_map_smem(block_n: int, block_m: int, block_d: int, block_dv: int, elem_bytes: int) -> int:
    """Shared memory of ``sra_fwd_map_kernel`` (one stage): K and V of a head, the Q tile and the P tile
    (the dot operands) in the input dtype, plus scratch. aot_check checks it bounds the compiled size."""
    return (block_m * (block_d + block_dv) + block_n * (block_d + block_m)) * elem_bytes + FUSED_MAP_SCRATCH


def use_fused_map(block_m: int, block_d: int, block_dv: int, elem_bytes: int, arch: int) -> bool:
    """Whether the forward with a map runs as the head-looped kernel (else online + map-from-LSE)."""
    cap = min(FUSED_MAP_MAX_SMEM, int(FUSED_MAP_SMEM_SHARE * smem_limit(arch)))
    if elem_bytes == 4:  # float32 FMA dots spill at every fused tile aot_check tried: two kernels
        return False
    return (block_m <= FUSED_MAP_MAX_M and fused_map_kv_bytes(block_m, block_d, block_dv, elem_bytes) <= cap
            and bool(_fused_candidates(arch, block_m, block_d, block_dv, elem_bytes)))


# ---------------------------------------------------------------------------------------------
# autotune lists and their pruning (named_args / kwargs as Triton's autotuner passes them)
#
# The lists are per padded head dim class (BLOCK_D <= 64, 128, 256) and operand width: float32 runs exact
# FMA dots (IEEE) whose operands take twice the registers and shared memory. They were cut to what
# ``aot_check --all`` compiles without a spill and within the shared memory of sm_90 and sm_80; the
# first entry of each list is also the config used with autotuning off (``heuristic``).
# ---------------------------------------------------------------------------------------------

def _dclass(kwargs) -> int:
    bd = max(kwargs.get("BLOCK_D", 64), kwargs.get("BLOCK_DV", 64))
    return 64 if bd <= 64 else 128 if bd <= 128 else 256


def _wide(kwargs) -> bool:
    return kwargs.get("IEEE") == 1


# (BLOCK_N, BLOCK_M, num_warps, num_stages) by (arch >= 90, float32, head dim class). float32 is the
# correctness dtype (exact dots, no tensor cores): one tile, no autotuning over it
# sm_90 D<=128: the fused-attention tutorial's Hopper tile first (128 queries x 64 keys, 8 warps, 3
# stages), chosen from the tutorial and the resource proof, not timed here (its 4-stage variant spills
# 8-28 B at every D<=128 under Triton 3.7; 128 x 128 keys would double the score tile past the 243 registers
# the 64-key tile already takes).
# Every tile is spill-free under Triton 3.6, 3.7 and 3.8 (aot_check); replaced there: sm_80 (64, 64, 4, 3)
# and (128, 64, 8, 3) at D=40 (52 B on 3.6, 8 B on 3.8), sm_80 (64, 64, 4, 2) at D=80/128 (8 B on 3.6),
# sm_90 (64, 32, 4, 2) at D=160/256 (4 B on 3.8)
_FWD = {
    (True, False, 64): [(128, 64, 8, 3), (64, 64, 4, 3)],
    (True, False, 128): [(128, 64, 8, 3), (64, 64, 4, 3)],
    (True, False, 256): [(64, 64, 8, 2), (64, 32, 8, 2)],
    (False, False, 64): [(128, 64, 8, 2), (128, 32, 8, 3)],
    (False, False, 128): [(64, 64, 8, 2), (128, 32, 8, 2)],
    (False, False, 256): [(64, 32, 8, 2), (32, 32, 4, 2)],
}
# float32 (FMA dots): (64, 32, 4, 2) at D<=64, (32, 32, 4/8, 2) at D>=128 spill hundreds of bytes;
# (16, 32, 4, 2) at D>=80 spills 12-368 B, and at D>=160 on sm_90 ptxas reports 32 registers and 10 KB of
# spill (it gives up allocating): 8 warps halve the FMA operands each thread holds; at D=80 on sm_80
# (16, 32, 8, 2) still spills 8 B, one stage does not (78 registers)
# (16, 32, 4, 2) at D<=64 spilled 4 B on sm_90 under Triton 3.6: 8 warps (67 registers)
_FWD_FP32 = {64: [(16, 32, 8, 2)], 128: [(16, 32, 8, 1)], 256: [(16, 32, 8, 2)]}
_MAP = {(False, 64): [(64, 64, 4, 3), (128, 64, 8, 3)],
        (False, 128): [(64, 64, 4, 2), (64, 32, 4, 2)],
        (False, 256): [(64, 32, 8, 2), (32, 32, 4, 2)],
        (True, 64): [(16, 32, 4, 2)],
        (True, 128): [(16, 32, 4, 2)],
        (True, 256): [(16, 32, 4, 2)]}
# dk/dv tiles keys by BLOCK_M and holds dk, dv (BLOCK_M x D float32); dq tiles queries by BLOCK_N
# (aot_check: dk/dv (64, 64, 4, 2) and (64, 32, 4, 2) spill at D<=64, (16, 32, 4, 2) at D=256; dq
# (32, 16, 4, 2), (32, 32, 8, 2), (32, 32, 4, 1) and, with the map gradient on sm_90, (16, 32, 8, 2) at
# D=160/256; float32 (32, 32, 8, 2) at D=128, dk/dv (16, 32, 4, 2) at D>=80 (up to 21 KB on sm_90), dq
# (32, 32, 4, 2) at D=40 on sm_80 with the map gradient)
_DKDV = {(False, 64): [(64, 32, 8, 2)],  # (32, 64, 8, 2) spills 32-40 B on sm_80 at D<=64 with the map grad
         (False, 128): [(32, 64, 8, 2), (64, 32, 8, 2)],
         (False, 256): [(32, 32, 8, 2)],
         # Triton 3.6 spilled float32 (32, 32, 4, 2) at D<=64 (8 B to 7.6 KB on sm_90; (32, 32, 8, 2): 16 B;
         # (16, 32, 8, 1): 8 B on 3.8) and (16, 32, 8, 2) at D>=160 (416-516 B; (16, 16, 8, 2): 20 B):
         # 16 keys, one stage
         (True, 64): [(16, 16, 8, 1)],
         (True, 128): [(16, 32, 8, 2)],
         (True, 256): [(16, 16, 8, 1)]}
_DQ = {(False, 64): [(64, 64, 4, 2), (64, 32, 4, 2)],
       (False, 128): [(64, 32, 8, 2), (64, 64, 8, 2)],
       (False, 256): [(16, 32, 8, 1)],  # one stage: 126 registers on sm_90 where two spill 4-8 B
       # float32 (16, 32, 4, 2) at D<=128 spilled 4-12 B on sm_90 and sm_80 under Triton 3.8: 8 warps
       (True, 64): [(16, 32, 8, 2)],
       (True, 128): [(16, 32, 8, 2)],
       (True, 256): [(16, 32, 4, 2)]}
# before sm_90 (mma.sync layouts take more registers): dq tiles where the shared list spills there under
# Triton 3.6: (64, 64, 4, 2) 28-40 B, (64, 64, 8, 2) 48 B
_DQ_AMPERE = {(False, 64): [(64, 32, 4, 2)]}
_DKDV_AMPERE = {(False, 64): [(32, 32, 4, 2)]}  # (64, 32, 8, 2): 8 B at D=40 (Triton 3.8)
# the fused-map kernel: (BLOCK_N, num_warps, num_stages) in order of preference; BLOCK_M = next_pow2(M)
# is fixed by the keys, and the first candidate within the register budget is the one config launched
# (a head loop over tiles of at most 64 queries: little to tune). One stage: with two, Triton pipelines
# the head loop and double-buffers K, V and Q (aot_check: 344 KB at BLOCK_N=64, BLOCK_M=128, D=256)
_FUSED = [(64, 4, 1), (64, 8, 1), (32, 4, 1), (32, 8, 1), (16, 4, 1), (16, 8, 1)]


def _clip_m(tiles, mcap):
    """Tiles no wider in M than the keys (but at least 32: short keys only occur in tests); when none
    is, the first tile narrowed to that width."""
    mcap = max(32, mcap)
    out = [t for t in tiles if t[1] <= mcap]
    return out or [(tiles[0][0], mcap, tiles[0][2], tiles[0][3])]


def fwd_configs(arch: int):
    """Every tile of ``arch``; ``prune_fwd`` keeps the ones of the launch's head dim and dtype."""
    tiles = {t for k, v in _FWD.items() if k[0] == (arch >= 90) for t in v}
    tiles |= {t for v in _FWD_FP32.values() for t in v}
    return [_cfg(*t) for t in sorted(tiles)]


def _fwd_tiles(arch, kwargs, M):
    d = _dclass(kwargs)
    tiles = _FWD_FP32[d] if _wide(kwargs) else _FWD[(arch >= 90, False, d)]
    return _clip_m(tiles, pow2(M))


def _keep(configs, tiles):
    """The configs of ``configs`` that are in ``tiles`` (in the order of ``tiles``); tiles not in the
    list (a narrowed fallback) become new configs."""
    by_tile = {(c.kwargs["BLOCK_N"], c.kwargs.get("BLOCK_M"), c.num_warps, c.num_stages): c for c in configs}
    return [by_tile.get(t) or _cfg(*t) for t in tiles]


def prune_fwd(configs, named_args, arch: int = 90, **kwargs):
    return _keep(configs, _fwd_tiles(arch, kwargs, named_args["M"]))


def fused_map_configs(arch: int):
    return [_cfg(n, None, w, s) for n, w, s in _FUSED]


def fused_map_regs(block_n: int, block_m: int, block_d: int, block_dv: int, elem_bytes: int, warps: int) -> float:
    """32-bit registers per thread the fused-map kernel's tiles need: scores + map (2·BLOCK_N·BLOCK_M)
    and the output (BLOCK_N·BLOCK_DV) in float32, the Q, K and V operands in the input dtype."""
    fp32 = 2 * block_n * block_m + block_n * block_dv
    operands = (block_n * block_d + block_m * (block_d + block_dv)) * elem_bytes / 4
    return (fp32 + operands) / (32 * warps)


# aot_check: BLOCK_N=64, BLOCK_M=128, D=128, 8 warps (160 by the formula) spills 808 B; on sm_80
# BLOCK_N=32, BLOCK_M=16, D=256, 8 warps (68) spills 8 B
FUSED_MAP_REG_BUDGET = 64


def _fused_candidates(arch, block_m, bd, bdv, elem):
    return [(n, None, w, s) for n, w, s in _FUSED
            if fused_map_regs(n, block_m, bd, bdv, elem, w) <= FUSED_MAP_REG_BUDGET
            and fused_map_smem(n, block_m, bd, bdv, elem) <= smem_limit(arch)]


def _fused_tiles(arch, kwargs):
    elem = 4 if _wide(kwargs) else 2
    out = _fused_candidates(arch, kwargs["BLOCK_M"], kwargs.get("BLOCK_D", 64), kwargs.get("BLOCK_DV", 64), elem)
    return out[:1] or [(16, None, 8, 1)]  # (use_fused_map never sends a case without a candidate)


def prune_fused_map(configs, named_args, arch: int = 90, **kwargs):
    return _keep(configs, _fused_tiles(arch, kwargs))


def map_configs(arch: int):
    return [_cfg(*t) for t in sorted({t for v in _MAP.values() for t in v})]


def _map_tiles(arch, kwargs, n_map):
    return _clip_m(_MAP[(_wide(kwargs), _dclass(kwargs))], pow2(n_map))


def prune_map(configs, named_args, arch: int = 90, **kwargs):
    return _keep(configs, _map_tiles(arch, kwargs, named_args["map_stop"] - named_args["map_start"]))


def _dq_table(arch: int) -> dict:
    return {**_DQ, **_DQ_AMPERE} if arch < 90 else _DQ


def _dkdv_table(arch: int) -> dict:
    return {**_DKDV, **_DKDV_AMPERE} if arch < 90 else _DKDV


def dkdv_configs(arch: int):
    return [_cfg(*t) for t in sorted({t for v in _dkdv_table(arch).values() for t in v})]


def dq_configs(arch: int):
    return [_cfg(*t) for t in sorted({t for v in _dq_table(arch).values() for t in v})]


def _bwd_tiles(table, kwargs, M):
    return _clip_m(table[(_wide(kwargs), _dclass(kwargs))], pow2(M))


def prune_dkdv(configs, named_args, arch: int = 90, **kwargs):
    return _keep(configs, _bwd_tiles(_dkdv_table(arch), kwargs, named_args["M"]))


def prune_dq(configs, named_args, arch: int = 90, **kwargs):
    return _keep(configs, _bwd_tiles(_dq_table(arch), kwargs, named_args["M"]))


def m_class(m: int) -> int:
    """The key-count class of the autotuning key: the width ``_clip_m`` prunes with (the tile lists hold
    BLOCK_M <= MAX_TILE_M), so M = 77, 226 and 512 share a class and reuse one tuning."""
    return min(max(32, pow2(m)), MAX_TILE_M)


MAX_TILE_M = 128

# kernel -> (config list, pruning); the Δ kernel has one fixed config (delta_config)
TUNED = {
    "sra_fwd_kernel": (fwd_configs, prune_fwd),
    "sra_fwd_map_kernel": (fused_map_configs, prune_fused_map),
    "sra_map_kernel": (map_configs, prune_map),
    "sra_bwd_dkdv_kernel": (dkdv_configs, prune_dkdv),
    "sra_bwd_dq_kernel": (dq_configs, prune_dq),
}
_KEY_FLAGS = ("D", "DV", "BLOCK_D", "BLOCK_DV", "IEEE", "ALIGN", "HAS_W", "HAS_MASK", "HAS_GMAP", "BLOCK_M")


def tune_key(name: str, named_args: dict, kwargs: dict) -> tuple:
    """The autotuning key of a launch: head dims, dtype, flags and the key-count class (never N or the
    raw M: a new sequence length reuses the tuning of its class)."""
    m = (named_args["map_stop"] - named_args["map_start"]) if name == "sra_map_kernel" else named_args["M"]
    dims = {**named_args, **kwargs}
    return (name, str(getattr(named_args.get("Q"), "dtype", "")), m_class(m),
            *(dims.get(k) for k in _KEY_FLAGS))


def delta_config(block_d: int, elem_bytes: int) -> dict:
    """The Δ kernel's launch config (not autotuned: it is a small part of the backward)."""
    if block_d <= 64 and elem_bytes == 2:
        return dict(BLOCK_N=64, BLOCK_M=64, num_warps=4, num_stages=2)
    if block_d <= 128 and elem_bytes == 2:  # (64, 64, 4, 2) spills 8 B at D=128 with the map gradient
        return dict(BLOCK_N=64, BLOCK_M=32, num_warps=4, num_stages=2)
    if block_d > 128 and elem_bytes == 4:  # (32, 32, 4, 2) spilled 9.3 KB on sm_90 with the map gradient
        return dict(BLOCK_N=16, BLOCK_M=32, num_warps=4, num_stages=2)  # (3.8); (16, ...) at D<=128 64 B (3.6)
    return dict(BLOCK_N=32, BLOCK_M=32, num_warps=4, num_stages=2)


def candidate_tiles(name: str, M: int, block_d: int, elem_bytes: int = 2, arch: int = 90) -> list[tuple]:
    """The spill-free tiles (BLOCK_N, BLOCK_M or None, num_warps, num_stages) kernel ``name`` may launch
    with for ``M`` keys (the map width for ``sra_map_kernel``), head dim ``block_d`` and operand width
    ``elem_bytes``, in order of preference: what the autotuner tries, and what the sweep may choose from."""
    kw = dict(BLOCK_D=block_d, BLOCK_DV=block_d, IEEE=1 if elem_bytes == 4 else 0)
    if name == "sra_fwd_kernel":
        return _fwd_tiles(arch, kw, M)
    if name == "sra_fwd_map_kernel":
        return _fused_tiles(arch, dict(kw, BLOCK_M=pow2(M)))
    if name == "sra_map_kernel":
        return _map_tiles(arch, kw, M)
    return _bwd_tiles(_dkdv_table(arch) if name == "sra_bwd_dkdv_kernel" else _dq_table(arch), kw, M)


def heuristic(name: str, M: int, block_d: int, elem_bytes: int = 2, arch: int = 90) -> dict:
    """The launch config used with autotuning off: the arch's sweep-table choice for this kernel, head-dim
    class and dtype when it has one and it is among ``candidate_tiles``, else the first candidate. ``M``
    is the key count (the map width for ``sra_map_kernel``; the padded key count for the fused-map
    kernel), ``block_d`` the larger padded head dim."""
    tiles = candidate_tiles(name, M, block_d, elem_bytes, arch)
    picked = sweep_table(arch).get(table_key(name, block_d, elem_bytes))
    t = tuple(picked) if picked is not None and tuple(picked) in [tuple(x) for x in tiles] else tiles[0]
    n, m, w, s = t
    return dict(BLOCK_N=n, **({} if m is None else {"BLOCK_M": m}), num_warps=w, num_stages=s)


# ---------------------------------------------------------------------------------------------
# measured choices: tools/triton_sweep.py times the candidates on a GPU and writes
# sweep_tables/sm_<arch>.json ({"device", "date", "commit", "triton", "choices": {table_key: tile}});
# a choice is used only while it is still one of candidate_tiles (all of which aot_check proves)
# ---------------------------------------------------------------------------------------------

TABLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sweep_tables")


def table_key(name: str, block_d: int, elem_bytes: int) -> str:
    """The sweep table's key: kernel, head-dim class (64, 128, 256) and operand width."""
    d = 64 if block_d <= 64 else 128 if block_d <= 128 else 256
    return f"{name}/D{d}/{'fp32' if elem_bytes == 4 else 'half'}"


def table_path(arch: int) -> str:
    return os.path.join(TABLE_DIR, f"sm_{arch}.json")


@functools.lru_cache(maxsize=None)
def sweep_table(arch: int) -> dict:
    """The committed sweep choices of ``arch`` ({} when there is no table; a broken one warns once)."""
    path = table_path(arch)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return dict(json.load(f)["choices"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"dare_kernels.triton: ignoring the sweep table {path}: {exc}", stacklevel=2)
        return {}
