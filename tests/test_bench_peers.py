"""The benchmark peers compute what they claim (against the float64 reference), so a speed-up
against them compares like with like."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import rand, tol
from dare_kernels.benchmarking import peers
from dare_kernels.reference import sra_attention_ref

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # harness.py


def _inputs(B=2, H=3, N=37, M=77, D=40, dtype=torch.float32):
    q, k, v = rand(B, H, N, D, dtype=dtype), rand(B, H, M, D, dtype=dtype), rand(B, H, M, D, dtype=dtype)
    w = torch.rand(B, M, dtype=torch.float64) + 0.05
    w[0, 3] = 0.0  # a dropped key: bias -inf
    return q, k, v, w


@pytest.mark.parametrize("strength", [0.0, 1.0, 2.5])
def test_sdpa_with_bias_and_eager_maps_match_reference(strength):
    q, k, v, w = _inputs()
    o_ref, map_ref = sra_attention_ref(q.double(), k.double(), v.double(), w, strength=strength,
                                       return_attn_map=True)
    bias = peers.sra_bias(w.float(), strength, torch.float32)
    assert bias.shape == (2, 1, 1, 77) and bias[0, 0, 0, 3] == float("-inf")
    torch.testing.assert_close(peers.sdpa_with_bias(q, k, v, bias).double(), o_ref, **tol(torch.float32))
    o, amap = peers.eager_with_maps(q, k, v, bias)
    torch.testing.assert_close(o.double(), o_ref, **tol(torch.float32))
    torch.testing.assert_close(amap.double(), map_ref, **tol(torch.float32))
    assert amap.dtype == torch.float32 and amap.shape == (2, 37, 77)


@pytest.mark.parametrize("wshape", ["m", "bm", "bhm", None])
def test_bias_with_mask_and_per_head_weights_matches_reference(wshape):
    # the additive mask SDPA / eager / Flex get: γ·log w per key (per head for [B, H, M]), -inf where masked
    q, k, v, w = _inputs()
    w = {"m": w[0], "bm": w, "bhm": torch.rand(2, 3, 77, dtype=torch.float64) + 0.05, None: None}[wshape]
    mask = torch.rand(2, 77) > 0.3
    mask[:, 0] = True
    o_ref, map_ref = sra_attention_ref(q.double(), k.double(), v.double(), w, key_padding_mask=mask,
                                       strength=0.7, return_attn_map=True)
    bias = peers.sra_bias(None if w is None else w.float(), 0.7, torch.float32, key_padding_mask=mask)
    assert bias.shape == ((2, 3, 1, 77) if wshape == "bhm" else (2, 1, 1, 77))
    assert torch.isneginf(bias[~mask[:, None, None, :].expand_as(bias)]).all()
    torch.testing.assert_close(peers.sdpa_with_bias(q, k, v, bias).double(), o_ref, **tol(torch.float32))
    for upcast in (False, True):
        o, amap = peers.eager_with_maps(q, k, v, bias, upcast=upcast)
        torch.testing.assert_close(o.double(), o_ref, **tol(torch.float32))
        torch.testing.assert_close(amap.double(), map_ref, **tol(torch.float32))


def test_eager_maps_key_range_and_plain_sdpa():
    q, k, v, w = _inputs(M=100)
    _, map_ref = sra_attention_ref(q.double(), k.double(), v.double(), w, return_attn_map=True,
                                   attn_map_keys=(60, 100))
    _, amap = peers.eager_with_maps(q, k, v, peers.sra_bias(w.float(), 1.0), map_keys=(60, 100))
    torch.testing.assert_close(amap.double(), map_ref, **tol(torch.float32))
    o_plain = sra_attention_ref(q.double(), k.double(), v.double(), None)
    torch.testing.assert_close(peers.sdpa(q, k, v).double(), o_plain, **tol(torch.float32))


def test_unavailable_reasons():
    assert peers.unavailable("sdpa", "cpu") is None
    if not torch.cuda.is_available():
        assert peers.unavailable("sdpa", "cuda") == "needs a CUDA device"
    assert peers.unavailable("flash_attn", "cpu") in ("flash_attn not installed", "flash_attn runs on CUDA only")


def test_guider_eager_matches_cfg_formula():
    pytest.importorskip("diffusers")
    c, u = rand(1, 4, 2, 6, 5), rand(1, 4, 2, 6, 5)
    torch.testing.assert_close(peers.guider_eager("cfg", c, u, guidance_scale=5.0), u + 5.0 * (c - u))
    out = peers.guider_eager("rescale", c, u, guidance_scale=5.0, guidance_rescale=0.7)
    cfg = u + 5.0 * (c - u)
    dims = list(range(1, c.dim()))
    rescaled = cfg * (c.std(dim=dims, keepdim=True) / cfg.std(dim=dims, keepdim=True))
    torch.testing.assert_close(out, 0.7 * rescaled + 0.3 * cfg)
    with pytest.raises(ValueError, match="mode must be one of"):
        peers.make_guider("nope")


@pytest.mark.slow
def test_flex_with_bias_matches_reference():
    q, k, v, w = _inputs(N=64)
    o_ref = sra_attention_ref(q.double(), k.double(), v.double(), w, strength=1.0)
    o = peers.flex_with_bias(q, k, v, peers.sra_bias(w.float(), 1.0))
    torch.testing.assert_close(o.double(), o_ref, atol=1e-4, rtol=1e-4)


def test_cpu_peak_memory_sees_eager_intermediates():
    import harness

    q, k, v, w = _inputs(N=512, M=77, D=40)
    bias = peers.sra_bias(w.float(), 1.0)
    probs_bytes = 2 * 3 * 512 * 77 * 4  # one [B, H, N, M] float32 tensor
    eager = harness.peak_memory(lambda: peers.eager_with_maps(q, k, v, bias))
    fused = harness.peak_memory(lambda: peers.sdpa_with_bias(q, k, v, bias))
    assert eager >= 2 * probs_bytes  # logits and probabilities alive together
    assert fused < probs_bytes  # SDPA's flash kernel never materialises them (output: 2*3*512*40*4 bytes)
    assert fused >= 2 * 3 * 512 * 40 * 4
