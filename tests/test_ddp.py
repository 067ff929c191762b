"""DDP (gloo, 2 CPU processes via torch.multiprocessing spawn) equals the single-process run on the same global batch.

The training step is the example's (examples/train_dare_tiny_wan.py): tiny Wan, DARE suppression and
prompt dropout drawn for the global batch, SRA cross-attention maps, consistency loss.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.fixture(scope="module")
def example():
    # a plain import (examples/ on sys.path) so that spawned workers can unpickle its functions
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    import train_dare_tiny_wan
    return train_dare_tiny_wan


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_matches_single_process(example, tmp_path):
    import torch.multiprocessing as mp

    # suppression and dropout are active at this step (past warm-up), so their sharded draws are exercised
    cfg = example.TinyConfig(p_max=0.6, tau=0.8, cfg_dropout=0.5, warmup_steps=2)
    step, gbs, world = 3, 4, 2
    ctx = mp.start_processes(example.ddp_step_worker,
                             args=(world, str(tmp_path / "init"), str(tmp_path), asdict(cfg), step, gbs),
                             nprocs=world, join=False, start_method="spawn")

    # meanwhile: the single-process step on the whole global batch
    comp = example.build_components(cfg)
    batch = example.make_batch(comp, step, gbs)
    ref = example.training_step(comp, comp.transformer, batch, step, gbs)
    ref["loss"].backward()
    ref_grads = {n: p.grad for n, p in comp.transformer.named_parameters()}

    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):          # raises if a worker failed
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("DDP workers did not finish within 300 s")
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    # the step really suppressed tokens and dropped a prompt, identically to the single-process draw
    for key in ("suppressed_tokens", "tokens", "dropped_prompts"):
        assert sum(int(r["out"][key]) for r in res) == int(ref[key]), key
    assert int(ref["suppressed_tokens"]) > 0 and 0 < int(ref["dropped_prompts"]) < gbs
    # local losses are means over equal local batches: their average is the global loss
    for key in ("loss", "diffusion", "consistency"):
        got = sum(r["out"][key] for r in res) / world
        torch.testing.assert_close(got, ref[key].detach(), atol=1e-6, rtol=1e-5, msg=key)
    assert float(ref["consistency"]) > 0
    # DDP's averaged gradients equal the single-process gradients of the global mean
    assert set(res[0]["grads"]) == set(ref_grads)
    for name, g in ref_grads.items():
        assert g is not None and res[0]["grads"][name] is not None, name
        torch.testing.assert_close(res[0]["grads"][name], g, atol=1e-6, rtol=1e-4, msg=name)
        torch.testing.assert_close(res[1]["grads"][name], res[0]["grads"][name], atol=0, rtol=0, msg=name)


def test_example_trains_and_logs_both_losses(example):
    lines = []
    hist = example.train(example.TinyConfig(warmup_steps=1), steps=3, global_batch_size=2, log=lines.append)
    assert len(hist) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert all(h["consistency"] > 0 and h["diffusion"] > 0 for h in hist)
    assert all("diffusion" in line and "sra_consistency" in line for line in lines)
    assert hist[-1]["p_max"] == pytest.approx(0.3)
    # the SRA processors ran on every cross-attention layer and collected maps [B, N, M]
    cfg = example.TinyConfig()
    comp = example.build_components(cfg)
    example.training_step(comp, comp.transformer, example.make_batch(comp, 0, 2), 0, 2)
    N = cfg.frames * (cfg.height // 2) * (cfg.width // 2)
    maps = list(comp.handle.maps.values())
    assert len(maps) == cfg.layers
    assert all(m.shape == (2, N, cfg.max_length) and m.dtype == torch.float32 for m in maps)


def test_example_sra_equals_wan_attention_with_unit_weights(example):
    """With all-ones weights (γ·log 1 = 0) the example's SRA layers (apply_dare, kernel path forced)
    reproduce Wan's own attention; the density weights change the output."""
    cfg = example.TinyConfig()
    comp = example.build_components(cfg)
    batch = example.make_batch(comp, 0, 2)
    comp.handle.fast_path = False  # run sra_attention even for all-ones weights
    with torch.no_grad():
        embeds = comp.text_encoder(batch.input_ids, batch.mask)
        x = batch.latents
        t = batch.sigma * 1000
        comp.handle.set_token_weights(torch.ones(2, cfg.max_length))
        sra = comp.transformer(x, t, encoder_hidden_states=embeds, return_dict=False)[0]
        assert len(comp.handle.maps) == cfg.layers
        comp.handle.set_token_weights(comp.density.weights(batch.input_ids, 0.1, key_padding_mask=batch.mask))
        weighted = comp.transformer(x, t, encoder_hidden_states=embeds, return_dict=False)[0]
        comp.handle.remove()  # Wan's stock processors back
        plain = comp.transformer(x, t, encoder_hidden_states=embeds, return_dict=False)[0]
    torch.testing.assert_close(sra, plain, atol=2e-5, rtol=2e-5)
    assert (weighted - plain).abs().max() > 1e-3
