"""Triton SRA attention (docs/SPEC.md §1): the custom ops ``dare_kernels::sra_attention_{fwd,bwd}_triton``.

Schemas, output layout and semantics are those documented at the top of ``dare_kernels/ops/sra_attention.py``;
importing this module defines the two ops and registers the shared fake impls and autograd.

Kernel choice (made inside the op from the shapes):
- forward, no map: ``sra_fwd_kernel``, one program per (query block, b·h), online softmax over key
  blocks (a single iteration when M fits one block, the usual cross-attention case).
- forward with a map, short keys (``_use_fused_map``: next_pow2(M) ≤ 512 and the head's K and V in the
  input dtype fit min(128 KB, 0.6 × the GPU's shared memory), e.g. LTX-Video M=128, AnimateDiff M=77 in
  16-bit; float32 takes twice the bytes): ``sra_fwd_map_kernel``, one program per
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
accumulation. On GPUs each kernel launches one config: the arch's sweep table (``tools/triton_sweep.py``,
``_sra_configs.sweep_table``) or else the first of its spill-free list (``_sra_configs``, proven by
``aot_check --all`` on every supported Triton); ``DARE_KERNELS_TRITON_AUTOTUNE=1`` autotunes over the list
once per size class instead. Sizes and size-dependent strides are not specialised (``_sra_kernels``), so
a new N, M or B reuses the compiled binaries. Under ``TRITON_INTERPRET=1`` one small fixed configuration
runs, on CPU tensors.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Optional

import torch
import triton

from . import _sra_configs as _C
from . import _sra_kernels as K
from ._direct import direct_ok
from ..ops import sra_attention as _op
from .. import switches

__all__ = ["sra_attention_fwd_triton", "sra_attention_bwd_triton"]

# benchmarks only: "fused" or "two-kernel" forces that map path (None: chosen from the shapes)
FORCE_MAP_PATH: str | None = None
# block size of every kernel in the interpreter (small so that tests cover multi-block loops)
INTERPRET_BLOCK = 16
# the largest row / key block of any GPU config (the in-tile int32 offsets are bounded with it)
MAX_ROW_BLOCK = 128

_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"
# interpreter tests only: force one config {BLOCK_N, BLOCK_M} per kernel name, and the dk/dv split
FORCE_CONFIG: dict = {}
FORCE_DKDV_SPLIT: tuple[int, int] | None = None


def _interpret() -> bool:
    return _INTERPRET_AT_IMPORT


def _arch() -> int:
    """Compute capability of the current GPU as major·10 + minor (90 in the interpreter)."""
    if _interpret():
        return 90
    return _device_arch(torch.cuda.current_device())


# per-device facts are read once: each call asks several times, and a query is host time on every call
@functools.lru_cache(maxsize=None)
def _device_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


@functools.lru_cache(maxsize=None)
def _device_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _elem_bytes(dtype: torch.dtype) -> int:
    return dtype.itemsize  # (no tensor allocated per call)


def _use_fused_map(block_m: int, block_d: int, block_dv: int, elem_bytes: int = 2) -> bool:
    """Whether the forward with a map runs as one head-looped kernel (else online + map-from-LSE).
    ``elem_bytes``: 2 for float16/bfloat16 inputs, 4 for float32 (K and V sit in shared memory)."""
    if FORCE_MAP_PATH is not None:
        return FORCE_MAP_PATH == "fused"
    if _interpret():  # tests: M <= 64 fused, longer keys through the two-kernel path
        return block_m <= 64
    return _C.use_fused_map(block_m, block_d, block_dv, elem_bytes, _arch())


def _dot_mode(dtype: torch.dtype) -> int:
    """``IEEE`` of the kernels: 1 = exact float32 dots, 0 = tensor cores, 2 = upcast (interpreter bf16)."""
    if dtype == torch.float32:
        return 1
    if dtype == torch.bfloat16 and _interpret():
        return 2
    return 0


_pow2 = _C.pow2


# ---------------------------------------------------------------------------------------------
# autotuning (GPU only): config lists, pruning and heuristics live in _sra_configs.py
# ---------------------------------------------------------------------------------------------

# Autotuning is off by default (DARE_KERNELS_TRITON_AUTOTUNE=1 turns it on): each kernel launches one
# config, the arch's sweep table entry (measured by tools/triton_sweep.py) or else the first of its
# spill-free list, so a new op variant compiles each kernel once (~1-4 s) instead of once per candidate
# plus a benchmark of each. With autotuning on, the candidates are benchmarked once per size CLASS
# (_C.tune_key: head dims, dtype, flags, key-count class), never per raw N or M.
AUTOTUNE = switches.get("DARE_KERNELS_TRITON_AUTOTUNE")


def set_autotune(enabled: bool) -> bool:
    """Turn GPU autotuning on or off for later launches; returns the previous setting."""
    global AUTOTUNE
    previous, AUTOTUNE = AUTOTUNE, bool(enabled)
    return previous


def _launch_kwargs(name: str, M: int, block_d: int, elem_bytes: int) -> dict:
    if name in FORCE_CONFIG:
        return dict(FORCE_CONFIG[name])
    if _interpret():
        return {"BLOCK_N": INTERPRET_BLOCK} if name == "sra_fwd_map_kernel" else \
            {"BLOCK_N": INTERPRET_BLOCK, "BLOCK_M": INTERPRET_BLOCK}
    if AUTOTUNE and name in _C.TUNED:
        return {}
    if name == "sra_bwd_delta_kernel":
        return _C.delta_config(block_d, elem_bytes)
    return _C.heuristic(name, M, block_d, elem_bytes, _arch())


def _kernel(name: str):
    """The kernel ``name``: class-keyed autotuned on GPUs when autotuning is on, the jit function otherwise."""
    if _interpret() or not AUTOTUNE or name in FORCE_CONFIG or name not in _C.TUNED:
        return getattr(K, name)
    return _tuned_kernel(name)


def _tuned_kernel(name: str, arch: int | None = None):
    """The autotuned kernel ``name`` for ``arch`` (default: the current GPU); one per (name, arch)."""
    return _tuned_kernel_for(name, _arch() if arch is None else arch)


@functools.lru_cache(maxsize=None)
def _tuned_kernel_for(name: str, arch: int):
    fn = getattr(K, name)
    if name not in _C.TUNED:
        return fn
    return _ClassTuner(fn, name, arch)


class _ClassTuner:
    """Triton's autotuning, keyed on size classes: ``kernel[grid](*args, **kwargs)`` benchmarks the pruned
    candidates (``_C.TUNED``) once per ``_C.tune_key`` and launches the fastest; ``cache`` maps each key
    to its config. (Triton's own autotuner keys on argument values, so every new N or M re-benchmarked.)"""

    def __init__(self, fn, name: str, arch: int):
        self.fn, self.name, self.arch = fn, name, arch
        self.arg_names = list(inspect.signature(fn.fn).parameters)
        self.cache: dict = {}

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def _launch(self, grid, args, kwargs, cfg):
        return self.fn[grid](*args, **kwargs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    def run(self, grid, args, kwargs):
        named = dict(zip(self.arg_names, args))
        key = _C.tune_key(self.name, named, kwargs)
        cfg = self.cache.get(key)
        if cfg is None:
            configs, prune = _C.TUNED[self.name]
            candidates = prune(configs(self.arch), named, arch=self.arch, **kwargs)
            if len(candidates) == 1:
                cfg = candidates[0]
            else:
                from triton.testing import do_bench

                times = [do_bench(lambda c=c: self._launch(grid, args, kwargs, c), warmup=5, rep=20)
                         for c in candidates]
                cfg = candidates[times.index(min(times))]
            self.cache[key] = cfg
        return self._launch(grid, args, kwargs, cfg)


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


def _row_block() -> int:
    """The largest query / key block of a launch (the fused-map kernel's key block aside)."""
    return INTERPRET_BLOCK if _interpret() else MAX_ROW_BLOCK


def _tile_safe(t: Optional[torch.Tensor], rows: int, cols: int) -> Optional[torch.Tensor]:
    """``t`` itself when the offsets inside a [rows, cols] tile of its last two dims fit int32, else a
    contiguous copy: the kernels add the int64 start of a tile to int32 in-tile offsets (batch / head
    offsets are int64). Only absurd strides (~2^24 elements per row) copy."""
    if t is None or t.dim() < 2:
        return t
    extent = (rows - 1) * abs(t.stride(-2)) + (cols - 1) * abs(t.stride(-1))
    return t if extent < 2**31 else t.contiguous()


def _align(*tensors: torch.Tensor) -> bool:
    """``ALIGN`` of the kernels: every stride of every tensor (dims of size 1 aside, their offset is 0) is a
    multiple of 16 elements, so the batch / head offsets that are not specialised (``NO_SPECIALIZE``) may
    be declared 16-aligned. For the [B,H,N,D] and [B,N,H,D] layouts this holds exactly when the head dims
    (and row strides) are multiples of 16, whatever N, M and B: the choice never changes with the sizes."""
    return all(st % 16 == 0 for t in tensors for st, n in zip(t.stride(), t.shape) if n > 1)


def _sm_count() -> int:
    return _device_sm_count(torch.cuda.current_device())


# the dk/dv kernel splits the queries when there are too few key blocks to fill the GPU
DKDV_SPLIT_ALIGN = 128  # a split's rows: multiple of every BLOCK_N candidate
MAX_DKDV_SPLITS = 64


def _dkdv_split(BH: int, N: int, M: int) -> tuple[int, int]:
    """(number of query splits, rows per split) for the dk/dv kernel: about 4 programs per SM."""
    if FORCE_DKDV_SPLIT is not None:
        return FORCE_DKDV_SPLIT
    if _interpret():  # tests: split in two whenever there are more than two query blocks
        align = INTERPRET_BLOCK
        if N <= 2 * align:
            return 1, N
        rows = triton.cdiv(triton.cdiv(N, 2), align) * align
        return triton.cdiv(N, rows), rows
    align = DKDV_SPLIT_ALIGN
    target = 4 * _sm_count()
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

def _fwd(
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
    bd_max = max(common["BLOCK_D"], common["BLOCK_DV"])
    qk_scale = float(scale) * K.LOG2E
    strength = float(strength)
    bm_full = _pow2(M)
    elem = _elem_bytes(query.dtype)
    fused = n_map > 0 and _use_fused_map(bm_full, common["BLOCK_D"], common["BLOCK_DV"], elem)
    rows = _row_block()
    key_rows = max(rows, bm_full) if fused else rows  # the fused kernel holds all keys in one block
    query = _tile_safe(query, rows, common["BLOCK_D"])
    key = _tile_safe(key, key_rows, common["BLOCK_D"])
    value = _tile_safe(value, key_rows, common["BLOCK_DV"])
    common["ALIGN"] = _align(query, key, value, out)

    if fused:
        kern = _kernel("sra_fwd_map_kernel")
        kern[_grid_n("BLOCK_N", N, B)](
            query, key, value, w, mask, out, lse, amap,
            *query.stride(), *key.stride(), *value.stride(), *w_strides, *m_strides, *out.stride(),
            *amap.stride(),
            H, N, M, D, DV, map_start, map_stop, qk_scale, strength, 1.0 / H,
            BLOCK_M=bm_full, **common, **_launch_kwargs("sra_fwd_map_kernel", M, bd_max, elem),
        )
        return out, lse, amap

    kern = _kernel("sra_fwd_kernel")
    kern[_grid_n("BLOCK_N", N, B * H)](
        query, key, value, w, mask, out, lse,
        *query.stride(), *key.stride(), *value.stride(), *w_strides, *m_strides, *out.stride(),
        H, N, M, D, DV, qk_scale, strength,
        **common, **_launch_kwargs("sra_fwd_kernel", M, bd_max, elem),
    )
    if n_map > 0:
        kern = _kernel("sra_map_kernel")
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(n_map, meta["BLOCK_M"]), B)  # noqa: E731
        kern[grid](
            query, key, w, mask, lse, amap,
            *query.stride(), *key.stride(), *w_strides, *m_strides, *amap.stride(),
            H, N, M, D, map_start, map_stop, qk_scale, strength, 1.0 / H,
            HAS_W=common["HAS_W"], HAS_MASK=common["HAS_MASK"], IEEE=common["IEEE"], ALIGN=common["ALIGN"],
            BLOCK_D=common["BLOCK_D"],
            **_launch_kwargs("sra_map_kernel", n_map, common["BLOCK_D"], elem),
        )
    return out, lse, amap


sra_attention_fwd_triton = torch.library.custom_op("dare_kernels::sra_attention_fwd_triton", mutates_args=())(_fwd)


def fwd_direct(query, key, value, token_weight, key_padding_mask, strength, scale, map_start, map_stop):
    """The forward op for eager calls without a gradient to record: its body, without the custom-op round trip
    (see _direct.py); under torch.compile, with inputs that require grad (grad mode on), fake or subclass
    tensors, a mode or a functorch transform, the registered op (same outputs: the body is the op's)."""
    args = (query, key, value, token_weight, key_padding_mask, strength, scale, map_start, map_stop)
    tensors = (query, key, value, token_weight, key_padding_mask)
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if not direct_ok(tensors, needs_grad=grads):
        return sra_attention_fwd_triton(*args)
    return _fwd(*args)


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
    bd_max = max(flags["BLOCK_D"], flags["BLOCK_DV"])
    elem = _elem_bytes(query.dtype)
    rows = _row_block()
    query, key = _tile_safe(query, rows, flags["BLOCK_D"]), _tile_safe(key, rows, flags["BLOCK_D"])
    value, out, grad_out = (_tile_safe(t, rows, flags["BLOCK_DV"]) for t in (value, out, grad_out))
    if grad_map is not None:
        gmap = grad_map = _tile_safe(grad_map, rows, rows)
        g_strides = tuple(grad_map.stride())
    qk_scale = float(scale) * K.LOG2E
    strength = float(strength)
    lse = lse.contiguous()

    delta = torch.empty((B, H, N), device=query.device, dtype=torch.float32)
    n_split, rows_per_split = _dkdv_split(B * H, N, M)
    # dk/dv/dw always go through float32 partials (one slot when unsplit), summed in a fixed order below:
    # the dk/dv kernel's output type then never changes with N or M (one binary; the same rounding)
    dk_t = torch.empty((n_split, B, H, M, D), device=query.device, dtype=torch.float32)
    dv_t = torch.empty((n_split, B, H, M, DV), device=query.device, dtype=torch.float32)
    dw_t = torch.empty((n_split, B, H, M) if has_w else (1,), device=query.device, dtype=torch.float32)
    dk_s, dv_s, dw_s = dk_t.stride(), dv_t.stride(), dw_t.stride(0)
    flags["ALIGN"] = _align(query, key, value, out, grad_out, dq, dk_t, dv_t)
    delta_cfg = _launch_kwargs("sra_bwd_delta_kernel", M, bd_max, elem)
    _kernel("sra_bwd_delta_kernel")[(triton.cdiv(N, delta_cfg["BLOCK_N"]), B * H)](
        query, key, w, mask, out, grad_out, lse, glse, gmap, delta,
        *query.stride(), *key.stride(), *w_strides, *m_strides, *out.stride(), *grad_out.stride(),
        *gl_strides, *g_strides,
        H, N, M, D, DV, map_start, map_stop, qk_scale, strength, 1.0 / H,
        HAS_GLSE=grad_lse is not None, HAS_GMAP=grad_map is not None, **flags, **delta_cfg,
    )
    common = (H, N, M, D, DV, map_start, map_stop, qk_scale, float(scale), strength, 1.0 / H)
    kern = _kernel("sra_bwd_dkdv_kernel")
    kern[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), B * H, n_split)](
        query, key, value, w, mask, grad_out, lse, delta, gmap, dk_t, dv_t, dw_t,
        *query.stride(), *key.stride(), *value.stride(), *w_strides, *m_strides, *grad_out.stride(),
        *g_strides, *dk_s, *dv_s, dw_s,
        H, N, M, D, DV, map_start, map_stop, rows_per_split, qk_scale, float(scale), strength, 1.0 / H,
        HAS_GMAP=grad_map is not None, **flags, **_launch_kwargs("sra_bwd_dkdv_kernel", M, bd_max, elem),
    )
    dk.copy_(dk_t.sum(0) if n_split > 1 else dk_t[0])
    dv.copy_(dv_t.sum(0) if n_split > 1 else dv_t[0])
    if has_w:
        dw.copy_(dw_t.sum(0) if n_split > 1 else dw_t[0])
    kern = _kernel("sra_bwd_dq_kernel")
    kern[_grid_n("BLOCK_N", N, B * H)](
        query, key, value, w, mask, grad_out, lse, delta, gmap, dq,
        *query.stride(), *key.stride(), *value.stride(), *w_strides, *m_strides, *grad_out.stride(),
        *g_strides, *dq.stride(), *common,
        HAS_GMAP=grad_map is not None, **flags, **_launch_kwargs("sra_bwd_dq_kernel", M, bd_max, elem),
    )
    return dq, dk, dv, dw


# what dare_kernels/backends.py hands the public function instead of the registered forward (same signature)
DIRECT_OPS = {"dare_kernels::sra_attention_fwd_triton": fwd_direct}

_op.register_backend_ops("dare_kernels::sra_attention_fwd_triton", "dare_kernels::sra_attention_bwd_triton")
