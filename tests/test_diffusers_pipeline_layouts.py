"""CFG layouts of real pipelines: AnimateDiff's batched [uncond; cond] pass (no cache_context) and Wan 2.2's
two experts (``transformer`` + ``transformer_2``) under one handle; against stock and the float64 oracle."""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("diffusers")

from dare_kernels.integrations.diffusers import apply_dare, tiny  # noqa: E402
from dare_kernels.reference import sra_attention_ref  # noqa: E402

M_AD, FRAMES = 10, 2  # AnimateDiff prompt length (not a spatial / temporal key length of the tiny UNet), frames


def _ad_run(pipe, **kw):
    g = torch.Generator().manual_seed(0)
    pe = torch.randn(1, M_AD, 32, generator=g)
    ne = torch.randn(1, M_AD, 32, generator=g)
    args = dict(prompt_embeds=pe, negative_prompt_embeds=ne, num_frames=FRAMES, height=32, width=32,
                num_inference_steps=2, guidance_scale=4.0, output_type="latent",
                generator=torch.Generator().manual_seed(1))
    args.update(kw)
    return pipe(**args).frames


def _ad_oracle(monkeypatch, w_uncond, w_cond, strength):
    """Stock AttnProcessor2_0 with its text cross-attention core = sra_attention_ref (float64); batch [uncond; cond]."""
    import diffusers.models.attention_processor as ap

    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        if key.shape[2] != M_AD:
            return real_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
        half = query.shape[0] // 2  # B·F rows per branch
        w = torch.cat([w_uncond.expand(half, M_AD), w_cond.expand(half, M_AD)]).double()
        o = sra_attention_ref(query.double(), key.double(), value.double(), w, strength=strength)
        return o.to(query.dtype)

    proxy = types.SimpleNamespace(**{n: getattr(torch.nn.functional, n) for n in dir(torch.nn.functional)
                                     if not n.startswith("__")})
    proxy.scaled_dot_product_attention = sdpa
    monkeypatch.setattr(ap, "F", proxy)


@torch.no_grad()
def test_animatediff_pipeline_weights_one_equal_stock():
    pipe = tiny.tiny_animatediff_pipeline()
    stock = _ad_run(pipe)
    with apply_dare(pipe) as h:
        h.set_token_weights(torch.ones(1, M_AD))
        assert torch.equal(_ad_run(pipe), stock)  # fast path: diffusers' own attention
        h.fast_path = False
        kernel = _ad_run(pipe)
    torch.testing.assert_close(kernel, stock, atol=1e-5 * float(stock.abs().max()), rtol=1e-5)


@torch.no_grad()
def test_animatediff_batched_cfg_layout_and_reference(monkeypatch):
    pipe = tiny.tiny_animatediff_pipeline()
    w = torch.rand(1, M_AD, generator=torch.Generator().manual_seed(2)) * 2 + 0.05
    strength = 0.8
    with apply_dare(pipe, strength=strength, capture_maps=True) as h:
        _ad_run(pipe, num_inference_steps=1)
        plain = {b: {k: v.clone() for k, v in maps.items()} for b, maps in h.branch_maps.items()}
        assert set(plain) == {"uncond", "cond"}
        h.set_token_weights(w, only_cond=True)
        out = _ad_run(pipe)
        layer = h.layers[0]
        assert h.maps[layer].shape[0] == 2 and h.branch_maps["cond"][layer].shape[0] == 1
        _ad_run(pipe, num_inference_steps=1)
        for name in h.layers:  # the unconditional half stays stock, the conditional half is weighted
            assert torch.equal(h.branch_maps["uncond"][name], plain["uncond"][name])
            assert not torch.allclose(h.branch_maps["cond"][name], plain["cond"][name])
            assert torch.equal(h.branch_maps["cond"][name], h.maps[name][1:])
        from dare_kernels.viz import maps_to_grid

        # render_maps(branch="cond") draws the conditional half only (row 1 of the [uncond; cond] batch)
        assert torch.equal(maps_to_grid(h, [0, 3], branch="cond"), maps_to_grid(h, [0, 3], sample=1))
        assert not torch.equal(maps_to_grid(h, [0, 3], branch="cond"), maps_to_grid(h, [0, 3], sample=0))
        # a direct UNet call after the run (the pipeline's CFG flag is stale): distinct halves = one "cond" batch
        x = torch.randn(2, 4, FRAMES, 4, 4)
        h.reset_maps()
        pipe.unet(x, torch.tensor([500.0]), torch.randn(2 * FRAMES, M_AD, 32))
        assert set(h.branch_maps) == {"cond"} and h.branch_maps["cond"][layer].shape[0] == 2
    stock = _ad_run(pipe)
    assert float((out - stock).abs().max()) > 1e-4 * float(stock.abs().max())
    _ad_oracle(monkeypatch, torch.ones(1, M_AD), w, strength)
    ref = _ad_run(pipe)
    torch.testing.assert_close(out, ref, atol=2e-5 * float(ref.abs().max()), rtol=1e-4)


@torch.no_grad()
def test_animatediff_without_cfg_is_one_cond_batch():
    pipe = tiny.tiny_animatediff_pipeline()
    with apply_dare(pipe, capture_maps=True) as h:
        h.set_token_weights(torch.rand(1, M_AD) + 0.1, only_cond=True)
        _ad_run(pipe, guidance_scale=1.0, num_inference_steps=1)
        assert set(h.branch_maps) == {"cond"}
        assert h.branch_maps["cond"][h.layers[0]].shape[0] == 1


