"""SRA consistency loss (SPEC.md §4): per-token spatial attention maps of several layers pulled to their ensemble.

For each token j: a^(l)_bj = A^(l)_{b,:,j} / (Σ_i A^(l)_{b,i,j} + ε), ā_bj = mean_l a^(l)_bj,
ŵ_bj = w_bj / Σ_{valid j} w_bj, and

    loss = (1/B) Σ_b Σ_{valid j} ŵ_bj · (1/L) Σ_l N · ‖a^(l)_bj − ā_bj‖²
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


def sra_consistency_loss(
    maps,
    token_weight: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    detach_target: bool = True,
) -> torch.Tensor:
    """SPEC.md §4 consistency loss between the per-token spatial maps of L layers and their ensemble.

    Args:
        maps: L tensors A^(l) [B, N, M] (e.g. ``sra_attention(..., return_attn_map=True)[1]`` of L
            cross-attention layers), or one [L, B, N, M] tensor. Any float dtype; computed in float32
            (float64 for float64 maps).
        token_weight: w [B, M] >= 0 (the SRA weights; 0 drops a token from the loss).
        key_padding_mask: bool [B, M], True = valid token; or None (all valid).
        eps: ε of the per-token normalisation (>= 0; with ε = 0 a token whose maps are all 0 gives NaN).
        detach_target: the ensemble ā is a constant target (default) or is differentiated through.
            Because ā is the mean of the a^(l), Σ_l (a^(l) − ā) = 0 and both choices give the same
            gradient; detaching only spares autograd the graph of the target.

    Returns:
        A 0-dim tensor (float32, or float64 for float64 maps), differentiable into every map.
        A sample whose valid weights sum to 0 contributes 0. With L = 1 the loss is 0.
    """
    maps, B, N, M = _check(maps, token_weight, key_padding_mask, eps)
    L = len(maps)
    acc = torch.float64 if maps[0].dtype == torch.float64 else torch.float32
    # per-layer spatial distributions of each token, never stacked into [L, B, N, M]
    a = [m.to(acc) / (m.to(acc).sum(dim=1, keepdim=True) + eps) for m in maps]
    a_bar = a[0]
    for x in a[1:]:
        a_bar = a_bar + x
    a_bar = a_bar / L
    if detach_target:
        a_bar = a_bar.detach()
    sq = None
    for x in a:
        d = (x - a_bar).pow(2).sum(dim=1)                       # [B, M]
        sq = d if sq is None else sq + d
    per_token = sq * (N / L)                                    # (1/L) Σ_l N ‖a^(l)_bj − ā_bj‖²

    w = token_weight.to(acc)
    if key_padding_mask is not None:
        w = w.masked_fill(~key_padding_mask, 0.0)
    w_sum = w.sum(dim=1, keepdim=True)
    w_hat = w / torch.where(w_sum > 0, w_sum, torch.ones_like(w_sum))
    return (w_hat * per_token).sum() / B
