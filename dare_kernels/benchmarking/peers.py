"""The peers every kernel is compared against, as plain functions (benchmarks, the GPU self-check, tests).

Attention, all on [B, H, N, D] query and [B, H, M, D] key/value; the SRA bias is γ·log w_j per key:
    sra_bias(token_weight, strength, dtype, key_padding_mask=None) -> [B, 1|H, 1, M] float bias (-inf: dropped)
    sdpa(q, k, v)                                 PyTorch SDPA, no bias (the speed ceiling)
    sdpa_flash(q, k, v)                           the same, pinned to the FlashAttention backend
    sdpa_with_bias(q, k, v, bias)                 SDPA with the float per-key bias
    eager_with_maps(q, k, v, bias, map_keys=None) matmul-softmax-matmul returning (o, head-averaged map)
    flex_with_bias(q, k, v, bias)                 torch.compile'd FlexAttention with a per-key-bias score_mod
    flash_attn_nobias(q, k, v)                    FlashAttention 2 (no arbitrary bias: the no-bias ceiling)
    xformers_with_bias / xformers_nobias          xFormers memory-efficient attention with / without the bias
CFG combine on video latents [B, C, F, H, W]:
    diffusers_guider(mode, ...)                   a diffusers guider for one of dare's CFG modes
    guider_eager(mode, pred_cond, pred_uncond, ...)     diffusers guider, eager (GUIDER_MODES names)
    guider_compiled(mode, pred_cond, pred_uncond, ...)  the same guider under torch.compile
``unavailable(provider, device)`` says why a peer cannot run here (None when it can): bench files
call ``pytest.skip(reason)`` with it, so a missing peer is a CSV row, never a silent gap.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings

import torch
import torch.nn.functional as F

from ..reference import CFG_MODES

ATTN_PEERS = ("sdpa", "sdpa_bias", "eager_maps", "flex_bias", "flash_attn", "xformers_bias")
GUIDER_PEERS = ("diffusers_guider", "diffusers_guider_compiled")


def unavailable(provider: str, device: str = "cpu", dtype: torch.dtype | None = None) -> str | None:
    """Why ``provider`` cannot run on ``device`` here, or None if it can."""
    if device == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA device"
    if provider == "flash_attn":
        if importlib.util.find_spec("flash_attn") is None:
            return "flash_attn not installed"
        if device != "cuda":
            return "flash_attn runs on CUDA only"
        if dtype is not None and dtype not in (torch.float16, torch.bfloat16):
            return f"flash_attn supports fp16/bf16 only, not {dtype}"
    if provider in ("xformers_bias", "xformers"):
        if importlib.util.find_spec("xformers") is None:
            return "xformers not installed"
        if device != "cuda":
            return "xformers memory-efficient attention runs on CUDA only"
    if provider in GUIDER_PEERS and importlib.util.find_spec("diffusers") is None:
        return "diffusers not installed"
    if provider == "flex_bias":
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        except ImportError:
            return f"torch {torch.__version__} has no FlexAttention"
    return None


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

def sra_bias(token_weight: torch.Tensor | None, strength: float, dtype: torch.dtype | None = None,
             key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """SRA's per-key bias γ·log w as an additive attention mask; -inf where w = 0 or the key is masked.

    token_weight [M] or [B, M] -> [B, 1, 1, M] ([1, 1, 1, M] for [M] without a mask); [B, H, M] ->
    [B, H, 1, M]; None -> 0 (the mask alone, [B, M] bool, True = attend). dtype: of the weight by default.
    """
    if token_weight is None and key_padding_mask is None:
        raise ValueError("sra_bias needs a token_weight or a key_padding_mask")
    if token_weight is None:
        w = torch.ones(key_padding_mask.shape, device=key_padding_mask.device)
        dtype = dtype or torch.float32
    else:
        w = token_weight.float() if token_weight.dim() > 1 else token_weight.float().view(1, -1)
    valid = w > 0
    if key_padding_mask is not None:  # [B, M] against [B, M], [1, M] or [B, H, M]
        keep = key_padding_mask.bool()
        valid = valid & (keep if w.dim() == 2 else keep[:, None, :])
    bias = torch.where(valid, strength * torch.log(torch.where(valid, w, torch.ones_like(w))),
                       torch.full_like(w, float("-inf")))
    bias = bias.to(dtype or token_weight.dtype)
    return bias[:, None, None, :] if bias.dim() == 2 else bias[:, :, None, :]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch scaled_dot_product_attention without a bias: o [B, H, N, Dv] in q's dtype."""
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA without a bias, restricted to the FlashAttention backend (the no-bias speed of light on GPU)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v)


def sdpa_with_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """SDPA with a float additive bias broadcast from [B, 1|H, 1, M]: o [B, H, N, Dv] in q's dtype."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))


def eager_with_maps(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
                    map_keys: tuple[int, int] | None = None, upcast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """What a diffusers attention processor does to get maps: logits, softmax, P·V, mean of P over heads.

    Computes in q's dtype (as the processors do), or the logits and softmax in float32 with ``upcast``;
    returns o [B, H, N, Dv] in q's dtype and the map [B, N, stop - start] in float32.
    """
    scale = q.shape[-1] ** -0.5
    s = torch.matmul(q, k.transpose(-1, -2))
    s = (s.float() if upcast else s) * scale
    if bias is not None:
        s = s + bias.to(s.dtype)
    p = torch.softmax(s, dim=-1)
    o = torch.matmul(p.to(q.dtype), v)
    lo, hi = map_keys or (0, k.shape[2])
    return o, p[..., lo:hi].float().mean(dim=1)


@functools.lru_cache(maxsize=None)
def _flex_compiled(per_head: bool):
    from torch.nn.attention.flex_attention import flex_attention

    def flex_bias(q, k, v, bias3d):
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias3d[b, h if per_head else 0, kv_idx]

        return flex_attention(q, k, v, score_mod=score_mod)

    return torch.compile(flex_bias, dynamic=False)


def flex_with_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Compiled FlexAttention whose score_mod adds bias[b, (h,) kv] (bias [B, M] or [B, 1|H, 1, M])."""
    heads = bias.shape[1] if bias.dim() == 4 else 1
    b3 = bias.reshape(bias.shape[0], heads, bias.shape[-1]).to(q.dtype)
    if b3.shape[0] != q.shape[0]:
        b3 = b3.expand(q.shape[0], -1, -1)
    return _flex_compiled(heads > 1)(q, k, v, b3.contiguous())


