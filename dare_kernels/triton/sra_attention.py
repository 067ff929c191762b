"""Triton SRA attention (SPEC.md §1): the custom ops ``dare_kernels::sra_attention_{fwd,bwd}_triton``.

Schemas, output layout and semantics are those documented at the top of ``dare_kernels/ops/sra_attention.py``;
importing this module defines the two ops and registers the shared fake impls and autograd.

Kernel choice (made inside the op from the shapes):
- forward, no map: ``sra_fwd_kernel``, one program per (query block, b·h), online softmax over key
  blocks (a single iteration when M fits one block, the usual cross-attention case).
- forward with a map, short keys (``_use_fused_map``: next_pow2(M) ≤ 512 and the head's K and V in
  16-bit fit 128 KB, e.g. LTX-Video M=128, AnimateDiff M=77): ``sra_fwd_map_kernel``, one program per
  (query block, b) looping over the heads in order; the map tile stays in registers and is stored once,
  so the head average is deterministic without atomics and costs no extra score computation.
- forward with a map, longer keys (Wan M=512 D=128, joint attention): ``sra_fwd_kernel`` then
  ``sra_map_kernel``, which recomputes the scores of the map's keys only from the final LSE, summing the
  heads in order inside one program (deterministic). Its cost is one extra Q·Kᵀ over the map's keys:
  about 1% for CogVideoX's 226 text columns, about half the forward for a full M=512 map. No
  non-deterministic (atomic) option exists.
- backward: Δ precompute (dO·O, the map term Σ_j P dA / H, minus grad_lse), dk/dv/dw per key block looping
  over the queries — split over query ranges with float32 partials summed in a fixed order when there
  are too few key blocks to fill the GPU (short text keys) — and dq per query block. dw's column sums
  need no atomics: deterministic throughout.

float32 inputs use exact float32 dot products (no TF32); float16/bfloat16 use tensor cores with float32
accumulation. On GPUs the block sizes are autotuned (configs for Hopper and Ampere, pruned with
``aot_check``, keyed on N, M, the head dims and the flags; ``DARE_KERNELS_TRITON_AUTOTUNE=0`` uses one
heuristic config instead); under ``TRITON_INTERPRET=1`` one small fixed configuration runs, on CPU tensors.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton

from . import _sra_kernels as K
from ..ops import sra_attention as _op
from .. import switches

__all__ = ["sra_attention_fwd_triton", "sra_attention_bwd_triton"]

# the head-looped fused-map forward keeps [BLOCK_N, next_pow2(M)] scores and map in registers and the
# whole K and V of a head in shared memory: used while next_pow2(M) <= FUSED_MAP_MAX_M and K+V (16-bit)
# fit FUSED_MAP_MAX_SMEM bytes; longer keys take the online forward plus the map-from-LSE kernel
FUSED_MAP_MAX_M = 512
FUSED_MAP_MAX_SMEM = 128 * 1024
# benchmarks only: "fused" or "two-kernel" forces that map path (None: chosen from the shapes)
FORCE_MAP_PATH: str | None = None
# block size of every kernel in the interpreter (small so that tests cover multi-block loops)
INTERPRET_BLOCK = 16

_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpret() -> bool:
    return _INTERPRET_AT_IMPORT


def _use_fused_map(block_m: int, block_d: int, block_dv: int) -> bool:
    """Whether the forward with a map runs as one head-looped kernel (else online + map-from-LSE)."""
    if FORCE_MAP_PATH is not None:
        return FORCE_MAP_PATH == "fused"
    if _interpret():  # tests: M <= 64 fused, longer keys through the two-kernel path
        return block_m <= 64
    smem = min(FUSED_MAP_MAX_SMEM, int(0.6 * _shared_memory_per_block()))
    return block_m <= FUSED_MAP_MAX_M and block_m * (block_d + block_dv) * 2 <= smem


@functools.lru_cache(maxsize=None)
def _shared_memory_per_block() -> int:
    """Opt-in shared memory per block of the current GPU (bytes)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin:
        return int(optin)
    major, minor = props.major, props.minor
    return 227 * 1024 if major >= 9 else 163 * 1024 if (major, minor) == (8, 0) else 99 * 1024


