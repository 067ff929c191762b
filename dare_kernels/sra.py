"""SRA attention: public function, input checks, backend choice, custom ops and their autograd.

Every compiled backend is a pair of torch custom ops with one schema shape:

    <fwd>(Tensor query, Tensor key, Tensor value, Tensor? token_weight, Tensor? key_padding_mask,
          float strength, float scale, int map_start, int map_stop) -> (out, lse, attn_map)
    <bwd>(Tensor grad_out, Tensor? grad_map, Tensor? grad_lse, Tensor query, Tensor key, Tensor value,
          Tensor? token_weight, Tensor? key_padding_mask, Tensor out, Tensor lse,
          float strength, float scale, int map_start, int map_stop) -> (dq, dk, dv, dw)

Contract shared by all backends (the kernels may rely on it, the wrapper guarantees it):
- ``token_weight`` arrives as [B, H, M] (often an expanded view with stride 0 on H), same dtype
  as ``query`` or float32; ``key_padding_mask`` as bool [B, M]. Any strides elsewhere.
- ``out`` is [B, H, N, Dv] in query's dtype, allocated as [B, N, H, Dv] memory (like SDPA on CPU),
  ``lse`` [B, H, N] (-inf for a row with no valid key), ``attn_map`` [B, N, map_stop - map_start]
  ([B, N, 0] when no map is asked for). "acc" below = float64 for float64 inputs, else float32;
  lse, attn_map and dw are in acc.
- ``dq, dk, dv`` like ``torch.empty_like`` of the inputs; ``dw`` acc [B, H, M] holding
  γ / w · Σ_i dS (0 for invalid keys), or an empty tensor when ``token_weight`` is None.
  ``grad_lse`` enters as dS += P · grad_lse (ring / context-parallel merges differentiate the LSE).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from . import _ext
from .reference import expand_token_weight, sra_attention_ref

__all__ = ["sra_attention", "BACKENDS"]

BACKENDS = ("auto", "cpu", "triton", "cuda", "reference")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------

def _check_inputs(query, key, value, token_weight, key_padding_mask, strength, scale, attn_map_keys):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, seq, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if key.device != query.device or value.device != query.device:
        raise ValueError(f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}")
    B, H, N, D = query.shape
    if key.shape[0] != B or key.shape[1] != H or key.shape[3] != D:
        raise ValueError(f"key must be [B={B}, H={H}, M, D={D}] to match query {tuple(query.shape)}, got {tuple(key.shape)}")
    M = key.shape[2]
    if value.shape[0] != B or value.shape[1] != H or value.shape[2] != M:
        raise ValueError(f"value must be [B={B}, H={H}, M={M}, Dv] to match key {tuple(key.shape)}, got {tuple(value.shape)}")
    if D == 0 or value.shape[3] == 0:
        raise ValueError("head_dim of query/key and value must be positive")

    if token_weight is not None:
        if not isinstance(token_weight, torch.Tensor):
            raise TypeError(f"token_weight must be a torch.Tensor or None, got {type(token_weight).__name__}")
        if token_weight.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"token_weight must be a floating-point tensor, got {token_weight.dtype}")
        if token_weight.device != query.device:
            raise ValueError(f"token_weight is on {token_weight.device}, query on {query.device}")
        allowed = [(M,), (B, M), (B, H, M)]
        if tuple(token_weight.shape) not in allowed:
            raise ValueError(
                f"token_weight must have shape [M]={list(allowed[0])}, [B, M]={list(allowed[1])} or "
                f"[B, H, M]={list(allowed[2])}, got {list(token_weight.shape)}"
            )
        # value checks read the data: CPU tensors only, and not while torch.compile traces
        if token_weight.device.type == "cpu" and not torch.compiler.is_compiling():
            if bool(torch.isnan(token_weight).any()):
                raise ValueError("token_weight contains NaN")
            if bool((token_weight < 0).any()):
                raise ValueError("token_weight must be non-negative (0 drops a key), found negative values")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be bool (True = attend), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, M):
            raise ValueError(f"key_padding_mask must be [B, M]={[B, M]}, got {list(key_padding_mask.shape)}")
        if key_padding_mask.device != query.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, query on {query.device}")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise TypeError(f"strength must be a float, got {type(strength).__name__}")
    if not math.isfinite(strength) or strength < 0:
        raise ValueError(f"strength must be a finite number >= 0, got {strength}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    if attn_map_keys is not None:
        try:
            start, stop = (int(x) for x in attn_map_keys)
        except Exception:
            raise TypeError(f"attn_map_keys must be a (start, stop) pair of ints, got {attn_map_keys!r}") from None
        if not 0 <= start < stop <= M:
            raise ValueError(f"attn_map_keys must satisfy 0 <= start < stop <= M={M}, got ({start}, {stop})")


# ---------------------------------------------------------------------------------------------
# custom ops: fake implementations and autograd, shared by every compiled backend
# ---------------------------------------------------------------------------------------------

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_fwd(query, key, value, token_weight, key_padding_mask, strength, scale, map_start, map_stop):
    B, H, N, _ = query.shape
    Dv = value.shape[-1]
    acc = _acc_dtype(query.dtype)
    out = query.new_empty((B, N, H, Dv)).transpose(1, 2)
    lse = query.new_empty((B, H, N), dtype=acc)
    amap = query.new_empty((B, N, map_stop - map_start), dtype=acc)
    return out, lse, amap


def _fake_bwd(grad_out, grad_map, grad_lse, query, key, value, token_weight, key_padding_mask, out, lse,
              strength, scale, map_start, map_stop):
    acc = _acc_dtype(query.dtype)
    dw = (query.new_empty(token_weight.shape, dtype=acc) if token_weight is not None
          else query.new_empty((0,), dtype=acc))
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), dw


def register_backend_ops(fwd_name: str, bwd_name: str) -> None:
    """Give a (forward, backward) pair of custom ops the shared fake impls and autograd.

    Names are qualified ("dare_kernels::sra_attention_fwd"); both ops follow the schema above.
    """
    torch.library.register_fake(fwd_name)(_fake_fwd)
    torch.library.register_fake(bwd_name)(_fake_bwd)
    bwd = _resolve(bwd_name)

    def setup_context(ctx, inputs, output):
        query, key, value, token_weight, key_padding_mask, strength, scale, map_start, map_stop = inputs
        out, lse, _ = output
        ctx.save_for_backward(query, key, value, token_weight, key_padding_mask, out, lse)
        ctx.params = (strength, scale, map_start, map_stop)

    def backward(ctx, grad_out, grad_lse, grad_map):
        query, key, value, token_weight, key_padding_mask, out, lse = ctx.saved_tensors
        strength, scale, map_start, map_stop = ctx.params
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if grad_map is not None and grad_map.numel() == 0:
            grad_map = None
        dq, dk, dv, dw = bwd(grad_out, grad_map, grad_lse, query, key, value, token_weight, key_padding_mask,
                             out, lse, strength, scale, map_start, map_stop)
        dw = dw.to(token_weight.dtype) if token_weight is not None else None
        return dq, dk, dv, dw, None, None, None, None, None

    torch.library.register_autograd(fwd_name, backward, setup_context=setup_context)


def _resolve(qualname: str):
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


# backend -> qualified names of its (forward, backward) ops
_OP_NAMES = {
    "cpu": ("dare_kernels::sra_attention_fwd", "dare_kernels::sra_attention_bwd"),
    "cuda": ("dare_kernels::sra_attention_fwd", "dare_kernels::sra_attention_bwd"),
    "triton": ("dare_kernels::sra_attention_fwd_triton", "dare_kernels::sra_attention_bwd_triton"),
}


def _ops_for(backend: str):
    """(fwd, bwd) custom ops of a compiled backend."""
    if backend == "triton":
        from .triton import sra_attention as _triton_sra  # noqa: F401  (defines and registers the ops)
    fwd_name, bwd_name = _OP_NAMES[backend]
    return _resolve(fwd_name), _resolve(bwd_name)


if _ext.EXT is not None:
    register_backend_ops(*_OP_NAMES["cpu"])


# ---------------------------------------------------------------------------------------------
# backend choice
# ---------------------------------------------------------------------------------------------

def _unavailable(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``backend`` cannot run on these inputs, or None when it can."""
    why = _ext.common_unavailable(backend, device, dtype)
    if why is not None:
        return why
    if backend == "cuda" and dtype not in (torch.float16, torch.bfloat16):
        return (f"the CUDA kernels take float16 and bfloat16, got {dtype} "
                "(use backend='triton' for float32, or cast)")
    if backend == "triton":
        try:
            _ops_for("triton")
        except ImportError as exc:
            return f"the Triton SRA kernels are not available ({exc})"
    return None



