"""SRA attention (docs/SPEC.md §1): the public function and its input checks.

The backend choice and the custom ops live below this module: dare_kernels/backends.py (which backend runs,
and why not), dare_kernels/ops/sra_attention.py (the ops' schema, fakes and autograd), the kernels in
dare_kernels._C and dare_kernels/triton/, and the memory-safe PyTorch fallback in sra_fallback.py.
"""

from __future__ import annotations

import math

import torch

from . import backends
from .ops.sra_attention import acc_dtype
from .reference import expand_token_weight, sra_attention_ref
from .sra_fallback import sra_attention_fallback
from .value_checks import check_weight_values

__all__ = ["sra_attention", "BACKENDS"]

BACKENDS = backends.CHOICES


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------

def _check_inputs(query, key, value, token_weight, key_padding_mask, strength, scale, return_attn_map, attn_map_keys):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, seq, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in backends.FLOAT_DTYPES:
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
        if token_weight.dtype not in backends.FLOAT_DTYPES:
            raise TypeError(f"token_weight must be a floating-point tensor, got {token_weight.dtype}")
        if token_weight.device != query.device:
            raise ValueError(f"token_weight is on {token_weight.device}, query on {query.device}")
        allowed = [(M,), (B, M), (B, H, M)]
        if tuple(token_weight.shape) not in allowed:
            raise ValueError(
                f"token_weight must have shape [M]={list(allowed[0])}, [B, M]={list(allowed[1])} or "
                f"[B, H, M]={list(allowed[2])}, got {list(token_weight.shape)}"
            )
        # NaN / inf / negative weights: read on CPU tensors; on a GPU only with DARE_KERNELS_CHECK_INPUTS=1
        # (a host sync); never while torch.compile traces (docs/SPEC.md §1.1)
        check_weight_values(token_weight, "token_weight")
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
        if not return_attn_map:
            # the range only shapes the map: without it the call would ignore the argument, and a caller
            # unpacking (o, attn_map) would split o along the batch instead
            raise ValueError(f"attn_map_keys={attn_map_keys!r} selects the keys of the attention map: pass "
                             "return_attn_map=True too, or leave attn_map_keys=None")
        try:
            start, stop = (int(x) for x in attn_map_keys)
        except Exception:
            raise TypeError(f"attn_map_keys must be a (start, stop) pair of ints, got {attn_map_keys!r}") from None
        if not 0 <= start < stop <= M:
            raise ValueError(f"attn_map_keys must satisfy 0 <= start < stop <= M={M}, got ({start}, {stop})")


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
    """Cross-attention with a per-key bias γ·log w_j (docs/SPEC.md §1), optionally returning the head-averaged map.

    Args:
        query: [B, H, N, D] video tokens; float16, bfloat16, float32 (float64 on cpu/reference). Any strides.
        key: [B, H, M, D]; value: [B, H, M, Dv]; same dtype and device as ``query``.
        token_weight: w >= 0, finite, of shape [M], [B, M] or [B, H, M], or None (all ones). w = 0 drops a key.
            NaN, inf or negative values raise ValueError for CPU tensors; GPU tensors are checked only with
            DARE_KERNELS_CHECK_INPUTS=1 (a host sync), and otherwise give undefined results.
        key_padding_mask: bool [B, M], True = attend; or None.
        strength: γ >= 0; γ = 0 is plain attention. scale: logit scale, default D**-0.5.
        return_attn_map: also return A [B, N, stop - start] float32, the probabilities averaged over heads.
        attn_map_keys: (start, stop) key range of the map (default all M keys); all keys still attend. Only
            with ``return_attn_map=True`` (ValueError otherwise: the range would be ignored).
        return_lse: also return the log-sum-exp of the biased logits, float32 [B, H, N] (-inf for empty rows).
        backend: "auto", "cpu", "triton", "cuda" or "reference". "auto" without a usable compiled backend
            warns once and runs the memory-safe PyTorch fallback (dare_kernels/sra_fallback.py).

    Returns:
        ``o`` [B, H, N, Dv] in query's dtype, or a tuple ``(o, attn_map)``, ``(o, lse)`` or ``(o, attn_map, lse)``.
        Differentiable w.r.t. query, key, value, token_weight, and through both ``o`` and ``attn_map``.
    """
    _check_inputs(query, key, value, token_weight, key_padding_mask, strength, scale, return_attn_map, attn_map_keys)
    B, H, N, D = query.shape
    M = key.shape[2]
    scale = float(D ** -0.5 if scale is None else scale)
    strength = float(strength)
    start, stop = (0, M) if attn_map_keys is None else (int(attn_map_keys[0]), int(attn_map_keys[1]))

    chosen = backends.choose("sra_attention", backend, query.device, query.dtype, head_dim=D,
                             head_dim_v=value.shape[3])
    if M == 0:  # no keys: every row is empty, the same on every backend (O = 0, lse = -inf, map [B, N, 0])
        return _pack(*_no_keys(query, value, return_attn_map), return_attn_map, return_lse)
    if chosen == "reference":
        res = sra_attention_ref(query, key, value, token_weight, key_padding_mask=key_padding_mask,
                                strength=strength, scale=scale, return_attn_map=return_attn_map,
                                attn_map_keys=(start, stop), return_lse=return_lse)
        if not (return_attn_map or return_lse):
            return res
        res = list(res)
        return tuple([res[0]] + [r.float() if r.dtype != torch.float64 else r for r in res[1:]])
    if chosen == "fallback":
        out, amap, lse = sra_attention_fallback(query, key, value, token_weight, key_padding_mask, strength, scale,
                                                (start, stop) if return_attn_map else None, return_lse)
        return _pack(out, lse, amap, return_attn_map, return_lse)

    fwd, _ = backends.ops_for("sra_attention", chosen)
    if token_weight is not None and token_weight.dtype in (torch.float16, torch.bfloat16):
        # the op gets fp16 / bf16 weights as float32 (exact; the kernels compute the bias in float32 anyway):
        # its dw [B, H, M] is then summed over a broadcast batch / head in float32 and rounded to the
        # weight's dtype once, not rounded per (b, h) and summed in bf16 (which loses a cancelling sum)
        token_weight = token_weight.float()
    w = None if token_weight is None else expand_token_weight(token_weight, B, H, M)
    map_start, map_stop = (start, stop) if return_attn_map else (0, 0)
    if _needs_autograd(query, key, value, w):
        out, lse, amap = fwd(query, key, value, w, key_padding_mask, strength, scale, map_start, map_stop)
    else:  # nothing to differentiate: skip the op's Python autograd wrapper, which torch.library runs on every
        # call (tens of µs of host time per call, measured by tools/host_overhead.py)
        with _BelowAutograd():
            out, lse, amap = fwd(query, key, value, w, key_padding_mask, strength, scale, map_start, map_stop)
    return _pack(out, lse, amap, return_attn_map, return_lse)