def _dot_mode(dtype: torch.dtype) -> int:
    """``IEEE`` of the kernels: 1 = exact float32 dots, 0 = tensor cores, 2 = upcast (interpreter bf16)."""
    if dtype == torch.float32:
        return 1
    if dtype == torch.bfloat16 and _interpret():
        return 2
    return 0


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(x)))


# ---------------------------------------------------------------------------------------------
# autotuning (GPU only)
# ---------------------------------------------------------------------------------------------

def _is_hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def _cfg(**kw):
    warps = kw.pop("w")
    stages = kw.pop("s")
    return triton.Config(kw, num_warps=warps, num_stages=stages)


def _fwd_configs():
    # pruned with aot_check (sm_90, bf16): at D=128 (128, 128, 8, 3) needs 230 KB of shared memory (pruned
    # below, fine at D=64) and (128, 64, 4, 3) spills; the rest compile within 227 KB without spills
    if _is_hopper():  # H100/H200: large tiles, deeper pipelines, 8 warps for D=128 tiles
        tiles = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 4, 4), (128, 32, 8, 3), (64, 64, 4, 4),
                 (64, 128, 4, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 32, 4, 4)]
    else:  # Ampere (A100/RTX 30xx, 164/100 KB shared memory): smaller pipelines; (128, 64, 4, 3) spills
        tiles = [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 4), (128, 128, 8, 2),
                 (64, 128, 4, 2)]
    return [_cfg(BLOCK_N=n, BLOCK_M=m, w=w, s=s) for n, m, w, s in tiles]


def _prune_fwd(configs, named_args, **kwargs):
    M = named_args["M"]
    bd = max(kwargs.get("BLOCK_D", 64), kwargs.get("BLOCK_DV", 64))
    mcap = _pow2(M)
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
            continue  # float32 tiles take twice the registers and shared memory (aot_check: spills)
        if bd >= 160 and c.num_stages > 3:
            continue
        out.append(c)
    if not out:
        out = [triton.Config({"BLOCK_N": 64, "BLOCK_M": min(32, mcap)}, num_warps=4, num_stages=2)]
    return out


def _fused_map_configs():
    # the head loop is not pipelined across heads: 2 stages; larger tiles spill (aot_check, M=128, D=128)
    tiles = [(64, 4, 2), (32, 4, 2), (16, 4, 2), (64, 8, 2), (32, 8, 2), (16, 8, 2)]
    return [_cfg(BLOCK_N=n, w=w, s=s) for n, w, s in tiles]


def _prune_fused_map(configs, named_args, **kwargs):
    bm = kwargs["BLOCK_M"]
    bd = max(kwargs.get("BLOCK_D", 64), kwargs.get("BLOCK_DV", 64))
    # scores + map tile: 2·BLOCK_N·BLOCK_M float32 spread over num_warps·32 threads (beyond 64 it spills)
    out = [c for c in configs
           if 2 * c.kwargs["BLOCK_N"] * bm / (32 * c.num_warps) <= 64
           and c.kwargs["BLOCK_N"] * bd / (32 * c.num_warps) <= 128]
    return out or [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=2)]


def _map_configs():
    tiles = [(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3), (128, 32, 4, 3), (32, 64, 4, 2)]
    return [_cfg(BLOCK_N=n, BLOCK_M=m, w=w, s=s) for n, m, w, s in tiles]


def _prune_map(configs, named_args, **kwargs):
    mcap = _pow2(named_args["map_stop"] - named_args["map_start"])
    out = [c for c in configs if c.kwargs["BLOCK_M"] <= mcap]
    return out or [triton.Config({"BLOCK_N": 64, "BLOCK_M": 16}, num_warps=4, num_stages=2)]


