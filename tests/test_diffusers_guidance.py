"""DAREGuidance (diffusers guider) and dare_guidance (classic pipelines) against diffusers' own guiders."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from dare_kernels.integrations.diffusers import DAREGuidance, apply_dare, dare_guidance  # noqa: E402
from dare_kernels.integrations.diffusers import tiny  # noqa: E402




def branch_predictions(handle, model, x, t, **embeds):
    """One plain forward per branch (uncond=..., cond=..., degraded=... text embeddings), each told its branch:
    the per-branch predictions a guider combines, in the order given."""
    preds = []
    for branch, e in embeds.items():
        with handle.branch(branch):
            preds.append(model(x, t.expand(x.shape[0]), e, return_dict=False)[0])
    return preds

def _preds(shape=(2, 4, 3, 5, 6), dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    c = torch.randn(shape, generator=g, dtype=torch.float64)
    u = c * 0.8 + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    d = c * 0.9 + 0.2 * torch.randn(shape, generator=g, dtype=torch.float64)
    return u.to(dtype), c.to(dtype), d.to(dtype)


def _run_guider(guider, steps, preds_per_step):
    outs = []
    for i in range(steps):
        guider.set_state(step=i, num_inference_steps=steps, timestep=torch.tensor(999 - i))
        guider.prepare_inputs({})  # diffusers' APG creates its momentum buffer here at step 0
        outs.append(guider.forward(**preds_per_step(i))[0])
    return outs


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_cfg_mode_equals_diffusers_cfg(rescale):
    from diffusers import ClassifierFreeGuidance

    u, c, _ = _preds()
    ours = DAREGuidance(guidance_scale=6.0, mode="cfg", guidance_rescale=rescale)
    theirs = ClassifierFreeGuidance(guidance_scale=6.0, guidance_rescale=rescale)
    for gd in (ours, theirs):
        gd.set_state(step=0, num_inference_steps=4, timestep=torch.tensor(999))
    a = ours.forward(pred_cond=c, pred_uncond=u)[0]
    b = theirs.forward(pred_cond=c, pred_uncond=u)[0]
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_cfg_zero_star_equals_diffusers():
    from diffusers import ClassifierFreeZeroStarGuidance

    u, c, _ = _preds()
    ours = DAREGuidance(guidance_scale=5.0, mode="cfg_zero_star")
    theirs = ClassifierFreeZeroStarGuidance(guidance_scale=5.0, zero_init_steps=0)
    for gd in (ours, theirs):
        gd.set_state(step=1, num_inference_steps=4, timestep=torch.tensor(500))
    torch.testing.assert_close(ours.forward(pred_cond=c, pred_uncond=u)[0],
                               theirs.forward(pred_cond=c, pred_uncond=u)[0], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("momentum,threshold,eta", [(None, 0.0, 1.0), (-0.5, 15.0, 0.3), (0.4, 2.0, 0.0)])
def test_apg_equals_diffusers_over_steps(momentum, threshold, eta):
    from diffusers import AdaptiveProjectedGuidance

    ours = DAREGuidance(guidance_scale=7.0, mode="apg", momentum=momentum, norm_threshold=threshold, eta=eta)
    theirs = AdaptiveProjectedGuidance(guidance_scale=7.0, adaptive_projected_guidance_momentum=momentum,
                                       adaptive_projected_guidance_rescale=threshold, eta=eta)

    def preds(i):
        u, c, _ = _preds()
        return {"pred_cond": c * (1 + 0.1 * i), "pred_uncond": u}

    for a, b in zip(_run_guider(ours, 3, preds), _run_guider(theirs, 3, preds)):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("mode", ["cfg", "cfg_zero_star", "apg"])
def test_degraded_branch_adds_rectify_term(mode):
    u, c, d = _preds()
    with_d = DAREGuidance(guidance_scale=4.0, rectify_scale=1.5, mode=mode)
    without = DAREGuidance(guidance_scale=4.0, mode=mode)
    for gd in (with_d, without):
        gd.set_state(step=0, num_inference_steps=4, timestep=torch.tensor(999))
    assert with_d.num_conditions == 3 and without.num_conditions == 2
    a = with_d.forward(pred_cond=c, pred_uncond=u, pred_degraded=d)[0]
    b = without.forward(pred_cond=c, pred_uncond=u)[0]
    torch.testing.assert_close(a.double(), b.double() + 1.5 * (c.double() - d.double()), atol=3e-5, rtol=3e-5)


def test_guider_disabled_outside_range_and_config_roundtrip():
    u, c, d = _preds()
    gd = DAREGuidance(guidance_scale=4.0, rectify_scale=1.0, start=0.5)
    gd.set_state(step=0, num_inference_steps=4, timestep=torch.tensor(999))
    assert gd.num_conditions == 1
    assert torch.equal(gd.forward(pred_cond=c)[0], c)
    again = gd.new(guidance_scale=2.0)
    assert isinstance(again, DAREGuidance) and again.guidance_scale == 2.0 and again.rectify_scale == 1.0
    with pytest.raises(ValueError, match="mode"):
        DAREGuidance(mode="pag")
    with pytest.raises(ValueError, match="momentum"):
        DAREGuidance(mode="cfg", momentum=0.5)


def test_modular_inputs_and_branch_marking():
    """prepare_inputs_from_block_state builds cond / uncond / degraded batches; prepare_models tells the handle."""
    from diffusers.modular_pipelines.modular_pipeline import BlockState

    gd = DAREGuidance(guidance_scale=4.0, rectify_scale=1.0,
                      degraded_inputs={"encoder_hidden_states": "degraded_prompt_embeds"})
    gd.set_state(step=0, num_inference_steps=2, timestep=torch.tensor(999))
    pe, ne, de = torch.randn(1, 512, 32), torch.randn(1, 512, 32), torch.randn(1, 512, 32)
    state = BlockState(prompt_embeds=pe, negative_prompt_embeds=ne, degraded_prompt_embeds=de)
    batches = gd.prepare_inputs_from_block_state(state, {"encoder_hidden_states": ("prompt_embeds",
                                                                                  "negative_prompt_embeds")})
    assert [b.__guidance_identifier__ for b in batches] == ["pred_cond", "pred_uncond", "pred_degraded"]
    assert batches[0].encoder_hidden_states is pe and batches[1].encoder_hidden_states is ne
    assert batches[2].encoder_hidden_states is de

    model = tiny.tiny_wan(num_layers=1)
    x = torch.randn(1, 4, 2, 4, 4)
    seen = []
    with apply_dare(model, capture_maps=True) as h:
        w = torch.rand(1, 512) + 0.1
        h.set_token_weights(w, only_cond=True, degraded=torch.where(torch.arange(512) < 5, 0.0, 1.0).view(1, -1))
        for b in batches:
            gd.prepare_models(model)
            with torch.no_grad():
                model(x, torch.tensor([999.0]), b.encoder_hidden_states)
            seen.append(h._layout(1))
            amap = next(iter(h.maps.values()))
            if b.__guidance_identifier__ == "pred_degraded":
                assert bool((amap[..., :5] == 0).all()), "degraded weights not applied in the degraded pass"
            gd.cleanup_models(model)
    assert seen == [("cond",), ("uncond",), ("degraded",)]
    assert set(h.branch_maps) == {"cond", "uncond", "degraded"}


@torch.no_grad()
@pytest.mark.parametrize("mode", ["cfg", "apg"])
def test_dare_guidance_batches_branches_and_combines(mode):
    """Inside dare_guidance one transformer call = uncond, cond, degraded stacked, combined by rectified CFG."""
    pipe = tiny.tiny_wan_pipeline()
    model = pipe.transformer
    x = torch.randn(1, 4, 2, 4, 4)
    t = torch.tensor([700.0])
    pe, ne, de = torch.randn(1, 512, 32), torch.randn(1, 512, 32), torch.randn(1, 512, 32)
    u = model(x, t, ne, return_dict=False)[0]
    c = model(x, t, pe, return_dict=False)[0]
    d = model(x, t, de, return_dict=False)[0]
    with dare_guidance(pipe, negative_prompt_embeds=ne, degraded_prompt_embeds=de, guidance_scale=5.0,
                       rectify_scale=2.0, mode=mode):
        g = model(x, t, pe, return_dict=False)[0]
    ref = DAREGuidance(guidance_scale=5.0, rectify_scale=2.0, mode=mode)
    ref.set_state(step=0, num_inference_steps=1, timestep=t)
    expect = ref.forward(pred_cond=c, pred_uncond=u, pred_degraded=d)[0]
    torch.testing.assert_close(g, expect, atol=1e-5, rtol=1e-5)
    assert "forward" not in model.__dict__


@torch.no_grad()
def test_dare_guidance_with_handle_uses_per_branch_weights():
    pipe = tiny.tiny_wan_pipeline()
    model = pipe.transformer
    x = torch.randn(1, 4, 2, 4, 4)
    t = torch.tensor([700.0])
    pe, ne = torch.randn(1, 512, 32), torch.randn(1, 512, 32)
    w = torch.rand(1, 512) + 0.2
    wd = torch.where(torch.arange(512) < 8, 0.0, 1.0).view(1, -1)
    with apply_dare(pipe) as h:
        h.set_token_weights(w, only_cond=True, degraded=wd)
        with h.branch("uncond"):
            u = model(x, t, ne, return_dict=False)[0]
        with h.branch("cond"):
            c = model(x, t, pe, return_dict=False)[0]
        with h.branch("degraded"):
            d = model(x, t, pe, return_dict=False)[0]
        with dare_guidance(pipe, negative_prompt_embeds=ne, guidance_scale=3.0, rectify_scale=1.0):
            g = model(x, t, pe, return_dict=False)[0]
    expect = u + 3.0 * (c - u) + 1.0 * (c - d)
    torch.testing.assert_close(g, expect, atol=1e-5, rtol=1e-5)


def test_dare_guidance_refuses_pipeline_cfg():
    pipe = tiny.tiny_cogvideox_pipeline()
    pe, ne = torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    with dare_guidance(pipe, negative_prompt_embeds=ne, guidance_scale=3.0):
        with pytest.raises(RuntimeError, match="guidance_scale=1.0"):
            pipe(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=3.0, height=64, width=64, num_frames=5,
                 num_inference_steps=1, output_type="latent")
    assert "forward" not in pipe.transformer.__dict__


@torch.no_grad()
def test_guider_in_wan_modular_denoise_step():
    """diffusers' own modular Wan denoise step drives DAREGuidance through three passes and the combine."""
    import types

    from diffusers.modular_pipelines.modular_pipeline import BlockState
    from diffusers.modular_pipelines.wan.denoise import WanLoopDenoiser

    torch.manual_seed(0)
    model = tiny.tiny_wan(num_layers=1)
    x = torch.randn(1, 4, 2, 4, 4)
    t = torch.tensor(700.0)
    pe, ne, de = torch.randn(1, 512, 32), torch.randn(1, 512, 32), torch.randn(1, 512, 32)
    guider = DAREGuidance(guidance_scale=4.0, rectify_scale=1.5, mode="cfg_zero_star",
                          degraded_inputs={"encoder_hidden_states": "degraded_prompt_embeds"})
    w = torch.rand(1, 512) + 0.1
    with apply_dare(model) as h:
        h.set_token_weights(w, only_cond=True)
        state = BlockState(num_inference_steps=2, latent_model_input=x, dtype=torch.float32, attention_kwargs=None,
                           prompt_embeds=pe, negative_prompt_embeds=ne, degraded_prompt_embeds=de)
        comps = types.SimpleNamespace(guider=guider, transformer=model)
        WanLoopDenoiser()(comps, state, 0, t)
        got = state.noise_pred
        u, c, d = branch_predictions(h, model, x, t, uncond=ne, cond=pe, degraded=de)
    ref = DAREGuidance(guidance_scale=4.0, rectify_scale=1.5, mode="cfg_zero_star")
    ref.set_state(step=0, num_inference_steps=2, timestep=t)
    torch.testing.assert_close(got, ref.forward(pred_cond=c, pred_uncond=u, pred_degraded=d)[0],
                               atol=1e-5, rtol=1e-5)
