"""Token weights of the diffusers integration: validation, fitting to a forward's batch, joint renormalisation.

Shapes: a branch's weights are [M] (one prompt) or [B, M] (B prompts); a forward's branch holds
``chunk`` samples, a multiple of B (``num_videos_per_prompt`` tiles the prompts).
"""

from __future__ import annotations

import torch

from ...value_checks import check_weight_values

__all__ = ["check_weight", "check_length", "check_batch", "fit_weight", "renormalize_joint", "WAN_PADDING_HINT"]

WAN_PADDING_HINT = (" (Wan attends every text position it is given, padding included: WanPipeline pads each "
                    "prompt to max_sequence_length, 512 by default; give one weight per position, e.g. 1 on the "
                    "padding for stock behaviour or 0 to drop it)")


def check_weight(w, what: str):
    """Type, rank and values of one branch's weights (None passes); returns ``w``.

    Values (NaN, negative, infinite) are checked on every device (one host sync, at set time), except while
    torch.compile traces.
    """
    if w is None:
        return None
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"set_token_weights: {what} must be a torch.Tensor [B, M] or [M], got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"set_token_weights: {what} must be floating point, got {w.dtype}")
    if w.dim() not in (1, 2) or w.shape[-1] == 0 or (w.dim() == 2 and w.shape[0] == 0):
        raise ValueError(f"set_token_weights: {what} must be [B, M] or [M] with B, M >= 1, got shape {list(w.shape)}")
    if not torch.compiler.is_compiling() and w.device.type != "meta":
        # once per set_token_weights, not per forward: worth its host sync on a GPU too
        check_weight_values(w, f"set_token_weights: {what}", force=True)
    return w


def check_length(m_given: int, m: int, layer: str, hint: str = "") -> None:
    if m_given != m:
        raise ValueError(
            f"token weights have {m_given} entries per prompt, but layer {layer} attends {m} text tokens{hint}"
        )


def check_batch(b: int | None, branch: str, chunk: int, layer: str) -> None:
    """``b`` prompts (None = one [M] vector for all) must tile a branch of ``chunk`` samples."""
    if b is None or b == chunk or (b >= 1 and chunk % b == 0):
        return
    raise ValueError(
        f"token weights hold {b} prompts, but the {branch!r} branch of this forward at layer {layer} has "
        f"{chunk} samples (expected {chunk} or a divisor of it)"
    )


def fit_weight(w: torch.Tensor, branch: str, chunk: int, m: int, layer: str, hint: str = "") -> torch.Tensor:
    """[chunk, M] weights of one branch from [M] / [B, M] (B divides chunk; prompts tiled as diffusers repeats)."""
    check_length(w.shape[-1], m, layer, hint)
    if w.dim() == 1:
        return w.view(1, m).expand(chunk, m)
    check_batch(w.shape[0], branch, chunk, layer)
    return w if w.shape[0] == chunk else w.repeat(chunk // w.shape[0], 1)


def renormalize_joint(w: torch.Tensor, strength: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample text weights of joint attention rescaled so that mean(w^γ) over the valid text keys is 1 (SPEC §1).

    Args:
        w: [B, T] text-key weights (float32 / float64), w >= 0.
        strength: γ >= 0; γ = 0 leaves ``w`` (the bias is 0 anyway).
        valid: bool [B, T], True = the key attends (the text mask), or None (all keys).
    Returns:
        [B, T] ``w / c`` with c = (mean over valid keys of w^γ)^(1/γ); zero-weight keys count as 0 in the mean,
        so with uniform scores the text keys keep exactly the attention share they have in stock attention and
        only its distribution among text tokens changes. A sample whose valid weights are all 0 is left as is.
        Differentiable w.r.t. ``w`` (the scale c included); exact for all-ones weights.
    """
    if strength == 0:
        return w
    live = w > 0 if valid is None else (w > 0) & valid
    count = (torch.ones_like(w, dtype=torch.bool) if valid is None else valid).sum(-1, keepdim=True)
    # w^γ scaled by the row's largest live weight first, so large weights or γ cannot overflow
    peak = torch.where(live, w, torch.zeros_like(w)).amax(-1, keepdim=True)
    safe_peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    ratio = torch.where(live, w / safe_peak, torch.zeros_like(w))
    mean = ratio.pow(strength).sum(-1, keepdim=True) / count.clamp_min(1).to(w.dtype)
    scale = torch.where(peak > 0, safe_peak * mean.clamp_min(torch.finfo(w.dtype).tiny).pow(1.0 / strength),
                        torch.ones_like(peak))
    return w / scale