def _bwd_configs():
    if _is_hopper():  # aot_check, D=128: (128, 64, 8, 3) needs 231 KB, (32, 128, 4, 3) spills 1.7 KB
        tiles = [(64, 128, 8, 3), (64, 64, 8, 2), (64, 64, 8, 3), (64, 64, 4, 2), (32, 64, 4, 4),
                 (128, 64, 8, 2)]
    else:  # aot_check sm_80, D=128: (32, 128, 4, 2) spills 11 KB, (64, 64, 4, 3) 240 B
        tiles = [(64, 32, 4, 3), (64, 64, 8, 2), (32, 64, 4, 3), (64, 64, 4, 2), (64, 128, 8, 2)]
    return [_cfg(BLOCK_N=n, BLOCK_M=m, w=w, s=s) for n, m, w, s in tiles]


def _prune_bwd(configs, named_args, **kwargs):
    mcap = _pow2(named_args["M"])
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
    return out or [triton.Config({"BLOCK_N": 32, "BLOCK_M": 32}, num_warps=4, num_stages=2)]


_TUNE_KEY = ["N", "M", "D", "DV", "HAS_W", "HAS_MASK"]


# DARE_KERNELS_TRITON_AUTOTUNE=0 launches one heuristic configuration per kernel instead of autotuning
# (fast start-up: correctness runs over many small shapes compile once instead of once per config)
AUTOTUNE = switches.get("DARE_KERNELS_TRITON_AUTOTUNE")


def set_autotune(enabled: bool) -> bool:
    """Turn GPU autotuning on or off for later launches; returns the previous setting."""
    global AUTOTUNE
    previous, AUTOTUNE = AUTOTUNE, bool(enabled)
    return previous


