"""apply_dare / dare_guidance / DAREGuidance under offloading, diffusers' hooks, attention backends and compile.

Everything runs on CPU with the real accelerate / diffusers hooks. Where a hook wants an accelerator the
composition is tested with the device it accepts:
- ``enable_model_cpu_offload(device="cpu")``: accelerate's CpuOffload hooks, offload and onload device cpu.
- group offloading with ``onload_device=cpu`` (block and leaf level).
- sequential CPU offload: ``enable_sequential_cpu_offload(device="cpu")`` fails on a CPU execution device
  for stock pipelines too (accelerate 1.16 / torch 2.13: ``set_module_tensor_to_device`` re-wraps an onloaded
  plain tensor with ``Tensor(t, requires_grad=...)``), so its composition is tested with the hook it installs,
  accelerate's ``AlignDevicesHook`` on every submodule (weights stay in place); the real call is a gpu test.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
accelerate = pytest.importorskip("accelerate")

from dare_kernels.integrations.diffusers import DAREGuidance, apply_dare, dare_guidance  # noqa: E402
from dare_kernels.integrations.diffusers import tiny  # noqa: E402

from conftest import assert_close_to_scale  # noqa: E402
from test_diffusers_guidance import branch_predictions  # noqa: E402

M = 512  # Wan's text length


def _embeds():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, M, 32, generator=g), torch.randn(1, M, 32, generator=g)


def _run(pipe, pe, **kw):
    return pipe(prompt_embeds=pe, height=64, width=64, num_frames=5, num_inference_steps=2, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kw).frames


def _align_hooks(pipe):
    """The hook enable_sequential_cpu_offload installs (AlignDevicesHook per submodule), weights left in place."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    for m in pipe.transformer.modules():
        add_hook_to_module(m, AlignDevicesHook(execution_device=torch.device("cpu"), io_same_device=True))


def _group_offload_cpu(install):
    """Group offloading onto cpu; diffusers <= 0.38 builds it from torch.accelerator.current_accelerator(), which
    is None on a machine without an accelerator (stock models fail the same way): skipped there."""
    import diffusers

    try:
        install()
    except AttributeError as e:
        if torch.accelerator.current_accelerator() is None and "'type'" in str(e):
            pytest.skip(f"diffusers {diffusers.__version__}: group offloading needs an accelerator present ({e})")
        raise


def _group_offload_blocks(pipe):
    _group_offload_cpu(lambda: pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                          offload_type="block_level", num_blocks_per_group=1))


def _group_offload_leaves(pipe):
    from diffusers.hooks import apply_group_offloading

    _group_offload_cpu(lambda: apply_group_offloading(pipe.transformer, onload_device=torch.device("cpu"),
                                                      offload_type="leaf_level"))


def _model_offload(pipe):
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.transformer, "_hf_hook")


def _attention_backend(pipe):
    pipe.transformer.set_attention_backend("native")


def _compiled_wrapper(pipe):
    # backend "eager": Dynamo traces and guards as for inductor, without the C++ build time on this CPU
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")


def _compiled_in_place(pipe):
    pipe.transformer.compile(backend="eager", fullgraph=True)  # the module hooks stay out of the graph


SETUPS = {
    "model_cpu_offload": _model_offload,
    "sequential_offload_hooks": _align_hooks,
    "group_offload_block": _group_offload_blocks,
    "group_offload_leaf": _group_offload_leaves,
    "attention_backend": _attention_backend,
    "compiled_wrapper": _compiled_wrapper,
    "compiled_in_place": _compiled_in_place,
}


@pytest.fixture(scope="module")
def references():
    """Stock CFG and weighted DARE guidance on a plain tiny Wan pipeline (nothing installed on it)."""
    torch.manual_seed(0)
    pe, ne = _embeds()
    w = torch.rand(1, M) + 0.1
    pipe = tiny.tiny_wan_pipeline()
    stock = _run(pipe, pe, negative_prompt_embeds=ne, guidance_scale=4.0)
    with apply_dare(pipe, capture_maps=True) as h:
        h.set_token_weights(w, only_cond=True)
        with dare_guidance(pipe, negative_prompt_embeds=ne, guidance_scale=4.0, rectify_scale=1.0):
            weighted = _run(pipe, pe, guidance_scale=1.0)
        maps = {k: v.clone() for k, v in h.maps.items()}
    return dict(pe=pe, ne=ne, w=w, stock=stock, weighted=weighted, maps=maps)


