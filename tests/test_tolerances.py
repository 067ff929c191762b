"""The catalog's checks can fail where it matters: guards at model-like key lengths and map magnitudes.

At Wan (M = 512), LTX-Video (M = 128) and CogVideoX joint attention (M = 17776, map over its 226 text keys:
entries about 5e-5) with a few queries, an all-zero map and a map computed without the bias (strength 0)
must fail the map check in every dtype, while the map a kernel computes passes. The old absolute bf16
tolerance (2e-2, unscaled) accepted the map without the bias at all three shapes, and the all-zero map at
Wan and CogVideoX (at LTX's M = 128 the largest entries, about 0.03, exceed it).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from dare_kernels import _ext, sra_attention
from dare_kernels.benchmarking.shapes import ATTN_SHAPES
from dare_kernels.benchmarking.tolerances import TOL, compare, family_scale, tolerance
from dare_kernels.reference import sra_attention_ref

# real keys and heads (the head average sets the map magnitude), 8 queries; CogVideoX at 8 of its 48 heads
GUARD_SHAPES = [ATTN_SHAPES["wan-1.3b"].cut(N=8), ATTN_SHAPES["ltx-video"].cut(N=8),
                ATTN_SHAPES["cogvideox-5b"].cut(N=8, H=8)]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _inputs(shape, dtype, seed=0):
    """q, k, v in ``dtype`` (diffusers' layout), weights in [0.1, 2] (video keys of joint attention 1, one
    dropped key), trailing text padding masked."""
    g = torch.Generator().manual_seed(seed)
    B, H, N, M, D = shape.B, shape.H, shape.N, shape.M, shape.D

    def rnd(L):
        return torch.randn(B, L, H, D, generator=g).to(dtype).transpose(1, 2)

    q, k, v = rnd(N), rnd(M), rnd(M)
    w = torch.rand(B, M, generator=g) * 1.9 + 0.1
    if shape.map_keys is not None:
        w[:, : shape.map_keys[0]] = 1.0
    w[:, -1] = 0.0
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[:, M - max(1, (M - (shape.map_keys or (0,))[0]) // 10):] = False
    return q, k, v, w, mask


@functools.lru_cache(maxsize=None)
def _maps(shape, dtype):
    """(reference map float64, the map a kernel computes, the map without the bias)."""
    q, k, v, w, mask = _inputs(shape, dtype)
    kw = dict(key_padding_mask=mask, return_attn_map=True, attn_map_keys=shape.map_keys)
    args = [t.double() for t in (q, k, v)]
    _, ref = sra_attention_ref(*args, w.double(), strength=1.0, **kw)
    _, no_bias = sra_attention_ref(*args, w.double(), strength=0.0, **kw)
    backend = "cpu" if _ext.has_cpu_kernels() else "reference"
    _, got = sra_attention(q, k, v, w, strength=1.0, backend=backend, **kw)
    return ref, got, no_bias


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GUARD_SHAPES, ids=[s.name for s in GUARD_SHAPES])
def test_map_check_fails_zero_and_unbiased_maps(shape, dtype):
    ref, got, no_bias = _maps(shape, dtype)
    top = float(ref.abs().max())
    assert top < 0.2, f"the guard wants small map entries (model-like magnitudes), got max {top:.1e}"
    right = compare(got, ref, dtype, "map")
    assert right.ok, f"the kernel's map must pass: {right}"
    zero = compare(torch.zeros_like(ref), ref, dtype, "map")
    assert not zero.ok and zero.frob_rel == pytest.approx(1.0), f"an all-zero map must fail: {zero}"
    unbiased = compare(no_bias, ref, dtype, "map")
    assert not unbiased.ok, f"a map computed without the bias must fail: {unbiased}"
    assert unbiased.frob_rel > 5 * tolerance("map", dtype).frob


@pytest.mark.parametrize("shape", GUARD_SHAPES, ids=[s.name for s in GUARD_SHAPES])
def test_the_old_absolute_bf16_check_accepted_the_wrong_maps(shape):
    # why the map check changed: |got - ref| <= 2e-2 + 2e-2 |ref| held for the wrong maps
    ref, _, no_bias = _maps(shape, torch.bfloat16)
    atol, rtol = TOL[torch.bfloat16]
    assert torch.allclose(no_bias, ref, atol=atol, rtol=rtol)
    if shape.name != "ltx-video":
        assert torch.allclose(torch.zeros_like(ref), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_output_check_fails_zero_and_unbiased_outputs(dtype):
    shape = GUARD_SHAPES[0]
    q, k, v, w, mask = _inputs(shape, dtype)
    args = [t.double() for t in (q, k, v)]
    ref = sra_attention_ref(*args, w.double(), key_padding_mask=mask)
    no_bias = sra_attention_ref(*args, w.double(), key_padding_mask=mask, strength=0.0)
    got = sra_attention(q, k, v, w, key_padding_mask=mask, backend="cpu" if _ext.has_cpu_kernels() else "reference")
    assert compare(got, ref, dtype, "out").ok
    assert not compare(torch.zeros_like(ref), ref, dtype, "out").ok
    assert not compare(no_bias, ref, dtype, "out").ok


def test_compare_handles_infinities_shapes_and_exact_zeros():
    lse = torch.tensor([1.0, float("-inf"), 3.0], dtype=torch.float64)
    assert compare(lse.float(), lse, torch.float32, "lse").ok
    assert not compare(torch.tensor([1.0, 0.0, 3.0]), lse, torch.float32, "lse").ok  # -inf row lost
    assert not compare(torch.tensor([1.0, float("inf"), 3.0]), lse, torch.float32, "lse").ok
    assert not compare(torch.zeros(2), torch.zeros(3), torch.float32, "map").ok
    empty_map = torch.zeros(2, 3, dtype=torch.float64)
    assert compare(torch.zeros(2, 3), empty_map, torch.bfloat16, "map").ok  # rows with no key: exact zeros
    assert not compare(torch.full((2, 3), 1e-6), empty_map, torch.bfloat16, "map").ok
    one_off = torch.ones(1000)
    one_off[7] = 1.5  # one entry wrong: small in norm, caught elementwise
    v = compare(one_off, torch.ones(1000, dtype=torch.float64), torch.float32, "out")
    assert not v.ok and math.isclose(v.max_err, 0.5) and "elementwise" in str(v)
    with pytest.raises(ValueError, match="kind must be one of"):
        tolerance("maps", torch.float32)


# ---------------------------------------------------------------------------------------------
# a vanishing reference: one key (M = 1), where the true dq, dk, dw are exactly 0
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _one_key_grads(dtype):
    """The float64 reference gradients (dq, dk, dv, dw) of the selftest's bf16 M = 1 case (B2 H3 N300 D64)."""
    from dare_kernels.selftest import Case, chunked_reference, make_inputs

    case = Case("bf16 M=1 D=64", 2, 3, 300, 1, 64, dtype=dtype)
    inputs = make_inputs(case, "cpu")
    go = torch.randn(2, 3, 300, 64, generator=torch.Generator().manual_seed(1)).to(dtype).float()
    _, grads = chunked_reference(*inputs, strength=1.0, map_keys=None, want_map=False, go=go)
    return grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_key_gradients_pass_rounding_noise_and_fail_a_planted_gradient(dtype):
    dq, dk, dv, dw = _one_key_grads(dtype)
    for t in (dq, dk, dw):
        assert not bool(t.any()), "with one key the softmax is 1 whatever the scores: dq = dk = dw = 0 exactly"
    scale = family_scale(dq, dk, dv, dw)
    assert scale == float(dv.abs().max()) > 1.0  # dv = Σ_i dO_i carries the family's size
    g = torch.Generator().manual_seed(7)
    for ref in (dq, dk, dw):
        noise = ref + 1e-6 * torch.randn(ref.shape, generator=g, dtype=torch.float64)  # what the H100 returned
        assert compare(noise, ref, dtype, "grad", scale=scale).ok
        assert not compare(noise, ref, dtype, "grad").ok  # the old rule: relative to ‖0‖, infinite
        planted = torch.randn(ref.shape, generator=g, dtype=torch.float64)  # a gradient of the inputs' size
        bad = compare(planted, ref, dtype, "grad", scale=scale)
        assert not bad.ok and bad.ratio > 10, f"a planted gradient at a zero reference must fail: {bad}"
        assert not compare(ref + 1e-2 * scale, ref, dtype, "grad", scale=scale).ok  # 1 % of the family, everywhere
    # the family scale does not loosen a member of its family's order: dv off by 10 % fails as before
    assert not compare(dv * 1.1, dv, dtype, "grad", scale=scale).ok
    assert compare(dv.to(dtype).double(), dv, dtype, "grad", scale=scale).ok


def test_family_scale_skips_missing_and_non_finite_members():
    a = torch.tensor([1.0, -3.0, float("inf")], dtype=torch.float64)
    assert family_scale(None, a, torch.zeros(0)) == 3.0
    assert family_scale() == 0.0
    zero = torch.zeros(4, dtype=torch.float64)
    assert compare(zero, zero, torch.bfloat16, "grad", scale=0.0).ok  # exact zeros pass whatever the scale
    assert not compare(torch.full((4,), 1e-6), zero, torch.bfloat16, "grad", scale=0.0).ok  # no scale: no slack
