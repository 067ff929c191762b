"""rectified_cfg on CPU: the run-time vector paths (AVX-512 bf16 combine vs the AVX2 / at::vec path) give
bit-identical results, including tails, several chunks, momentum and special values; the
DARE_KERNELS_CPU_ISA switch; the cheaper out= overlap check of the Python fast path."""

from __future__ import annotations

import pytest
import torch

import dare_kernels as dk
from dare_kernels import backends

from conftest import tol

pytestmark = pytest.mark.skipif(backends.unsupported_reason("rectified_cfg", "cpu", "cpu", torch.float32) is not None,
                                reason="compiled extension not loaded")

ENV = "DARE_KERNELS_CPU_ISA"


def _isa() -> str:
    return torch.ops.dare_kernels.rectified_cfg_cpu_isa()


@pytest.fixture
def avx512(monkeypatch):
    """Skips unless this CPU runs the AVX-512 kernels; leaves the switch on auto."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    if _isa() != "avx512":
        pytest.skip("this CPU (or OS) lacks AVX-512 F/BW/VL/DQ/BF16: only the AVX2 / generic path runs here")
    return monkeypatch


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t.view(torch.int32)


def _run_both(monkeypatch, fn):
    """fn() under DARE_KERNELS_CPU_ISA=avx512 and =avx2 (monkeypatch reloads the switch table, conftest.py)."""
    monkeypatch.setenv(ENV, "avx512")
    fast = fn()
    monkeypatch.setenv(ENV, "avx2")
    ref = fn()
    return fast, ref


def _assert_same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    diff = (_bits(a) != _bits(b)).nonzero()
    if diff.numel():
        i = tuple(diff[0].tolist())
        raise AssertionError(f"{diff.shape[0]} elements differ, first at {i}: {a[i].item()} vs {b[i].item()}")


def test_isa_switch_and_bad_value(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    auto = _isa()
    assert auto in ("avx512", "avx2", "default")
    monkeypatch.setenv(ENV, "avx2")
    assert _isa() in ("avx2", "default")  # the build's at::vec path
    monkeypatch.setenv(ENV, "auto")
    assert _isa() == auto
    monkeypatch.setenv(ENV, "sse9")
    with pytest.raises(RuntimeError, match="DARE_KERNELS_CPU_ISA must be auto, avx2 or avx512"):
        _isa()
    x = torch.randn(2, 3, 40).bfloat16()
    with pytest.raises(RuntimeError, match="DARE_KERNELS_CPU_ISA"):
        dk.rectified_cfg(x, 5.0, guidance_rescale=0.5, backend="cpu")


# N per sample: one partial block, an exact block, a ragged tail after full blocks, several 4096-element
# chunks with a ragged last chunk, and the 49-frame latent's own N / 16 (an exact multiple of 32)
SIZES = [(1, 7), (2, 32), (2, 3, 45), (1, 3, 2749), (2, 4, 13, 60, 90 // 8)]


@pytest.mark.parametrize("shape", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("K", [2, 3])
def test_avx512_bf16_bit_identical_to_avx2(avx512, shape, K):
    g = torch.Generator().manual_seed(len(shape) * 10 + K)
    preds = torch.randn((K * shape[0],) + shape[1:], generator=g).bfloat16()
    for mode, kw in (("cfg", {}), ("cfg_zero_star", {}), ("apg", {"eta": 0.3, "norm_threshold": 4.0})):
        kw = dict(num_branches=K, mode=mode, guidance_rescale=0.7, rectify_scale=1.5 if K == 3 else 0.0, **kw)
        fast, ref = _run_both(avx512, lambda: dk.rectified_cfg(preds, 5.0, backend="cpu", **kw))
        _assert_same_bits(fast, ref)


def test_avx512_bf16_momentum_and_thread_counts(avx512):
    g = torch.Generator().manual_seed(3)
    preds = torch.randn(3 * 2, 5, 999, generator=g).bfloat16()  # K = 3, N = 4995: two chunks, ragged tail
    buf0 = torch.randn(2, 5, 999, generator=g).bfloat16()
    kw = dict(num_branches=3, mode="apg", momentum=0.6, eta=0.0, norm_threshold=6.0, guidance_rescale=0.5,
              rectify_scale=-0.5)

    def step():
        buf = buf0.clone()
        out = dk.rectified_cfg(preds, 4.0, momentum_buffer=buf, backend="cpu", **kw)
        return out, buf

    (o_fast, b_fast), (o_ref, b_ref) = _run_both(avx512, step)
    _assert_same_bits(o_fast, o_ref)
    _assert_same_bits(b_fast, b_ref)  # the updated buffer (written by the same kernel)
    avx512.setenv(ENV, "avx512")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        o_one, b_one = step()
        torch.set_num_threads(max(2, threads))
        o_many, b_many = step()
    finally:
        torch.set_num_threads(threads)
    _assert_same_bits(o_one, o_many)
    _assert_same_bits(b_one, b_many)


def test_avx512_combine_rounding_special_values(avx512):
    """The combine op with fixed γ: blocks holding NaN (any payload), infinities, subnormal results and
    rounding ties take the exact integer rounding; equal bits to the AVX2 path, values to PyTorch's."""
    n = 200
    bits = torch.randint(-(2 ** 15), 2 ** 15, (n,), generator=torch.Generator().manual_seed(7), dtype=torch.int32)
    u = bits.to(torch.int16).view(torch.bfloat16).clone()
    u[u.float().isnan()] = 1.0
    special = torch.tensor([0x7FC1, 0xFFC3, 0x7F81, 0x7F80, 0xFF80, 0x0001, 0x8003, 0x0080, 0x7F7F, 0xFF7F],
                           dtype=torch.int32).to(torch.int16).view(torch.bfloat16)  # NaNs, ±inf, subnormal, max
    u[3:3 + len(special)] = special
    u[100:110] = torch.linspace(1e-37, 3e-37, 10).bfloat16()  # γ_u = 0.01: subnormal fp32 products
    c = torch.randn(n, generator=torch.Generator().manual_seed(8)).bfloat16()
    u, c = u.view(1, n), c.view(1, n)
    combine = torch.ops.dare_kernels.rectified_cfg_combine.default
    for coeffs in ([0.01, 0.0, 0.0, 0.0], [1 / 3, 0.7, 0.0, 0.0], [3.0, -2.0, 0.0, 0.0], [1.0 + 2 ** -9, 0.0, 0.0, 0.0]):
        gam = torch.tensor([coeffs], dtype=torch.float32)
        fast, ref = _run_both(avx512, lambda: combine(u, c, None, None, gam, 1))
        _assert_same_bits(fast, ref)
        if coeffs[1] == 0.0:  # r = u γu + 0·c: PyTorch's float32 product rounded to bf16
            prod = u.float() * gam[0, 0]
            want = prod.to(torch.bfloat16)
            nan = prod.isnan()
            assert torch.equal(fast.float().isnan(), nan)
            assert torch.equal(fast[~nan], want[~nan])
            assert (fast[u.float().isnan()].view(torch.int16) == 0x7FC0).all()  # c10::BFloat16's NaN