@torch.no_grad()
@pytest.mark.parametrize("setup", list(SETUPS))
def test_dare_guidance_and_apply_dare_compose(setup, references):
    """Under each set-up: dare_guidance equals stock CFG; with apply_dare weights it equals the plain pipeline's
    weighted run, maps captured; no instance forward is installed; the set-up's own hooks stay in place."""
    r = references
    pipe = tiny.tiny_wan_pipeline()
    SETUPS[setup](pipe)
    model = pipe.transformer
    forward_before = model.__dict__.get("forward")
    with dare_guidance(pipe, negative_prompt_embeds=r["ne"], guidance_scale=4.0):
        assert model.__dict__.get("forward") is forward_before  # hooks, no forward replacement
        guided = _run(pipe, r["pe"], guidance_scale=1.0)
        again = _run(pipe, r["pe"], guidance_scale=1.0)  # model offload re-installs its hooks after a call
    assert_close_to_scale(guided, r["stock"])
    assert_close_to_scale(again, r["stock"])
    with apply_dare(pipe, capture_maps=True) as h:
        h.set_token_weights(r["w"], only_cond=True)
        with dare_guidance(pipe, negative_prompt_embeds=r["ne"], guidance_scale=4.0, rectify_scale=1.0):
            weighted = _run(pipe, r["pe"], guidance_scale=1.0)
        assert set(h.branch_maps) == {"uncond", "cond", "degraded"}
        assert h.maps.keys() == r["maps"].keys()
        for k, v in r["maps"].items():
            assert_close_to_scale(h.maps[k], v)
    assert_close_to_scale(weighted, r["weighted"])
    assert float((weighted - r["stock"]).abs().max()) > 1e-4  # the weights did something
    if setup != "model_cpu_offload":  # model offload re-installs its hooks (a new forward) after each call
        assert model.__dict__.get("forward") is forward_before
    assert not model._forward_pre_hooks and not model._forward_hooks  # everything of ours removed
    if setup == "model_cpu_offload":
        assert hasattr(pipe.transformer, "_hf_hook")


@torch.no_grad()
@pytest.mark.parametrize("setup", ["model_cpu_offload", "group_offload_block", "compiled_wrapper"])
def test_guider_composes(setup):
    """DAREGuidance in diffusers' modular Wan denoise step, the transformer offloaded / compiled, weights per branch."""
    import types

    from diffusers.modular_pipelines.modular_pipeline import BlockState
    from diffusers.modular_pipelines.wan.denoise import WanLoopDenoiser

    torch.manual_seed(0)
    pipe = tiny.tiny_wan_pipeline()
    x = torch.randn(1, 4, 2, 4, 4)
    t = torch.tensor(700.0)
    pe, ne = _embeds()
    w = torch.rand(1, M) + 0.1
    guider = DAREGuidance(guidance_scale=4.0, rectify_scale=1.5)
    with apply_dare(pipe) as h:
        h.set_token_weights(w, only_cond=True, degraded=torch.where(torch.arange(M) < 6, 0.0, 1.0).view(1, M))
        u, c, d = branch_predictions(h, pipe.transformer, x, t, uncond=ne, cond=pe, degraded=pe)
        SETUPS[setup](pipe)
        state = BlockState(num_inference_steps=2, latent_model_input=x, dtype=torch.float32, attention_kwargs=None,
                           prompt_embeds=pe, negative_prompt_embeds=ne)
        WanLoopDenoiser()(types.SimpleNamespace(guider=guider, transformer=pipe.transformer), state, 0, t)
    ref = DAREGuidance(guidance_scale=4.0, rectify_scale=1.5)
    ref.set_state(step=0, num_inference_steps=2, timestep=t)
    assert_close_to_scale(state.noise_pred, ref.forward(pred_cond=c, pred_uncond=u, pred_degraded=d)[0])


# ---------------------------------------------------------------------------------------------
# diffusers' cache hooks: CogVideoX / LTX pipelines batch [uncond; cond] in one pass, as dare_guidance does,
# so the cache sees the same batches and makes the same decisions: equal results
# ---------------------------------------------------------------------------------------------

def _cog_args():
    g = torch.Generator().manual_seed(2)
    pe, ne = torch.randn(1, 16, 32, generator=g), torch.randn(1, 16, 32, generator=g)
    return pe, ne, dict(height=64, width=64, num_frames=5, num_inference_steps=4, output_type="latent")


def _fbc(pipe):
    from diffusers.hooks import FirstBlockCacheConfig

    return FirstBlockCacheConfig(threshold=1e9)  # reuse the residual on every step after the first


def _pab(pipe):
    from diffusers.hooks import PyramidAttentionBroadcastConfig

    return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                           spatial_attention_timestep_skip_range=(-1, 1001),
                                           current_timestep_callback=lambda: pipe.current_timestep)


def _faster(pipe):
    from diffusers.hooks import FasterCacheConfig

    return FasterCacheConfig(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
                             unconditional_batch_skip_range=2, unconditional_batch_timestep_skip_range=(-1, 1001),
                             current_timestep_callback=lambda: pipe.current_timestep, tensor_format="BFCHW")


CACHES = {"first_block_cache": _fbc, "pyramid_attention_broadcast": _pab, "faster_cache": _faster}


