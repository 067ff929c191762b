"""dare_guidance on a tiny AnimateDiffPipeline (denoiser ``.unet``; the pipeline repeats the text per frame)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from dare_kernels.integrations.diffusers import apply_dare, dare_guidance  # noqa: E402
from dare_kernels.integrations.diffusers import tiny  # noqa: E402

from conftest import assert_close_to_scale  # noqa: E402

M = 77


def _pipeline():
    from diffusers import AnimateDiffPipeline, DDIMScheduler

    unet = tiny.tiny_animatediff()
    # no text encoder / VAE: prompt_embeds in, latents out (vae_scale_factor falls back to 8)
    return AnimateDiffPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, motion_adapter=None,
                               scheduler=DDIMScheduler(beta_schedule="linear", clip_sample=False))


def _embeds(batch=1):
    g = torch.Generator().manual_seed(3)
    return torch.randn(batch, M, 32, generator=g), torch.randn(batch, M, 32, generator=g)


def _run(pipe, pe, **kw):
    return pipe(prompt_embeds=pe, height=64, width=64, num_frames=3, num_inference_steps=2, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kw).frames


@torch.no_grad()
def test_dare_guidance_equals_stock_cfg(batch=2):
    """rectify_scale 0, no weights or weights 1: the pipeline's own batched CFG, to float32 rounding.
    Two prompts: the per-frame repeat of the negative embeddings must follow the pipeline's sample order."""
    torch.manual_seed(0)
    pipe = _pipeline()
    pe, ne = _embeds(batch)
    stock = _run(pipe, pe, negative_prompt_embeds=ne, guidance_scale=5.0)
    with dare_guidance(pipe, negative_prompt_embeds=ne, guidance_scale=5.0):
        guided = _run(pipe, pe, guidance_scale=1.0)
    assert_close_to_scale(guided, stock)
    with apply_dare(pipe, capture_maps=True) as h:
        h.set_token_weights(torch.ones(batch, M))
        with dare_guidance(pipe, negative_prompt_embeds=ne, guidance_scale=5.0):
            ones = _run(pipe, pe, guidance_scale=1.0)
        assert set(h.branch_maps) == {"uncond", "cond"}
        layer = h.layers[0]
        assert h.maps[layer].shape[0] == 2 * batch and h.branch_maps["cond"][layer].shape[0] == batch
    # the SRA kernel instead of SDPA: float32 rounding, through two DDIM steps
    assert_close_to_scale(ones, stock, rel=5e-5)


@torch.no_grad()
def test_batched_branches_take_their_own_weights():
    """One batched unet call under dare_guidance = the combine of separate per-branch calls with the handle's
    per-branch weights (uncond stock, cond weighted, degraded with dropped tokens)."""
    torch.manual_seed(0)
    pipe = _pipeline()
    unet = pipe.unet
    frames = 3
    x = torch.randn(1, 4, frames, 8, 8)
    t = torch.tensor(500)
    pe, ne = _embeds()
    w = torch.rand(1, M) + 0.1
    wd = torch.where(torch.arange(M) < 5, 0.0, 1.0).view(1, M)
    per_frame = lambda e: e.repeat_interleave(frames, dim=0)  # noqa: E731  (what AnimateDiffPipeline passes)
    with apply_dare(pipe, capture_maps=True) as h:
        h.set_token_weights(w, only_cond=True, degraded=wd)
        preds = {}
        for br, e in (("uncond", ne), ("cond", pe), ("degraded", pe)):
            with h.branch(br):
                preds[br] = unet(x, t, encoder_hidden_states=per_frame(e)).sample
        with dare_guidance(pipe, negative_prompt_embeds=ne, guidance_scale=3.0, rectify_scale=1.5):
            g = unet(x, t, encoder_hidden_states=per_frame(pe)).sample
        layer = h.layers[0]
        assert bool((h.branch_maps["degraded"][layer][..., :5] == 0).all())
        assert not bool((h.branch_maps["cond"][layer][..., :5] == 0).any())
    u, c, d = preds["uncond"].double(), preds["cond"].double(), preds["degraded"].double()
    expect = u + 3.0 * (c - u) + 1.5 * (c - d)
    assert_close_to_scale(g.double(), expect, rel=2e-5)
    assert float((preds["cond"] - preds["degraded"]).abs().max()) > 1e-5