def _heuristic(name: str, M: int, block_d: int) -> dict:
    """One reasonable launch configuration per kernel (used when autotuning is off)."""
    big_d = block_d >= 256
    bm = min(32 if big_d else 128, _pow2(M))
    if name == "sra_fwd_kernel":
        return dict(BLOCK_N=64 if big_d else 128, BLOCK_M=min(bm, 64), num_warps=8 if block_d >= 128 else 4,
                    num_stages=2 if block_d >= 128 else 3)
    if name == "sra_fwd_map_kernel":  # scores + map: 2·BLOCK_N·BLOCK_M float32 within 64 per thread
        bn = max(16, min(64, 4096 // _pow2(M)))
        return dict(BLOCK_N=bn, num_warps=8 if 2 * bn * _pow2(M) > 64 * 128 else 4, num_stages=2)
    if name == "sra_map_kernel":
        return dict(BLOCK_N=64, BLOCK_M=min(64, bm), num_warps=4, num_stages=2)
    # backward kernels
    return dict(BLOCK_N=32 if big_d else 64, BLOCK_M=min(32 if big_d else 64, _pow2(M)),
                num_warps=8 if big_d else 4, num_stages=2)


def _launch_kwargs(name: str, M: int, block_d: int) -> dict:
    if _interpret():
        return {"BLOCK_N": INTERPRET_BLOCK} if name == "sra_fwd_map_kernel" else \
            {"BLOCK_N": INTERPRET_BLOCK, "BLOCK_M": INTERPRET_BLOCK}
    if AUTOTUNE:
        return {}
    return _heuristic(name, M, block_d)


def _kernel(name: str):
    """The kernel ``name``: autotuned on GPUs (unless turned off), the raw jit function otherwise."""
    if _interpret() or not AUTOTUNE:
        return getattr(K, name)
    return _tuned_kernel(name)


@functools.lru_cache(maxsize=None)
def _tuned_kernel(name: str):
    fn = getattr(K, name)
    table = {
        "sra_fwd_kernel": (_fwd_configs, _prune_fwd, _TUNE_KEY),
        "sra_fwd_map_kernel": (_fused_map_configs, _prune_fused_map, _TUNE_KEY + ["map_start", "map_stop"]),
        "sra_map_kernel": (_map_configs, _prune_map, ["N", "M", "D", "map_start", "map_stop"]),
        "sra_bwd_delta_kernel": (None, None, None),
        "sra_bwd_dkdv_kernel": (_bwd_configs, _prune_bwd, _TUNE_KEY + ["HAS_GMAP"]),
        "sra_bwd_dq_kernel": (_bwd_configs, _prune_bwd, _TUNE_KEY + ["HAS_GMAP"]),
    }
    configs, prune, key = table[name]
    if configs is None:
        return fn
    return triton.autotune(configs=configs(), key=key, prune_configs_by={"early_config_prune": prune})(fn)


# ---------------------------------------------------------------------------------------------
# launch helpers
# ---------------------------------------------------------------------------------------------

def _check_device(query: torch.Tensor) -> None:
    if query.device.type == "cuda":
        if _interpret():
            raise RuntimeError("dare_kernels.triton: the kernels were built for TRITON_INTERPRET=1 but got CUDA "
                               "tensors; start the process without TRITON_INTERPRET")
        return
    if not _interpret():
        raise RuntimeError(f"dare_kernels.triton needs CUDA tensors, got {query.device}; for CPU tensors set "
                           "TRITON_INTERPRET=1 before dare_kernels.triton.sra_attention is first imported")
    if query.dtype == torch.float64:
        raise TypeError("the Triton SRA kernels take float16, bfloat16 and float32, got float64")


def _w_args(token_weight, query):
    if token_weight is None:
        return query, (0, 0, 0)
    return token_weight, tuple(token_weight.stride())


def _mask_args(mask, query):
    if mask is None:
        return query, (0, 0)
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return m, tuple(m.stride())


# the dk/dv kernel splits the queries when there are too few key blocks to fill the GPU
DKDV_SPLIT_ALIGN = 128  # a split's rows: multiple of every BLOCK_N candidate
MAX_DKDV_SPLITS = 64


def _dkdv_split(BH: int, N: int, M: int) -> tuple[int, int]:
    """(number of query splits, rows per split) for the dk/dv kernel: about 4 programs per SM."""
    if _interpret():  # tests: split in two whenever there are more than two query blocks
        align = INTERPRET_BLOCK
        if N <= 2 * align:
            return 1, N
        rows = triton.cdiv(triton.cdiv(N, 2), align) * align
        return triton.cdiv(N, rows), rows
    align = DKDV_SPLIT_ALIGN
    target = 4 * torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    key_blocks = triton.cdiv(M, 64)
    want = min(MAX_DKDV_SPLITS, triton.cdiv(target, max(1, BH * key_blocks)), triton.cdiv(N, 4 * align))
    if want <= 1:
        return 1, N
    rows = triton.cdiv(triton.cdiv(N, want), align) * align
    return triton.cdiv(N, rows), rows


def _grid_n(block_key: str, N: int, second: int):
    return lambda meta: (triton.cdiv(N, meta[block_key]), second)


# ---------------------------------------------------------------------------------------------
# the custom ops
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("dare_kernels::sra_attention_fwd_triton", mutates_args=())
def sra_attention_fwd_triton(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, token_weight: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor], strength: float, scale: float, map_start: int, map_stop: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SRA forward. query [B,H,N,D], key [B,H,M,D], value [B,H,M,Dv] (fp16/bf16/fp32), token_weight
    [B,H,M] or None, mask bool [B,M] or None. Returns out [B,H,N,Dv] (memory [B,N,H,Dv]), lse float32
    [B,H,N], map float32 [B,N,map_stop-map_start]."""
    _check_device(query)
    B, H, N, D = query.shape
    M, DV = key.shape[2], value.shape[3]
    out = query.new_empty((B, N, H, DV)).transpose(1, 2)
    lse = torch.empty((B, H, N), device=query.device, dtype=torch.float32)
    n_map = map_stop - map_start
    amap = torch.empty((B, N, n_map), device=query.device, dtype=torch.float32)
    if N == 0 or B * H == 0:
        amap.zero_()
        return out, lse, amap
    w, w_strides = _w_args(token_weight, query)
    mask, m_strides = _mask_args(key_padding_mask, query)
    common = dict(HAS_W=token_weight is not None, HAS_MASK=key_padding_mask is not None,
                  IEEE=_dot_mode(query.dtype), BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV))
    qk_scale = float(scale) * K.LOG2E
    strength = float(strength)
    bm_full = _pow2(M)

    if n_map > 0 and _use_fused_map(bm_full, common["BLOCK_D"], common["BLOCK_DV"]):
        kern = _kernel("sra_fwd_map_kernel")
        kern[_grid_n("BLOCK_N", N, B)](
            query, key, value, w, mask, out, lse, amap,
            *query.stride(), *key.stride(), *value.stride(), *w_strides, *m_strides, *out.stride(),
            *amap.stride(),
            H, N, M, D, DV, map_start, map_stop, qk_scale, strength, 1.0 / H,
            BLOCK_M=bm_full, **common, **_launch_kwargs("sra_fwd_map_kernel", M, common["BLOCK_D"]),
        )
        return out, lse, amap

    kern = _kernel("sra_fwd_kernel")
    kern[_grid_n("BLOCK_N", N, B * H)](
        query, key, value, w, mask, out, lse,
        *query.stride(), *key.stride(), *value.stride(), *w_strides, *m_strides, *out.stride(),
        H, N, M, D, DV, qk_scale, strength,
        **common, **_launch_kwargs("sra_fwd_kernel", M, max(common["BLOCK_D"], common["BLOCK_DV"])),
    )
    if n_map > 0:
        kern = _kernel("sra_map_kernel")
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(n_map, meta["BLOCK_M"]), B)  # noqa: E731
        kern[grid](
            query, key, w, mask, lse, amap,
            *query.stride(), *key.stride(), *w_strides, *m_strides, *amap.stride(),
            H, N, M, D, map_start, map_stop, qk_scale, strength, 1.0 / H,
            HAS_W=common["HAS_W"], HAS_MASK=common["HAS_MASK"], IEEE=common["IEEE"], BLOCK_D=common["BLOCK_D"],
            **_launch_kwargs("sra_map_kernel", n_map, common["BLOCK_D"]),
        )
    return out, lse, amap


@torch.library.custom_op("dare_kernels::sra_attention_bwd_triton", mutates_args=())
def sra_attention_bwd_triton(
    grad_out: torch.Tensor, grad_map: Optional[torch.Tensor], grad_lse: Optional[torch.Tensor],
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, token_weight: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
    strength: float, scale: float, map_start: int, map_stop: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SRA backward: (dq, dk, dv) like the inputs and dw float32 [B,H,M] (γ/w·Σ_i dS, 0 for invalid keys;
    empty when token_weight is None). grad_map [B,N,map_stop-map_start] and grad_lse [B,H,N] may be None."""
    _check_device(query)
    B, H, N, D = query.shape
    M, DV = key.shape[2], value.shape[3]
    dq = torch.empty_like(query)
    dk = torch.empty_like(key)
    dv = torch.empty_like(value)
    has_w = token_weight is not None
    dw = torch.empty((B, H, M) if has_w else (0,), device=query.device, dtype=torch.float32)
    if B * H == 0 or M == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dw.zero_()
    if N == 0:
        return dq, dk.zero_(), dv.zero_(), dw.zero_()
    if grad_map is not None and (grad_map.numel() == 0 or map_stop <= map_start):
        grad_map = None
    w, w_strides = _w_args(token_weight, query)
    mask, m_strides = _mask_args(key_padding_mask, query)
    gmap = grad_map if grad_map is not None else lse
    g_strides = tuple(grad_map.stride()) if grad_map is not None else (0, 0, 0)
    glse = grad_lse if grad_lse is not None else lse
    gl_strides = tuple(grad_lse.stride()) if grad_lse is not None else (0, 0, 0)
    flags = dict(HAS_W=has_w, HAS_MASK=key_padding_mask is not None, IEEE=_dot_mode(query.dtype),
                 BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV))
    qk_scale = float(scale) * K.LOG2E
    strength = float(strength)
    lse = lse.contiguous()

    delta = torch.empty((B, H, N), device=query.device, dtype=torch.float32)
    bn_delta = INTERPRET_BLOCK if _interpret() else 64
    K.sra_bwd_delta_kernel[(triton.cdiv(N, bn_delta), B * H)](
        query, key, w, mask, out, grad_out, lse, glse, gmap, delta,
        *query.stride(), *key.stride(), *w_strides, *m_strides, *out.stride(), *grad_out.stride(),
        *gl_strides, *g_strides,
        H, N, M, D, DV, map_start, map_stop, qk_scale, strength, 1.0 / H,
        HAS_GLSE=grad_lse is not None, HAS_GMAP=grad_map is not None, BLOCK_N=bn_delta,
        BLOCK_M=INTERPRET_BLOCK if _interpret() else 64, **flags,
        **({} if _interpret() else {"num_warps": 4}),
    )
    common = (H, N, M, D, DV, map_start, map_stop, qk_scale, float(scale), strength, 1.0 / H)
    bd_max = max(flags["BLOCK_D"], flags["BLOCK_DV"])
    n_split, rows_per_split = _dkdv_split(B * H, N, M)
    if n_split == 1:
        dk_t, dv_t, dw_t = dk, dv, dw
        dk_s, dv_s, dw_s = (0, *dk.stride()), (0, *dv.stride()), 0
    else:  # float32 partials per query split, summed below in a fixed order
        dk_t = torch.empty((n_split, B, H, M, D), device=query.device, dtype=torch.float32)
        dv_t = torch.empty((n_split, B, H, M, DV), device=query.device, dtype=torch.float32)
        dw_t = torch.empty((n_split, B, H, M) if has_w else (1,), device=query.device, dtype=torch.float32)
        dk_s, dv_s, dw_s = dk_t.stride(), dv_t.stride(), dw_t.stride(0)
    kern = _kernel("sra_bwd_dkdv_kernel")
    kern[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), B * H, n_split)](
        query, key, value, w, mask, grad_out, lse, delta, gmap, dk_t, dv_t, dw_t,
        *query.stride(), *key.stride(), *value.stride(), *w_strides, *m_strides, *grad_out.stride(),
        *g_strides, *dk_s, *dv_s, dw_s,
        H, N, M, D, DV, map_start, map_stop, rows_per_split, qk_scale, float(scale), strength, 1.0 / H,
        HAS_GMAP=grad_map is not None, **flags, **_launch_kwargs("sra_bwd_dkdv_kernel", M, bd_max),
    )
    if n_split > 1:
        dk.copy_(dk_t.sum(0))
        dv.copy_(dv_t.sum(0))
        if has_w:
            dw.copy_(dw_t.sum(0))
    kern = _kernel("sra_bwd_dq_kernel")
    kern[_grid_n("BLOCK_N", N, B * H)](
        query, key, value, w, mask, grad_out, lse, delta, gmap, dq,
        *query.stride(), *key.stride(), *value.stride(), *w_strides, *m_strides, *grad_out.stride(),
        *g_strides, *dq.stride(), *common,
        HAS_GMAP=grad_map is not None, **flags, **_launch_kwargs("sra_bwd_dq_kernel", M, bd_max),
    )
    return dq, dk, dv, dw


_op.register_backend_ops("dare_kernels::sra_attention_fwd_triton", "dare_kernels::sra_attention_bwd_triton")