@torch.no_grad()
@pytest.mark.parametrize("cache", list(CACHES))
def test_cache_hooks_compose_on_cogvideox(cache):
    pe, ne, args = _cog_args()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = tiny.tiny_cogvideox_pipeline()
    uncached = plain(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=4.0, generator=gen(), **args).frames
    pipe = tiny.tiny_cogvideox_pipeline()
    pipe.transformer.enable_cache(CACHES[cache](pipe))
    stock = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=4.0, generator=gen(), **args).frames
    assert float((stock - uncached).abs().max()) > 1e-6, "the cache did not engage"
    with dare_guidance(pipe, negative_prompt_embeds=ne, guidance_scale=4.0):
        guided = pipe(prompt_embeds=pe, guidance_scale=1.0, generator=gen(), **args).frames
    assert_close_to_scale(guided, stock)
    maps_per_step = []

    def count_maps(p, i, t, kw):
        maps_per_step.append(len(h.maps))
        return kw

    with apply_dare(pipe, capture_maps=True) as h:
        h.set_token_weights(torch.ones(1, 16))
        with dare_guidance(pipe, negative_prompt_embeds=ne, guidance_scale=4.0):
            patched = pipe(prompt_embeds=pe, guidance_scale=1.0, generator=gen(), callback_on_step_end=count_maps,
                           **args).frames
    assert_close_to_scale(patched, stock)
    # a step whose attention a cache skips has no map of that layer; computed steps have all of them
    assert maps_per_step[0] == len(h.layers) and max(maps_per_step) == len(h.layers)
    if cache == "faster_cache":
        with pytest.raises(ValueError, match="FasterCache"):
            with dare_guidance(pipe, negative_prompt_embeds=ne, guidance_scale=4.0, rectify_scale=1.0):
                pass


@torch.no_grad()
def test_faster_cache_refuses_per_branch_weights():
    """On the steps where FasterCache reuses the unconditional prediction it runs the cond half alone, which the
    handle cannot tell from a [uncond; cond] batch: per-branch weights must raise, not weight the wrong rows."""
    pe, ne, args = _cog_args()
    pipe = tiny.tiny_cogvideox_pipeline()
    pipe.transformer.enable_cache(_faster(pipe))
    w = torch.rand(1, 16, generator=torch.Generator().manual_seed(1)) + 0.1
    with apply_dare(pipe) as h:
        h.set_token_weights(w, only_cond=True)
        with pytest.raises(ValueError, match="FasterCache runs the conditional half"):
            pipe(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=4.0, **args)
        h.set_token_weights(w)  # the same weights for every branch: allowed
        pipe(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=4.0, **args)


@torch.no_grad()
def test_first_block_cache_on_wan_with_weights():
    """Wan runs cond / uncond as separate cached passes in stock; under dare_guidance the one batched pass is
    cached in the "cond" context. Threshold 0 never reuses, so the result equals the uncached guided run."""
    from diffusers.hooks import FirstBlockCacheConfig

    torch.manual_seed(0)
    pe, ne = _embeds()
    w = torch.rand(1, M) + 0.1
    out = {}
    for cached in (False, True):
        pipe = tiny.tiny_wan_pipeline()
        if cached:
            pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))
        with apply_dare(pipe) as h:
            h.set_token_weights(w, only_cond=True)
            with dare_guidance(pipe, negative_prompt_embeds=ne, guidance_scale=4.0, rectify_scale=0.5):
                out[cached] = _run(pipe, pe, guidance_scale=1.0)
    assert_close_to_scale(out[True], out[False])


def test_nested_contexts_refused_and_errors_leave_no_hooks():
    pipe = tiny.tiny_wan_pipeline()
    pe, ne = _embeds()
    with dare_guidance(pipe, negative_prompt_embeds=ne):
        with pytest.raises(RuntimeError, match="do not nest"):
            with dare_guidance(pipe, negative_prompt_embeds=ne):
                pass
        with pytest.raises(ValueError, match="negative / degraded embeddings must match"):
            _run(pipe, pe[:, :100], guidance_scale=1.0)
    assert not pipe.transformer._forward_pre_hooks and not pipe.transformer._forward_hooks
    with dare_guidance(pipe, negative_prompt_embeds=ne):  # usable again after the errors
        _run(pipe, pe, guidance_scale=1.0)


# ---------------------------------------------------------------------------------------------
# the real accelerator set-ups (skipped without CUDA)
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for accelerate's offload onto it")
@pytest.mark.parametrize("offload", ["model", "sequential", "group"])
@torch.no_grad()
def test_offload_to_cuda(offload, references):
    r = references
    pipe = tiny.tiny_wan_pipeline()
    if offload == "model":
        pipe.enable_model_cpu_offload()
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload()
    else:
        pipe.transformer.enable_group_offload(onload_device=torch.device("cuda"), offload_type="block_level",
                                              num_blocks_per_group=1)
    with apply_dare(pipe, capture_maps=True) as h:
        h.set_token_weights(r["w"], only_cond=True)
        with dare_guidance(pipe, negative_prompt_embeds=r["ne"], guidance_scale=4.0, rectify_scale=1.0):
            weighted = _run(pipe, r["pe"].cuda(), guidance_scale=1.0)
    assert_close_to_scale(weighted.cpu(), r["weighted"], rel=1e-3)
