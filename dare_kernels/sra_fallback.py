"""SRA attention in PyTorch without compiled kernels: ``backend="auto"``'s memory-safe last resort.

- The output alone: ``F.scaled_dot_product_attention`` with the additive bias γ·log w (-inf for invalid
  keys) as a [B, H, 1, M] mask broadcast over the queries, which SDPA's fused kernels (CPU flash, CUDA
  memory-efficient) never expand to [B, H, N, M]. A (b, h) with no valid key gets O = 0 (SPEC §1).
- Maps and LSE: the same formula over chunks of query rows (in place on one score block), and every
  backward: the reference (dare_kernels/reference.py, SPEC §1 as written) with autograd over the same
  chunks, so at most about ``CHUNK_ELEMENTS`` probabilities exist at once.
Computes in float32 (float64 for float64 inputs) like the compiled backends; differentiable w.r.t. query,
key, value and the token weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops.sra_attention import acc_dtype
from .reference import expand_token_weight, sra_attention_ref

__all__ = ["sra_attention_fallback", "CHUNK_ELEMENTS"]

# probabilities per row chunk: 8 Mi elements = 32 MiB in float32 (one block in the forward; the backward's
# autograd through the reference keeps a few temporaries of that size)
CHUNK_ELEMENTS = 1 << 23
# query rows per SDPA call: bounds the memory even where SDPA has no fused kernel for the inputs
SDPA_CHUNK_ELEMENTS = 1 << 26


def _rows(B: int, H: int, N: int, M: int, budget: int) -> int:
    return max(1, min(N, budget // max(1, B * H * M)))


def _bias(token_weight, key_padding_mask, B, H, M, strength, dtype, device):
    """(bias [B, H, 1, M] or None, has_key [B, H] or None): γ·log w for valid keys, -inf for the others.

    A (b, h) without any valid key gets a zero bias (finite softmax) and has_key False (its output is zeroed).
    """
    if token_weight is None and key_padding_mask is None:
        return None, None
    valid = torch.ones(B, H, M, dtype=torch.bool, device=device)
    bias = torch.zeros(B, H, M, dtype=dtype, device=device)
    if token_weight is not None:
        w = expand_token_weight(token_weight, B, H, M).to(dtype)
        valid = valid & (w > 0)
        bias = strength * torch.log(torch.where(valid, w, torch.ones_like(w)))
    if key_padding_mask is not None:
        valid = valid & key_padding_mask.view(B, 1, M)
    has_key = valid.any(dim=-1)
    bias = torch.where(valid, bias, torch.full_like(bias, float("-inf")))
    bias = torch.where(has_key.unsqueeze(-1), bias, torch.zeros_like(bias))
    return bias.unsqueeze(2), has_key


def _sdpa_out(query, key, value, token_weight, key_padding_mask, strength, scale):
    """O [B, H, N, Dv] in query's dtype through SDPA, in row chunks."""
    B, H, N, D = query.shape
    M, Dv = key.shape[2], value.shape[3]
    acc = acc_dtype(query.dtype)
    q, k, v = (t.to(acc) for t in (query, key, value))
    # SDPA's fused CPU kernel needs equal head dims: zero columns change neither q·k nor the kept part of O
    if D < Dv:
        q, k = F.pad(q, (0, Dv - D)), F.pad(k, (0, Dv - D))
    elif Dv < D:
        v = F.pad(v, (0, D - Dv))
    bias, has_key = _bias(token_weight, key_padding_mask, B, H, M, strength, acc, query.device)
    out = torch.empty((B, N, H, Dv), dtype=query.dtype, device=query.device).transpose(1, 2)
    step = _rows(B, H, N, M, SDPA_CHUNK_ELEMENTS)
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        o = F.scaled_dot_product_attention(q[:, :, r0:r1], k, v, attn_mask=bias, scale=scale)[..., :Dv]
        if has_key is not None:
            o = o * has_key.view(B, H, 1, 1).to(o.dtype)
        out[:, :, r0:r1] = o
    return out


def _chunked_forward(query, key, value, token_weight, key_padding_mask, strength, scale, map_keys, want_lse):
    """(O, map or None, lse or None) over row chunks of the queries (no autograd graph).

    The reference's formula with in-place steps on one [B, H, rows, M] score block at a time (the backward
    runs the reference itself). A (b, h) without valid keys has a zero bias here and is zeroed afterwards.
    """
    B, H, N, _ = query.shape
    M, Dv = key.shape[2], value.shape[3]
    acc = acc_dtype(query.dtype)
    k, v = key.to(acc), value.to(acc)
    bias, has_key = _bias(token_weight, key_padding_mask, B, H, M, strength, acc, query.device)
    keep = None if has_key is None else has_key.view(B, H, 1, 1).to(acc)
    out = torch.empty((B, N, H, Dv), dtype=query.dtype, device=query.device).transpose(1, 2)
    amap = None if map_keys is None else torch.empty((B, N, map_keys[1] - map_keys[0]), dtype=acc,
                                                     device=query.device)
    lse = torch.empty((B, H, N), dtype=acc, device=query.device) if want_lse else None
    step = _rows(B, H, N, M, CHUNK_ELEMENTS)
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        p = torch.matmul(query[:, :, r0:r1].to(acc), k.transpose(-1, -2)).mul_(scale)
        if bias is not None:
            p.add_(bias)
        row_max = p.amax(dim=-1, keepdim=True)
        denom = p.sub_(row_max).exp_().sum(dim=-1, keepdim=True)
        p.div_(denom)
        if keep is not None:
            p.mul_(keep)
        out[:, :, r0:r1] = torch.matmul(p, v)
        if amap is not None:
            amap[:, r0:r1] = p[..., map_keys[0]:map_keys[1]].mean(dim=1)
        if lse is not None:
            chunk = denom.log_().add_(row_max).squeeze(-1)
            if has_key is not None:
                chunk = torch.where(has_key.unsqueeze(-1), chunk, float("-inf"))
            lse[:, :, r0:r1] = chunk
    return out, amap, lse


