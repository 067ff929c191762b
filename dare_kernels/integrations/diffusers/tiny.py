"""Tiny randomly initialised diffusers video models and pipelines (nothing downloaded).

Used by the tests, the CPU benchmarks and ``dare-kernels maps``. Every builder takes a seed and
returns a model in eval mode (float32, CPU). Pipelines have no text encoder, tokenizer or VAE:
call them with ``prompt_embeds`` / ``negative_prompt_embeds`` and ``output_type="latent"``.
"""

from __future__ import annotations

import torch

__all__ = [
    "tiny_wan", "tiny_ltx", "tiny_cogvideox", "tiny_hunyuan_video", "tiny_animatediff",
    "tiny_wan_pipeline", "tiny_wan22_pipeline", "tiny_ltx_pipeline", "tiny_cogvideox_pipeline",
    "tiny_hunyuan_video_pipeline", "tiny_animatediff_pipeline",
]


def _seeded(seed: int):
    torch.manual_seed(seed)


def tiny_wan(*, num_layers: int = 2, heads: int = 2, head_dim: int = 16, text_dim: int = 32,
             in_channels: int = 4, image: bool = False, seed: int = 0):
    """WanTransformer3DModel (patch (1, 2, 2)); ``image=True`` adds the I2V image cross-attention keys."""
    from diffusers import WanTransformer3DModel

    _seeded(seed)
    inner = heads * head_dim
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=in_channels,
        out_channels=in_channels, text_dim=text_dim, freq_dim=32, ffn_dim=2 * inner, num_layers=num_layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
        image_dim=24 if image else None, added_kv_proj_dim=inner if image else None,
    )
    return model.eval()


def tiny_ltx(*, num_layers: int = 2, heads: int = 2, head_dim: int = 16, caption_channels: int = 32,
             in_channels: int = 8, seed: int = 0):
    """LTXVideoTransformer3DModel (patch 1); inputs are packed latents [B, F·H·W, in_channels]."""
    from diffusers import LTXVideoTransformer3DModel

    _seeded(seed)
    inner = heads * head_dim
    model = LTXVideoTransformer3DModel(
        in_channels=in_channels, out_channels=in_channels, patch_size=1, patch_size_t=1,
        num_attention_heads=heads, attention_head_dim=head_dim, cross_attention_dim=inner, num_layers=num_layers,
        caption_channels=caption_channels,
    )
    return model.eval()


def tiny_cogvideox(*, num_layers: int = 2, heads: int = 2, head_dim: int = 16, text_dim: int = 32,
                   in_channels: int = 4, rope: bool = True, text_len: int = 16, frames: int = 2,
                   height: int = 8, width: int = 8, seed: int = 0):
    """CogVideoXTransformer3DModel (patch 2); ``rope=True`` as CogVideoX-5B / 1.5 (pass image_rotary_emb)."""
    from diffusers import CogVideoXTransformer3DModel

    _seeded(seed)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=in_channels, out_channels=in_channels,
        time_embed_dim=16, text_embed_dim=text_dim, num_layers=num_layers, sample_width=width, sample_height=height,
        sample_frames=(frames - 1) * 4 + 1, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=text_len, use_rotary_positional_embeddings=rope,
    )
    return model.eval()


def tiny_hunyuan_video(*, num_layers: int = 1, num_single_layers: int = 1, heads: int = 2, head_dim: int = 16,
                       text_dim: int = 32, pooled_dim: int = 16, in_channels: int = 4, guidance_embeds: bool = True,
                       seed: int = 0):
    """HunyuanVideoTransformer3DModel (patch 2, temporal patch 1): dual-stream and single-stream joint blocks.

    Forward: ``model(x [B, C, F, H, W], timestep [B], text [B, T, text_dim], text_mask [B, T], pooled [B, pooled_dim],
    guidance=[B] (when guidance_embeds, as HunyuanVideo-T2V))``.
    """
    from diffusers import HunyuanVideoTransformer3DModel

    _seeded(seed)
    t_axis = head_dim // 4 // 2 * 2
    hw_axis = (head_dim - t_axis) // 2
    model = HunyuanVideoTransformer3DModel(
        in_channels=in_channels, out_channels=in_channels, num_attention_heads=heads, attention_head_dim=head_dim,
        num_layers=num_layers, num_single_layers=num_single_layers, num_refiner_layers=1, mlp_ratio=2.0,
        patch_size=2, patch_size_t=1, guidance_embeds=guidance_embeds, text_embed_dim=text_dim,
        pooled_projection_dim=pooled_dim, rope_axes_dim=(t_axis, hw_axis, head_dim - t_axis - hw_axis),
    )
    return model.eval()


