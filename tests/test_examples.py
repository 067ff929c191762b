"""examples/ uses the released API and runs without warnings of its own making.

The training example patches Wan through ``apply_dare`` (no stand-in processor), its maps come from the
handle, and its FSDP2 set-up (a one-rank gloo group here) prints no UserWarning about a returned view.
tests/test_ddp.py runs the example's DDP step against the single-process one.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def example():
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    import train_dare_tiny_wan
    return train_dare_tiny_wan


def test_examples_speak_of_no_stand_in():
    for f in EXAMPLES.iterdir():
        text = f.read_text()
        for words in ("once that lands", "TEMPORARY", "TemporarySRA", "stand-in processor"):
            assert words not in text, (f.name, words)


def test_example_patches_every_cross_attention_with_apply_dare(example):
    from dare_kernels.integrations.diffusers import DAREHandle

    cfg = example.TinyConfig()
    comp = example.build_components(cfg)
    assert isinstance(comp.handle, DAREHandle) and comp.handle.capture_maps
    assert comp.handle.layers == [f"blocks.{i}.attn2" for i in range(cfg.layers)]
    batch = example.make_batch(comp, 0, 2)
    out = example.training_step(comp, comp.transformer, batch, 0, 2)
    maps = list(comp.handle.maps.values())
    assert len(maps) == cfg.layers and all(m.shape == (2, 48, cfg.max_length) for m in maps)
    assert all(m.requires_grad for m in maps) and float(out["consistency"]) > 0


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_fsdp2_step_prints_no_view_warning(example, tmp_path, monkeypatch):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        cfg = example.TinyConfig()
        comp = example.build_components(cfg)
        for block in comp.transformer.blocks:
            fully_shard(block)
        model = example.FSDPRoot(comp.transformer)
        fully_shard(model)
        batch = example.make_batch(comp, 0, 2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = example.training_step(comp, model, batch, 0, 2)
            out["loss"].backward()
        assert torch.isfinite(out["loss"])
        assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
    finally:
        dist.destroy_process_group()