def _auto_order(device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda":
        from .tuning import preferred_gpu_backends
        return preferred_gpu_backends()
    if device.type == "cpu":
        return ("cpu",)
    return ()


def choose_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Resolve ``backend`` for inputs on ``device``; explicit but unusable backends raise."""
    return _ext.resolve_backend("sra_attention", backend, BACKENDS, device, dtype, _unavailable, _auto_order(device))
    if backend != "auto":
        why = _unavailable(backend, device, dtype)
        if why is not None:
            raise RuntimeError(f"sra_attention: backend={backend!r} is not available: {why}")
        return backend
    reasons = []
    for candidate in _auto_order(device):
        why = _unavailable(candidate, device, dtype)
        if why is None:
            return candidate
        reasons.append(f"{candidate}: {why}")
    _ext.warn_once(
        f"sra-ref-{device.type}-{dtype}",
        f"dare_kernels.sra_attention: no compiled backend for {device.type} {dtype} inputs "
        f"({'; '.join(reasons) or 'none exists for this device'}); using the slow PyTorch reference.",
    )
    return "reference"


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

def sra_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    token_weight: torch.Tensor | None = None,
    *,
    key_padding_mask: torch.Tensor | None = None,
    strength: float = 1.0,
    scale: float | None = None,
    return_attn_map: bool = False,
    attn_map_keys: tuple[int, int] | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Cross-attention with a per-key bias γ·log w_j (SPEC.md §1), optionally returning the head-averaged map.

    Args:
        query: [B, H, N, D] video tokens; float16, bfloat16, float32 (float64 on cpu/reference). Any strides.
        key: [B, H, M, D]; value: [B, H, M, Dv]; same dtype and device as ``query``.
        token_weight: w >= 0 of shape [M], [B, M] or [B, H, M], or None (all ones). w = 0 drops a key.
        key_padding_mask: bool [B, M], True = attend; or None.
        strength: γ >= 0; γ = 0 is plain attention. scale: logit scale, default D**-0.5.
        return_attn_map: also return A [B, N, stop - start] float32, the probabilities averaged over heads.
        attn_map_keys: (start, stop) key range of the map (default all M keys); all keys still attend.
        return_lse: also return the log-sum-exp of the biased logits, float32 [B, H, N] (-inf for empty rows).
        backend: "auto", "cpu", "triton", "cuda" or "reference".

    Returns:
        ``o`` [B, H, N, Dv] in query's dtype, or a tuple ``(o, attn_map)``, ``(o, lse)`` or ``(o, attn_map, lse)``.
        Differentiable w.r.t. query, key, value, token_weight, and through both ``o`` and ``attn_map``.
    """
    _check_inputs(query, key, value, token_weight, key_padding_mask, strength, scale, attn_map_keys)
    B, H, N, D = query.shape
    M = key.shape[2]
    scale = float(D ** -0.5 if scale is None else scale)
    strength = float(strength)
    start, stop = (0, M) if attn_map_keys is None else (int(attn_map_keys[0]), int(attn_map_keys[1]))

    chosen = choose_backend(backend, query.device, query.dtype)
    if chosen == "reference":
        res = sra_attention_ref(query, key, value, token_weight, key_padding_mask=key_padding_mask,
                                strength=strength, scale=scale, return_attn_map=return_attn_map,
                                attn_map_keys=(start, stop), return_lse=return_lse)
        if not (return_attn_map or return_lse):
            return res
        res = list(res)
        return tuple([res[0]] + [r.float() if r.dtype != torch.float64 else r for r in res[1:]])

    fwd, _ = _ops_for(chosen)
    if token_weight is not None and token_weight.dtype in (torch.float16, torch.bfloat16):
        # the op gets fp16 / bf16 weights as float32 (exact; the kernels compute the bias in float32 anyway):
        # its dw [B, H, M] is then summed over a broadcast batch / head in float32 and rounded to the
        # weight's dtype once, not rounded per (b, h) and summed in bf16 (which loses a cancelling sum)
        token_weight = token_weight.float()
    w = None if token_weight is None else expand_token_weight(token_weight, B, H, M)
    map_start, map_stop = (start, stop) if return_attn_map else (0, 0)
    out, lse, amap = fwd(query, key, value, w, key_padding_mask, strength, scale, map_start, map_stop)
    results = [out]
    if return_attn_map:
        results.append(amap)
    if return_lse:
        results.append(lse)
    return results[0] if len(results) == 1 else tuple(results)
