"""docs/SPEC.md written in plain PyTorch: the oracle for every test and the ``backend="reference"`` path.

Every function here is differentiable by autograd and exact in float64 when given float64
inputs. Nothing here is fast; everything here is meant to be obviously right.
"""

from __future__ import annotations

import math

import torch

def expand_token_weight(token_weight: torch.Tensor, B: int, H: int, M: int) -> torch.Tensor:
    """View a token weight of shape [M], [B, M] or [B, H, M] as [B, H, M] (no copy)."""
    if token_weight.dim() == 1:
        return token_weight.view(1, 1, M).expand(B, H, M)
    if token_weight.dim() == 2:
        return token_weight.view(B, 1, M).expand(B, H, M)
    return token_weight


def sra_attention_ref(
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
    compute_dtype: torch.dtype | None = None,
):
    """SRA attention exactly as docs/SPEC.md §1 states it, materialising the full [B, H, N, M] probabilities.

    Shapes: query [B, H, N, D], key [B, H, M, D], value [B, H, M, Dv]; token_weight [M], [B, M]
    or [B, H, M] (non-negative) or None; key_padding_mask bool [B, M] (True = attend) or None.

    Computes in ``compute_dtype`` (default: float64 for float64 inputs, else float32).
    Returns ``o`` (dtype of ``query``) and, when asked, the head-averaged map [B, N, stop-start]
    and the LSE [B, H, N] (both in the compute dtype), in the order ``(o, attn_map, lse)``.
    A row with no valid key gives o = 0, map = 0 and lse = -inf; gradients stay finite.
    """
    B, H, N, D = query.shape
    M = key.shape[2]
    if compute_dtype is None:
        compute_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    q, k, v = (t.to(compute_dtype) for t in (query, key, value))

    s = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale
    valid = torch.ones(B, H, M, dtype=torch.bool, device=query.device)
    if key_padding_mask is not None:
        valid = valid & key_padding_mask.to(torch.bool).view(B, 1, M)
    if token_weight is not None:
        w = expand_token_weight(token_weight, B, H, M).to(compute_dtype)
        valid = valid & (w > 0)
        # double-where keeps the gradient finite where w == 0
        safe_w = torch.where(valid, w, torch.ones_like(w))
        s = s + (strength * torch.log(safe_w)).unsqueeze(2)
    valid4 = valid.unsqueeze(2)  # [B, H, 1, M]

    neg_inf = torch.tensor(float("-inf"), dtype=compute_dtype, device=query.device)
    row_max = torch.where(valid4, s, neg_inf).amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    e = torch.where(valid4, torch.exp(torch.where(valid4, s - row_max, torch.zeros_like(s))), torch.zeros_like(s))
    denom = e.sum(dim=-1, keepdim=True)
    has_key = denom > 0
    p = e / torch.where(has_key, denom, torch.ones_like(denom))

    o = torch.einsum("bhnm,bhmd->bhnd", p, v).to(query.dtype)
    results = [o]
    if return_attn_map:
        start, stop = (0, M) if attn_map_keys is None else attn_map_keys
        results.append(p[..., start:stop].mean(dim=1))
    if return_lse:
        lse = torch.where(has_key, torch.log(torch.where(has_key, denom, torch.ones_like(denom))) + row_max, neg_inf)
        results.append(lse.squeeze(-1))
    return results[0] if len(results) == 1 else tuple(results)


# =============================================================================================
# SPEC §2: rectified CFG combine (rectified_cfg_ref) - section of the rectified-CFG work
# =============================================================================================

CFG_MODES = ("cfg", "cfg_zero_star", "apg")
# the integer a kernel receives for each mode (Triton MODE constexpr; the C++ kMode* constants follow it)
CFG_MODE_ID = {mode: i for i, mode in enumerate(CFG_MODES)}


def split_cfg_branches(preds, num_branches=None) -> list:
    """The K branch tensors [B, ...] of ``preds`` ([K*B, ...] stacked along dim 0, or a sequence of K tensors)."""
    if isinstance(preds, torch.Tensor):
        k = 2 if num_branches is None else int(num_branches)
        return list(preds.chunk(k, dim=0))
    return list(preds)