@torch.no_grad()
def test_animatediff_model_alone_falls_back_to_cond():
    """Given the UNet alone, nothing says the batch is CFG: the whole batch is "cond" (documented)."""
    pipe = tiny.tiny_animatediff_pipeline()
    with apply_dare(pipe.unet, capture_maps=True) as h:
        _ad_run(pipe, num_inference_steps=1)
        assert set(h.branch_maps) == {"cond"} and h.branch_maps["cond"][h.layers[0]].shape[0] == 2


# ---------------------------------------------------------------------------------------------
# Wan 2.2 A14B: two experts, one handle
# ---------------------------------------------------------------------------------------------

def _wan22_run(pipe, steps=2):
    g = torch.Generator().manual_seed(0)
    pe, ne = torch.randn(1, 512, 32, generator=g), torch.randn(1, 512, 32, generator=g)
    return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, height=64, width=64, num_frames=5,
                num_inference_steps=steps, guidance_scale=4.0, output_type="latent",
                generator=torch.Generator().manual_seed(1)).frames


@torch.no_grad()
def test_wan22_two_experts_one_handle(monkeypatch):
    pipe = tiny.tiny_wan22_pipeline(boundary_ratio=0.9, num_layers=1)
    stock = _wan22_run(pipe)
    w = torch.rand(1, 512, generator=torch.Generator().manual_seed(3)) * 2 + 0.05
    strength = 0.9
    with apply_dare(pipe, strength=strength, capture_maps=True) as h:
        assert h.layers == ["transformer.blocks.0.attn2", "transformer_2.blocks.0.attn2"]
        h.set_token_weights(torch.ones(1, 512))
        h.fast_path = False
        ones = _wan22_run(pipe)
        h.set_token_weights(w)
        out = _wan22_run(pipe)
        # both experts ran weighted, each in separate "cond" and "uncond" passes
        for branch in ("cond", "uncond"):
            assert set(h.branch_maps[branch]) == set(h.layers)
    torch.testing.assert_close(ones, stock, atol=1e-5 * float(stock.abs().max()), rtol=1e-5)
    assert float((out - stock).abs().max()) > 1e-4 * float(stock.abs().max())

    import diffusers.models.transformers.transformer_wan as wan_mod

    real = wan_mod.dispatch_attention_fn

    def dispatch(query, key, value, attn_mask=None, **kw):  # [B, N, H, D]; text cross-attention has 512 keys
        if key.shape[1] != 512 or query.shape[1] == 512:
            return real(query, key, value, attn_mask=attn_mask, **kw)
        o = sra_attention_ref(query.transpose(1, 2).double(), key.transpose(1, 2).double(),
                              value.transpose(1, 2).double(), w.double().expand(query.shape[0], 512),
                              strength=strength)
        return o.transpose(1, 2).to(query.dtype)

    monkeypatch.setattr(wan_mod, "dispatch_attention_fn", dispatch)
    ref = _wan22_run(pipe)
    torch.testing.assert_close(out, ref, atol=2e-5 * float(ref.abs().max()), rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# HunyuanVideo: true CFG as separate "cond" / "uncond" passes, text masks per branch
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def test_hunyuan_video_pipeline_true_cfg():
    pipe = tiny.tiny_hunyuan_video_pipeline()
    T = 12
    g = torch.Generator().manual_seed(0)
    pe, ne = torch.randn(1, T, 32, generator=g), torch.randn(1, T, 32, generator=g)
    pm, nm = torch.ones(1, T), torch.ones(1, T)
    pm[:, 9:] = 0
    nm[:, 4:] = 0
    pp, npool = torch.randn(1, 16, generator=g), torch.randn(1, 16, generator=g)

    def run(steps=2):
        return pipe(prompt_embeds=pe, prompt_attention_mask=pm, pooled_prompt_embeds=pp, negative_prompt_embeds=ne,
                    negative_prompt_attention_mask=nm, negative_pooled_prompt_embeds=npool, true_cfg_scale=4.0,
                    height=32, width=32, num_frames=5, num_inference_steps=steps, output_type="latent",
                    generator=torch.Generator().manual_seed(1)).frames

    stock = run()
    with apply_dare(pipe, capture_maps=True) as h:
        h.set_token_weights(torch.ones(1, T))
        h.fast_path = False
        ones = run()
        run(steps=1)  # one step: both branches see the same latents
        plain = {b: {k: v.clone() for k, v in maps.items()} for b, maps in h.branch_maps.items()}
        w = torch.rand(1, T, generator=g) + 0.05
        h.set_token_weights(w, only_cond=True)
        out = run()
        run(steps=1)
        for name in h.layers:
            assert torch.equal(h.branch_maps["uncond"][name], plain["uncond"][name])
            assert not torch.allclose(h.branch_maps["cond"][name], plain["cond"][name])
            assert bool((h.branch_maps["cond"][name][..., 9:] == 0).all())  # padded text keys: no attention
            assert bool((h.branch_maps["uncond"][name][..., 4:] == 0).all())
    torch.testing.assert_close(ones, stock, atol=1e-5 * float(stock.abs().max()), rtol=1e-5)
    assert float((out - stock).abs().max()) > 1e-4 * float(stock.abs().max())