def test_avx512_outputs_match_float64_reference(avx512):
    from dare_kernels.reference import rectified_cfg_ref

    preds = torch.randn(2, 4, 7, 61).bfloat16()
    kw = dict(mode="cfg_zero_star", guidance_rescale=0.7)
    got = dk.rectified_cfg(preds, 6.0, backend="cpu", **kw)
    want = rectified_cfg_ref(preds.double(), 6.0, **kw)
    atol, rtol = tol(torch.bfloat16)["atol"], tol(torch.bfloat16)["rtol"]
    torch.testing.assert_close(got.double(), want, atol=atol * max(1.0, want.abs().max().item()) * 1.5, rtol=rtol * 1.5)


def test_out_overlap_check_is_exact_for_strided_preds():
    """The fast path skips per-branch checks only when out misses preds' whole memory span; an out that
    lies between two strided branches is still accepted, one that aliases a branch is still rejected."""
    big = torch.randn(4, 3, 8, dtype=torch.float32)
    preds = big[::2]          # branches: rows 0 and 2
    out = big[1:2]            # row 1: inside preds' span, shares no element with a branch
    want = dk.rectified_cfg(preds.clone(), 4.0, guidance_rescale=0.5, backend="cpu")
    got = dk.rectified_cfg(preds, 4.0, guidance_rescale=0.5, out=out, backend="cpu")
    assert got is out
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="share memory"):
        dk.rectified_cfg(preds, 4.0, out=big[2:3], backend="cpu")
    u, c = torch.randn(2, 1, 3, 8).unbind(0)
    with pytest.raises(ValueError, match="share memory"):
        dk.rectified_cfg([u, c], 4.0, out=c, backend="cpu")