def rectified_cfg_ref(
    preds,
    guidance_scale: float,
    *,
    num_branches: int | None = None,
    mode: str = "cfg",
    rectify_scale: float = 0.0,
    guidance_rescale: float = 0.0,
    eta: float = 1.0,
    norm_threshold: float = 0.0,
    momentum: float | None = None,
    momentum_buffer: torch.Tensor | None = None,
    reduce_dims=None,
) -> torch.Tensor:
    """Rectified CFG combine exactly as docs/SPEC.md §2 states it (no input checks; see dare_kernels.rectified_cfg).

    Branch order uncond, cond[, degraded]. Computes in float32 (float64 for float64 inputs) and returns the
    input dtype. With ``momentum`` (mode "apg") ``momentum_buffer`` is updated in place: buf <- (c - u) + momentum * buf.
    """
    branches = split_cfg_branches(preds, num_branches)
    in_dtype = branches[0].dtype
    acc = torch.float64 if in_dtype == torch.float64 else torch.float32
    u, c = branches[0].to(acc), branches[1].to(acc)
    d = branches[2].to(acc) if len(branches) == 3 else None
    nd = u.dim()
    if isinstance(reduce_dims, int):
        reduce_dims = (reduce_dims,)
    dims = list(range(1, nd)) if reduce_dims is None else sorted({int(x) % nd for x in reduce_dims})
    s = float(guidance_scale)

    def dot(a, b):
        return (a * b).sum(dim=dims, keepdim=True)

    if mode == "cfg":
        g = u + s * (c - u)
    elif mode == "cfg_zero_star":
        alpha = dot(c, u) / (dot(u, u) + 1e-8)
        u_star = alpha * u
        g = u_star + s * (c - u_star)
    elif mode == "apg":
        delta = c - u
        if momentum is not None:
            delta = delta + float(momentum) * momentum_buffer.to(acc)
            with torch.no_grad():
                momentum_buffer.copy_(delta)
        if norm_threshold > 0:
            norm = dot(delta, delta).sqrt()
            delta = delta * torch.clamp(float(norm_threshold) / norm, max=1.0)
        c_hat = c / dot(c, c).sqrt().clamp_min(1e-12)
        parallel = dot(delta, c_hat) * c_hat
        g = u + s * ((delta - parallel) + float(eta) * parallel)
    else:
        raise ValueError(f"mode must be one of {CFG_MODES}, got {mode!r}")
    if d is not None:
        g = g + float(rectify_scale) * (c - d)
    if guidance_rescale > 0:
        phi = float(guidance_rescale)
        ratio = c.std(dim=dims, keepdim=True) / g.std(dim=dims, keepdim=True)
        g = phi * (g * ratio) + (1.0 - phi) * g
    return g.to(in_dtype)




# (keep these separator lines: they let the sections above and below change independently)



# =============================================================================================
# SPEC §4: SRA consistency loss (sra_consistency_loss_ref) - section of the DR-CFG training work
# =============================================================================================

def sra_consistency_loss_ref(maps, token_weight, key_padding_mask=None, eps: float = 1e-6,
                             detach_target: bool = True, compute_dtype: torch.dtype | None = None):
    """docs/SPEC.md §4 transcribed literally (stacks all L maps; float64 when the maps are float64).

    maps: sequence of L tensors [B, N, M]; token_weight [B, M] (>= 0); key_padding_mask bool [B, M]
    (True = valid) or None. Returns a 0-dim tensor in the compute dtype.
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if maps[0].dtype == torch.float64 else torch.float32
    A = torch.stack([m.to(compute_dtype) for m in maps])                  # [L, B, N, M]
    L, B, N, M = A.shape
    a = A / (A.sum(dim=2, keepdim=True) + eps)                            # a^(l)_bj over i
    a_bar = a.mean(dim=0, keepdim=True)                                   # ensemble
    if detach_target:
        a_bar = a_bar.detach()
    valid = torch.ones(B, M, dtype=torch.bool, device=A.device)
    if key_padding_mask is not None:
        valid = valid & key_padding_mask.to(torch.bool)
    w = torch.where(valid, token_weight.to(compute_dtype), torch.zeros((), dtype=compute_dtype, device=A.device))
    w_sum = w.sum(dim=1, keepdim=True)
    w_hat = w / torch.where(w_sum > 0, w_sum, torch.ones_like(w_sum))     # a sample with no valid weight adds 0
    sq = ((a - a_bar) ** 2).sum(dim=2)                                    # ‖a^(l)_bj − ā_bj‖², [L, B, M]
    per_token = N * sq.mean(dim=0)                                        # (1/L) Σ_l N ‖·‖²
    return (w_hat * per_token).sum() / B
