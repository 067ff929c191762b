"""Tiny WanPipeline / LTXPipeline / CogVideoXPipeline end to end on CPU with the DARE patch on; bad use."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from dare_kernels.integrations.diffusers import apply_dare, dare_guidance  # noqa: E402
from dare_kernels.integrations.diffusers import tiny  # noqa: E402



def _wan_inputs():
    pe, ne = torch.randn(1, 512, 32), torch.randn(1, 512, 32)
    return dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=64, width=64, num_frames=5), 512


def _ltx_inputs():
    pe, ne = torch.randn(1, 24, 32), torch.randn(1, 24, 32)
    pm, nm = torch.ones(1, 24), torch.ones(1, 24)
    pm[:, 17:] = 0
    nm[:, 4:] = 0
    return dict(prompt_embeds=pe, prompt_attention_mask=pm, negative_prompt_embeds=ne,
                negative_prompt_attention_mask=nm, height=64, width=64, num_frames=9), 24


def _cog_inputs():
    pe, ne = torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    return dict(prompt_embeds=pe, negative_prompt_embeds=ne, height=64, width=64, num_frames=5), 16


PIPES = {
    "wan": (tiny.tiny_wan_pipeline, _wan_inputs),
    "ltx": (tiny.tiny_ltx_pipeline, _ltx_inputs),
    "cogvideox": (tiny.tiny_cogvideox_pipeline, _cog_inputs),
}


def _pipeline(name):
    """The tiny pipeline ``name`` of PIPES (built after seeding torch, so every test gets the same weights),
    its call inputs and the text length m."""
    torch.manual_seed(0)
    build, make_inputs = PIPES[name]
    return (build(), *make_inputs())


def _run(pipe, inputs, **kw):
    args = dict(inputs, num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0))
    args.update(kw)
    return pipe(**args).frames


@pytest.mark.parametrize("name", list(PIPES))
def test_pipeline_end_to_end_with_patch(name):
    pipe, inputs, m = _pipeline(name)
    stock = _run(pipe, inputs, guidance_scale=4.0)
    w = torch.rand(1, m) + 0.05
    with apply_dare(pipe, capture_maps=True) as h:
        h.set_token_weights(torch.ones(1, m))
        ones = _run(pipe, inputs, guidance_scale=4.0)
        h.set_token_weights(w, only_cond=True)
        out = _run(pipe, inputs, guidance_scale=4.0)
        assert set(h.branch_maps) == {"cond", "uncond"}
        layer = h.layers[0]
        weighted_uncond = h.branch_maps["uncond"][layer].clone()
        assert h.maps[layer].shape[-1] == m and h.map_grids[layer] is not None
    assert torch.isfinite(out).all()
    assert float((out - stock).abs().max()) > 1e-5
    torch.testing.assert_close(ones, stock, atol=1e-5 * float(stock.abs().max()), rtol=1e-5)
    assert weighted_uncond.shape[-1] == m
    assert torch.equal(_run(pipe, inputs, guidance_scale=4.0), stock)


@torch.no_grad()
@pytest.mark.parametrize("name", ["wan", "ltx"])
def test_only_cond_leaves_uncond_pass_stock(name):
    """Stock Wan runs cond / uncond as separate passes, LTX one batched pass: both are recognised."""
    pipe, inputs, m = _pipeline(name)
    w = torch.rand(1, m) + 0.05
    with apply_dare(pipe, capture_maps=True) as h:
        _run(pipe, inputs, guidance_scale=4.0, num_inference_steps=1)
        plain = {b: {k: v.clone() for k, v in maps.items()} for b, maps in h.branch_maps.items()}
        h.set_token_weights(w, only_cond=True)
        _run(pipe, inputs, guidance_scale=4.0, num_inference_steps=1)
        for layer in h.layers:
            assert torch.equal(h.branch_maps["uncond"][layer], plain["uncond"][layer])
            assert not torch.allclose(h.branch_maps["cond"][layer], plain["cond"][layer])


@pytest.mark.parametrize("name", list(PIPES))
def test_pipeline_with_dare_guidance_and_degraded_branch(name):
    pipe, inputs, m = _pipeline(name)
    neg = inputs.pop("negative_prompt_embeds")
    neg_mask = inputs.pop("negative_prompt_attention_mask", None)
    stock_cfg = _run(pipe, dict(inputs, negative_prompt_embeds=neg,
                                **({"negative_prompt_attention_mask": neg_mask} if neg_mask is not None else {})),
                     guidance_scale=4.0)
    with dare_guidance(pipe, negative_prompt_embeds=neg, negative_prompt_attention_mask=neg_mask,
                       guidance_scale=4.0):
        same = _run(pipe, inputs, guidance_scale=1.0)
    torch.testing.assert_close(same, stock_cfg, atol=1e-5 * float(stock_cfg.abs().max()), rtol=1e-5)
    with apply_dare(pipe) as h:
        h.set_token_weights(torch.rand(1, m) + 0.05, only_cond=True,
                            degraded=torch.where(torch.arange(m) < 3, 0.0, 1.0).view(1, m))
        with dare_guidance(pipe, negative_prompt_embeds=neg, negative_prompt_attention_mask=neg_mask,
                           guidance_scale=4.0, rectify_scale=1.5, mode="apg", momentum=-0.5):
            out = _run(pipe, inputs, guidance_scale=1.0)
    assert torch.isfinite(out).all() and out.shape == stock_cfg.shape
    assert float((out - stock_cfg).abs().max()) > 1e-5


# ---------------------------------------------------------------------------------------------
# bad use
# ---------------------------------------------------------------------------------------------

def test_unsupported_model_lists_supported():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                                cross_attention_dim=8, attention_head_dim=2, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    with pytest.raises(TypeError, match="not supported.*WanTransformer3DModel.*LTXVideoTransformer3DModel"
                                        ".*CogVideoXTransformer3DModel.*UNetMotionModel"):
        apply_dare(unet)
    with pytest.raises(TypeError, match="expected a diffusers model or pipeline"):
        apply_dare(object())
    with pytest.raises(TypeError, match="not supported"):
        apply_dare(torch.nn.Linear(2, 2))


def test_apply_twice_raises_and_leaves_model_intact():
    model = tiny.tiny_wan(num_layers=1)
    h = apply_dare(model)
    with pytest.raises(RuntimeError, match="already patched"):
        apply_dare(model)
    h.remove()
    h2 = apply_dare(model)  # fine after remove
    h2.remove()


def test_wrong_weight_length_and_batch():
    torch.manual_seed(0)
    model = tiny.tiny_wan(num_layers=1)
    x, t, e = torch.randn(2, 4, 2, 4, 4), torch.tensor([500.0, 500.0]), torch.randn(2, 512, 32)
    with apply_dare(model) as h:
        # Wan T2V attends any text length: the length is checked at the forward against the text the layer
        # sees, whatever the values (all-ones weights run the fast path and are checked too)
        for w in (torch.rand(2, 77), torch.ones(77), torch.ones(2, 77)):
            h.set_token_weights(w)
            with pytest.raises(ValueError, match=r"77 entries per prompt.*blocks.0.attn2 attends 512 text tokens"
                                                 r".*max_sequence_length"):
                model(x, t, e)
        h.set_token_weights({"cond": torch.ones(512), "degraded": torch.ones(77)})
        model(x, t, e)  # this forward runs no degraded branch
        with h.branch("uncond", "degraded"), pytest.raises(ValueError, match=r"77 entries per prompt"):
            model(x, t, e)
        # the same weights fit a forward whose text has 77 tokens
        h.set_token_weights(torch.rand(2, 77))
        assert model(x, t, torch.randn(2, 77, 32), return_dict=False)[0].shape == x.shape
        # the batch against each forward's branches, all-ones weights included (they run the stock fast path)
        for w in (torch.rand(3, 512), torch.ones(3, 512)):
            h.set_token_weights(w)
            with pytest.raises(ValueError, match="hold 3 prompts"):
                model(x, t, e)
        h.set_token_weights(torch.ones(1, 512))  # one prompt tiles a branch of 2 samples
        model(x, t, e)
        for bad in (float("nan"), float("inf"), -1.0):
            w = torch.ones(512)
            w[5] = bad
            with pytest.raises(ValueError, match="must be finite and >= 0"):
                h.set_token_weights(w)
        with pytest.raises(ValueError, match="negative"):
            h.set_token_weights(-torch.rand(2, 512))
        with pytest.raises(ValueError, match=r"\[B, M\] or \[M\]"):
            h.set_token_weights(torch.rand(2, 2, 512))
        with pytest.raises(TypeError, match="torch.Tensor"):
            h.set_token_weights([1.0] * 512)
        with pytest.raises(ValueError, match="unknown branch"):
            h.set_token_weights({"positive": torch.rand(512)})
        with pytest.raises(ValueError, match="branch"):
            with h.branch("negative"):
                pass
    with pytest.raises(ValueError, match="strength"):
        apply_dare(model, strength=-1.0)
    with pytest.raises(ValueError, match="backend"):
        apply_dare(model, backend="flash")


def test_modified_processor_is_refused():
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = tiny.tiny_cogvideox(num_layers=1)
    model.fuse_qkv_projections()
    with pytest.raises(TypeError, match="unfuse_qkv_projections"):
        apply_dare(model)
    model.unfuse_qkv_projections()
    model.transformer_blocks[0].attn1.processor = AttnProcessor2_0()
    with pytest.raises(TypeError, match="AttnProcessor2_0"):
        apply_dare(model)
    assert "_dare_handle" not in model.__dict__


def test_ltx_mask_must_be_padding_mask():
    torch.manual_seed(0)
    model = tiny.tiny_ltx(num_layers=1)
    x, e = torch.randn(1, 8, 8), torch.randn(1, 6, 32)
    bias = torch.full((1, 1, 6), -0.5)
    with apply_dare(model) as h:
        h.set_token_weights(torch.rand(1, 6) + 0.1)  # the SRA path (the fast path hands the bias to diffusers)
        with pytest.raises(ValueError, match="key-padding masks"):
            model(x, e, torch.tensor([500.0]), bias, num_frames=2, height=2, width=2)