class _SraFallback(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, token_weight, key_padding_mask, strength, scale, map_keys, want_lse):
        B, H, N, _ = query.shape
        if map_keys is None and not want_lse and N > 0 and B * H > 0:
            out, amap, lse = _sdpa_out(query, key, value, token_weight, key_padding_mask, strength, scale), None, None
        else:
            out, amap, lse = _chunked_forward(query, key, value, token_weight, key_padding_mask, strength, scale,
                                              map_keys, want_lse)
        ctx.save_for_backward(query, key, value, token_weight, key_padding_mask)
        ctx.params = (strength, scale, map_keys, want_lse)
        empty = query.new_empty((0,), dtype=acc_dtype(query.dtype))
        return out, empty if amap is None else amap, empty if lse is None else lse

    @staticmethod
    def backward(ctx, grad_out, grad_map, grad_lse):
        query, key, value, token_weight, key_padding_mask = ctx.saved_tensors
        strength, scale, map_keys, want_lse = ctx.params
        need = ctx.needs_input_grad
        acc = acc_dtype(query.dtype)
        B, H, N, _ = query.shape
        M = key.shape[2]
        # leaves in the accumulation dtype: per-chunk gradients are summed there and rounded once
        k = key.detach().to(acc).requires_grad_(need[1])
        v = value.detach().to(acc).requires_grad_(need[2])
        w = None
        if token_weight is not None:
            w = token_weight.detach().to(acc).requires_grad_(need[3])
        dq = torch.zeros_like(query, dtype=acc) if need[0] else None
        dk = torch.zeros_like(k) if need[1] else None
        dv = torch.zeros_like(v) if need[2] else None
        dw = torch.zeros_like(w) if w is not None and need[3] else None
        step = _rows(B, H, N, M, CHUNK_ELEMENTS)
        for r0 in range(0, N, step):
            r1 = min(N, r0 + step)
            q = query[:, :, r0:r1].detach().to(acc).requires_grad_(need[0])
            leaves = [(t, g) for t, g in ((q, dq), (k, dk), (v, dv), (w, dw)) if g is not None]
            if not leaves:
                break
            with torch.enable_grad():
                res = sra_attention_ref(q, k, v, w, key_padding_mask=key_padding_mask, strength=strength,
                                        scale=scale, return_attn_map=map_keys is not None, attn_map_keys=map_keys,
                                        return_lse=want_lse)
                res = list(res) if isinstance(res, tuple) else [res]
                outs, grads = [res.pop(0)], [None if grad_out is None else grad_out[:, :, r0:r1].to(acc)]
                if map_keys is not None:
                    outs.append(res.pop(0))
                    grads.append(None if grad_map is None or grad_map.numel() == 0 else grad_map[:, r0:r1].to(acc))
                if want_lse:
                    outs.append(res.pop(0))
                    grads.append(None if grad_lse is None or grad_lse.numel() == 0 else grad_lse[:, :, r0:r1].to(acc))
                pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
                if not pairs:
                    break
                parts = torch.autograd.grad([o for o, _ in pairs], [t for t, _ in leaves], [g for _, g in pairs],
                                            allow_unused=True)
            for (t, total), part in zip(leaves, parts):
                if part is None:
                    continue
                if t is q:
                    total[:, :, r0:r1] = part
                else:
                    total += part
        return (None if dq is None else dq.to(query.dtype), None if dk is None else dk.to(key.dtype),
                None if dv is None else dv.to(value.dtype), None if dw is None else dw.to(token_weight.dtype),
                None, None, None, None, None)


def sra_attention_fallback(query, key, value, token_weight, key_padding_mask, strength: float, scale: float,
                           map_keys: tuple[int, int] | None, want_lse: bool):
    """(O [B, H, N, Dv] in query's dtype, map acc [B, N, stop - start] or None, lse acc [B, H, N] or None).

    Inputs as the public function checked them: token_weight [M], [B, M] or [B, H, M] or None, mask bool
    [B, M] or None, M >= 1. ``map_keys`` (start, stop) asks for the map, ``want_lse`` for the LSE.
    """
    out, amap, lse = _SraFallback.apply(query, key, value, token_weight, key_padding_mask, float(strength),
                                        float(scale), None if map_keys is None else tuple(map_keys), bool(want_lse))
    return out, (amap if map_keys is not None else None), (lse if want_lse else None)
