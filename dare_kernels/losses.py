"""SRA consistency loss (docs/SPEC.md §4): per-token spatial attention maps of several layers pulled to their ensemble.

For each token j: a^(l)_bj = A^(l)_{b,:,j} / (Σ_i A^(l)_{b,i,j} + ε), ā_bj = mean_l a^(l)_bj,
ŵ_bj = w_bj / Σ_{valid j} w_bj, and

    loss = (1/B) Σ_b Σ_{valid j} ŵ_bj · (1/L) Σ_l N · ‖a^(l)_bj − ā_bj‖²

The per-token sum D_bj = Σ_l ‖a^(l)_bj − ā_bj‖² is a torch custom op (``dare_kernels::sra_consistency_dist``,
fake impl + hand-written backward): it keeps only the maps, ā and the column sums for backward instead of
autograd's per-layer intermediates (one [B, N, M] tensor per layer less), and it is where a fused kernel
slots in. The weighting by ŵ is plain PyTorch, so the gradient reaches ``token_weight`` too.

Gradient: with g = ∂loss/∂D_bj, a = a^(l), s = Σ_i A^(l)_{b,i,j} + ε,
    ∂loss/∂a_i = 2 g (a_i − ā_i)   (the ā path adds (−2g/L) Σ_l (a^(l) − ā) = 0, so detaching ā changes nothing)
    ∂loss/∂A_i = (∂loss/∂a_i − Σ_k ∂loss/∂a_k · a_k) / s
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["sra_consistency_loss"]


def _check(maps, token_weight, key_padding_mask, eps):
    if isinstance(maps, torch.Tensor):
        if maps.dim() == 3:
            maps = [maps]
        elif maps.dim() == 4:
            maps = list(maps.unbind(0))
        else:
            raise ValueError(f"maps must be a sequence of [B, N, M] tensors or one [L, B, N, M] tensor, "
                             f"got a tensor of shape {tuple(maps.shape)}")
    if not isinstance(maps, Sequence) or len(maps) == 0:
        raise ValueError("maps must be a non-empty sequence of [B, N, M] tensors (one per layer)")
    shape = None
    for l, m in enumerate(maps):
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"maps[{l}] must be a torch.Tensor, got {type(m).__name__}")
        if not m.dtype.is_floating_point:
            raise TypeError(f"maps[{l}] must be floating point, got {m.dtype}")
        if m.dim() != 3:
            raise ValueError(f"maps[{l}] must be [B, N, M], got shape {tuple(m.shape)}")
        if shape is None:
            shape, device = tuple(m.shape), m.device
        elif tuple(m.shape) != shape:
            raise ValueError(f"all maps must have one shape: maps[0] is {list(shape)}, maps[{l}] is {list(m.shape)}")
        elif m.device != device:
            raise ValueError(f"all maps must be on one device: {device} vs {m.device} (maps[{l}])")
    B, N, M = shape
    if not isinstance(token_weight, torch.Tensor) or not token_weight.dtype.is_floating_point:
        raise TypeError("token_weight must be a floating-point tensor [B, M]")
    if tuple(token_weight.shape) != (B, M):
        raise ValueError(f"token_weight must be [B, M]={[B, M]} to match the maps, got {list(token_weight.shape)}")
    if token_weight.device != device:
        raise ValueError(f"token_weight is on {token_weight.device}, the maps on {device}")
    if token_weight.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(torch.isnan(token_weight).any()) or bool((token_weight < 0).any()):
            raise ValueError("token_weight must be non-negative and not NaN")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("key_padding_mask must be a bool tensor [B, M] (True = valid) or None")
        if tuple(key_padding_mask.shape) != (B, M):
            raise ValueError(f"key_padding_mask must be [B, M]={[B, M]}, got {list(key_padding_mask.shape)}")
        if key_padding_mask.device != device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, the maps on {device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    return list(maps), B, N, M


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("dare_kernels::sra_consistency_dist", mutates_args=())
def _consistency_dist(maps: list[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """D_bj = Σ_l ‖a^(l)_bj − ā_bj‖² (acc [B, M]), plus the column sums s (acc [L, B, M]) and ā (acc [B, N, M])."""
    acc = _acc_dtype(maps[0].dtype)
    L = len(maps)
    colsum = torch.stack([m.sum(dim=1, dtype=acc) for m in maps])            # Σ_i A^(l)_{b,i,j}
    inv = 1.0 / (colsum + eps)
    a_bar = maps[0].to(acc) * inv[0].unsqueeze(1)
    for l in range(1, L):
        a_bar.addcmul_(maps[l].to(acc), inv[l].unsqueeze(1))
    a_bar.div_(L)
    dist = torch.zeros_like(colsum[0])
    for l in range(L):
        d = maps[l].to(acc) * inv[l].unsqueeze(1) - a_bar
        dist += (d * d).sum(dim=1)
    return dist, colsum, a_bar


@_consistency_dist.register_fake
def _(maps, eps):
    acc = _acc_dtype(maps[0].dtype)
    B, N, M = maps[0].shape
    m0 = maps[0]
    return (m0.new_empty((B, M), dtype=acc), m0.new_empty((len(maps), B, M), dtype=acc),
            m0.new_empty((B, N, M), dtype=acc))


def _dist_setup_context(ctx, inputs, output):
    maps, eps = inputs
    _, colsum, a_bar = output
    ctx.save_for_backward(*maps, colsum, a_bar)
    ctx.eps = eps
    ctx.num_maps = len(maps)


def _dist_backward(ctx, grad_dist, grad_colsum, grad_abar):
    saved = ctx.saved_tensors
    L = ctx.num_maps
    maps, colsum, a_bar = saved[:L], saved[L], saved[L + 1]
    grads = []
    if grad_dist is None:
        return [None] * L, None
    g2 = (2.0 * grad_dist.to(a_bar.dtype)).unsqueeze(1)                      # [B, 1, M]
    for l in range(L):
        inv = (1.0 / (colsum[l] + ctx.eps)).unsqueeze(1)
        a = maps[l].to(a_bar.dtype) * inv
        ga = g2 * (a - a_bar)                                                 # ∂loss/∂a
        gA = (ga - (ga * a).sum(dim=1, keepdim=True)) * inv                   # ∂loss/∂A
        grads.append(gA.to(maps[l].dtype))
    return grads, None


_consistency_dist.register_autograd(_dist_backward, setup_context=_dist_setup_context)


def sra_consistency_loss(
    maps,
    token_weight: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    detach_target: bool = True,
) -> torch.Tensor:
    """docs/SPEC.md §4 consistency loss between the per-token spatial maps of L layers and their ensemble.

    Args:
        maps: L tensors A^(l) [B, N, M] (e.g. ``sra_attention(..., return_attn_map=True)[1]`` of L
            cross-attention layers), or one [L, B, N, M] tensor. Any float dtype; computed in float32
            (float64 for float64 maps).
        token_weight: w [B, M] >= 0 (the SRA weights; 0 drops a token from the loss).
        key_padding_mask: bool [B, M], True = valid token; or None (all valid).
        eps: ε of the per-token normalisation (>= 0; with ε = 0 a token whose maps are all 0 gives NaN).
        detach_target: the ensemble ā is a constant target (default) or is differentiated through.
            Because ā is the mean of the a^(l), Σ_l (a^(l) − ā) = 0 and both choices give the same
            gradient (the module docstring shows it); the flag is kept for API clarity.

    Returns:
        A 0-dim tensor (float32, or float64 for float64 maps), differentiable into every map.
        A sample whose valid weights sum to 0 contributes 0. With L = 1 the loss is 0.
    """
    maps, B, N, M = _check(maps, token_weight, key_padding_mask, eps)
    L = len(maps)
    acc = _acc_dtype(maps[0].dtype)
    dist, _, _ = _consistency_dist(maps, float(eps))
    per_token = dist * (N / L)                                  # (1/L) Σ_l N ‖a^(l)_bj − ā_bj‖²

    w = token_weight.to(acc)
    if key_padding_mask is not None:
        w = w.masked_fill(~key_padding_mask, 0.0)
    w_sum = w.sum(dim=1, keepdim=True)
    w_hat = w / torch.where(w_sum > 0, w_sum, torch.ones_like(w_sum))
    return (w_hat * per_token).sum() / B