_BelowAutograd = torch._C._AutoDispatchBelowAutograd  # dispatch below the Autograd key (the op's kernel directly)


def _needs_autograd(*tensors) -> bool:
    """Whether the op call must go through its autograd wrapper: grad mode on and an input that requires grad,
    or a torch.compile trace (which sees the op as registered, autograd included)."""
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _pack(out, lse, amap, return_attn_map: bool, return_lse: bool):
    """``o``, or the tuple the flags ask for, in the order (o, attn_map, lse)."""
    results = [out]
    if return_attn_map:
        results.append(amap)
    if return_lse:
        results.append(lse)
    return results[0] if len(results) == 1 else tuple(results)


class _NoKeys(torch.autograd.Function):
    """O = 0 for inputs without keys; its gradient w.r.t. query is zero (key, value, weights are empty)."""

    @staticmethod
    def forward(ctx, query, value):
        B, H, N, _ = query.shape
        ctx.shapes = (query.shape, value.shape)
        return query.new_zeros((B, N, H, value.shape[3])).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_out):
        qshape, vshape = ctx.shapes
        return grad_out.new_zeros(qshape), grad_out.new_zeros(vshape)


def _no_keys(query, value, return_attn_map: bool):
    """(O zeros [B, H, N, Dv] in query's dtype, lse -inf [B, H, N] acc, map acc [B, N, 0])."""
    B, H, N, _ = query.shape
    acc = acc_dtype(query.dtype)
    out = _NoKeys.apply(query, value)
    lse = torch.full((B, H, N), float("-inf"), dtype=acc, device=query.device)
    amap = query.new_zeros((B, N, 0), dtype=acc)
    return out, lse, amap