def tiny_animatediff(*, cross_attention_dim: int = 32, seed: int = 0):
    """UNetMotionModel with two resolution levels, spatial cross-attention and motion modules."""
    from diffusers import UNetMotionModel

    _seeded(seed)
    model = UNetMotionModel(
        block_out_channels=(16, 32), layers_per_block=1, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
        cross_attention_dim=cross_attention_dim, num_attention_heads=2, norm_num_groups=8,
        motion_num_attention_heads=2, motion_max_seq_length=32,
    )
    return model.eval()


def _flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def tiny_wan_pipeline(*, seed: int = 0, **model_kwargs):
    """WanPipeline around :func:`tiny_wan` (no text encoder / VAE: prompt_embeds and output_type="latent")."""
    from diffusers import WanPipeline

    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=_flow_scheduler(),
                       transformer=tiny_wan(seed=seed, **model_kwargs))


def tiny_wan22_pipeline(*, seed: int = 0, boundary_ratio: float = 0.5, **model_kwargs):
    """Wan 2.2 A14B-style WanPipeline: two experts, ``transformer`` (high noise) and ``transformer_2`` (low noise),
    switched at ``boundary_ratio`` of the timesteps."""
    from diffusers import WanPipeline

    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=_flow_scheduler(),
                       transformer=tiny_wan(seed=seed, **model_kwargs),
                       transformer_2=tiny_wan(seed=seed + 1, **model_kwargs), boundary_ratio=boundary_ratio)


def tiny_hunyuan_video_pipeline(*, seed: int = 0, **model_kwargs):
    """HunyuanVideoPipeline around :func:`tiny_hunyuan_video` (no text encoders: prompt_embeds [B, T, 32],
    prompt_attention_mask [B, T], pooled_prompt_embeds [B, 16]; true CFG with ``true_cfg_scale`` > 1 and the
    negative_* embeddings)."""
    from diffusers import HunyuanVideoPipeline

    return HunyuanVideoPipeline(text_encoder=None, tokenizer=None, vae=None, scheduler=_flow_scheduler(),
                                text_encoder_2=None, tokenizer_2=None,
                                transformer=tiny_hunyuan_video(seed=seed, **model_kwargs))


def tiny_ltx_pipeline(*, seed: int = 0, **model_kwargs):
    """LTXPipeline around :func:`tiny_ltx`."""
    from diffusers import LTXPipeline

    return LTXPipeline(scheduler=_flow_scheduler(), vae=None, text_encoder=None, tokenizer=None,
                       transformer=tiny_ltx(seed=seed, **model_kwargs))


def tiny_cogvideox_pipeline(*, seed: int = 0, **model_kwargs):
    """CogVideoXPipeline around :func:`tiny_cogvideox`."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    return CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=CogVideoXDDIMScheduler(),
                             transformer=tiny_cogvideox(seed=seed, **model_kwargs))


def tiny_animatediff_pipeline(*, seed: int = 0, **model_kwargs):
    """AnimateDiffPipeline around :func:`tiny_animatediff` (DDIM; prompt_embeds [B, M, 32], output_type="latent")."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler

    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False, timestep_spacing="linspace", steps_offset=1)
    return AnimateDiffPipeline(vae=None, text_encoder=None, tokenizer=None, motion_adapter=None, scheduler=scheduler,
                               unet=tiny_animatediff(seed=seed, **model_kwargs))