def flash_attn_nobias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """FlashAttention 2 (``flash_attn_func``, [B, N, H, D] layout via transposed views); no bias support."""
    from flash_attn import flash_attn_func

    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def xformers_nobias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """xFormers memory_efficient_attention without a bias ([B, N, H, D] layout via transposed views)."""
    import xformers.ops as xops

    return xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def xformers_with_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """xFormers memory_efficient_attention with the bias materialised as [B, H, N, M] (its tensor-bias form).

    The bias tensor is allocated with M padded to a multiple of 8 (xFormers' alignment rule) and sliced.
    """
    import xformers.ops as xops

    B, H, N, _ = q.shape
    M = k.shape[2]
    pad = (M + 7) // 8 * 8
    full = torch.empty(B, H, N, pad, dtype=q.dtype, device=q.device)[..., :M]
    full.copy_(bias.to(q.dtype).expand(B, H, N, M))
    return xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_bias=full).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# CFG combine (diffusers guiders)
# ---------------------------------------------------------------------------------------------

# peer names of guider_eager / guider_compiled -> (dare CFG mode, applies guidance_rescale)
GUIDER_MODES = ("cfg", "rescale", "apg", "cfg_zero")
_GUIDER_AS_CFG_MODE = {"cfg": ("cfg", False), "rescale": ("cfg", True), "apg": ("apg", False),
                       "cfg_zero": ("cfg_zero_star", False)}


def diffusers_guider(mode: str, guidance_scale: float = 5.0, guidance_rescale: float = 0.0, *,
                     apg_threshold: float | None = None, zero_init_steps: int | None = None,
                     step: int = 10, num_inference_steps: int = 50):
    """The diffusers guider computing dare's CFG ``mode`` (one of CFG_MODES), set to ``step`` of the schedule.

    apg_threshold: AdaptiveProjectedGuidance's norm threshold (diffusers' default when None);
    zero_init_steps: CFG-Zero*'s zeroed first steps (diffusers' default when None).
    """
    if mode not in CFG_MODES:
        raise ValueError(f"mode must be one of {CFG_MODES}, got {mode!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers import guiders as G
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        kw = dict(guidance_scale=guidance_scale, guidance_rescale=guidance_rescale)
        if mode == "cfg":
            g = G.ClassifierFreeGuidance(**kw)
        elif mode == "cfg_zero_star":
            extra = {} if zero_init_steps is None else {"zero_init_steps": zero_init_steps}
            g = G.ClassifierFreeZeroStarGuidance(**kw, **extra)
        else:
            extra = {} if apg_threshold is None else {"adaptive_projected_guidance_rescale": apg_threshold}
            g = G.AdaptiveProjectedGuidance(**kw, **extra)
        g.set_state(step=step, num_inference_steps=num_inference_steps, timestep=torch.tensor(500.0))
    return g


def make_guider(mode: str, guidance_scale: float = 5.0, guidance_rescale: float = 0.7):
    """A diffusers guider for ``mode``: cfg, rescale (CFG + guidance_rescale), apg, cfg_zero (CFG-Zero*).

    Mid-schedule (step 10 of 50): every guider is active (CFG-Zero* zeroes only the first steps).
    """
    if mode not in _GUIDER_AS_CFG_MODE:
        raise ValueError(f"mode must be one of {GUIDER_MODES}, got {mode!r}")
    cfg_mode, rescaled = _GUIDER_AS_CFG_MODE[mode]
    return diffusers_guider(cfg_mode, guidance_scale, guidance_rescale if rescaled else 0.0)


@functools.lru_cache(maxsize=None)
def _guider(mode: str, guidance_scale: float, guidance_rescale: float):
    return make_guider(mode, guidance_scale, guidance_rescale)


def guider_eager(mode: str, pred_cond: torch.Tensor, pred_uncond: torch.Tensor, guidance_scale: float = 5.0,
                 guidance_rescale: float = 0.7) -> torch.Tensor:
    """diffusers' guider for ``mode`` applied eagerly: the guided prediction, shape and dtype of pred_cond."""
    return _guider(mode, guidance_scale, guidance_rescale).forward(pred_cond, pred_uncond)["pred"]


@functools.lru_cache(maxsize=None)
def _guider_compiled(mode: str, guidance_scale: float, guidance_rescale: float):
    g = _guider(mode, guidance_scale, guidance_rescale)
    return torch.compile(lambda c, u: g.forward(c, u)["pred"], dynamic=False)


def guider_compiled(mode: str, pred_cond: torch.Tensor, pred_uncond: torch.Tensor, guidance_scale: float = 5.0,
                    guidance_rescale: float = 0.7) -> torch.Tensor:
    """The same diffusers guider under torch.compile (inductor); first call per shape compiles."""
    return _guider_compiled(mode, guidance_scale, guidance_rescale)(pred_cond, pred_uncond)
