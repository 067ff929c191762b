"""SRA attention custom ops: the schema every compiled backend follows, fake implementations, autograd.

Every compiled backend is a pair of torch custom ops with one schema shape:

    <fwd>(Tensor query, Tensor key, Tensor value, Tensor? token_weight, Tensor? key_padding_mask,
          float strength, float scale, int map_start, int map_stop) -> (out, lse, attn_map)
    <bwd>(Tensor grad_out, Tensor? grad_map, Tensor? grad_lse, Tensor query, Tensor key, Tensor value,
          Tensor? token_weight, Tensor? key_padding_mask, Tensor out, Tensor lse,
          float strength, float scale, int map_start, int map_stop) -> (dq, dk, dv, dw)

Contract shared by all backends (the kernels may rely on it, the wrapper dare_kernels/sra.py guarantees it):
- ``token_weight`` arrives as [B, H, M] (often an expanded view with stride 0 on H), same dtype
  as ``query`` or float32; ``key_padding_mask`` as bool [B, M]. Any strides elsewhere. M >= 1 (the
  wrapper answers M == 0 itself).
- ``out`` is [B, H, N, Dv] in query's dtype, allocated as [B, N, H, Dv] memory (like SDPA on CPU),
  ``lse`` [B, H, N] (-inf for a row with no valid key), ``attn_map`` [B, N, map_stop - map_start]
  ([B, N, 0] when no map is asked for). "acc" below = float64 for float64 inputs, else float32;
  lse, attn_map and dw are in acc.
- ``dq, dk, dv`` like ``torch.empty_like`` of the inputs; ``dw`` acc [B, H, M] holding
  γ / w · Σ_i dS (0 for invalid keys), or an empty tensor when ``token_weight`` is None.
  ``grad_lse`` enters as dS += P · grad_lse (ring / context-parallel merges differentiate the LSE).
"""

from __future__ import annotations

import torch

from . import resolve_op

__all__ = ["acc_dtype", "register_backend_ops"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of lse, map and dw: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_fwd(query, key, value, token_weight, key_padding_mask, strength, scale, map_start, map_stop):
    B, H, N, _ = query.shape
    Dv = value.shape[-1]
    acc = acc_dtype(query.dtype)
    out = query.new_empty((B, N, H, Dv)).transpose(1, 2)
    lse = query.new_empty((B, H, N), dtype=acc)
    amap = query.new_empty((B, N, map_stop - map_start), dtype=acc)
    return out, lse, amap


def _fake_bwd(grad_out, grad_map, grad_lse, query, key, value, token_weight, key_padding_mask, out, lse,
              strength, scale, map_start, map_stop):
    acc = acc_dtype(query.dtype)
    dw = (query.new_empty(token_weight.shape, dtype=acc) if token_weight is not None
          else query.new_empty((0,), dtype=acc))
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), dw


def register_backend_ops(fwd_name: str, bwd_name: str) -> None:
    """Give a (forward, backward) pair of custom ops the shared fake impls and autograd.

    Names are qualified ("dare_kernels::sra_attention_fwd"); both ops follow the schema above.
    """
    torch.library.register_fake(fwd_name)(_fake_fwd)
    torch.library.register_fake(bwd_name)(_fake_bwd)
    bwd = resolve_op(bwd_name)

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
