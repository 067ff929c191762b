"""The bf16 block products of the CPU SRA forward and backward (AVX512-BF16 vdpbf16ps, csrc/cpu/sra_bf16_dot.*).

DARE_KERNELS_CPU_BF16_DOT selects them: "0" the fp32 products, "qk" S = Q·K^T in bf16, "1" S and P·V in
bf16 (the default "auto" is "1" where the CPU has AVX512-BF16); in "qk" and "1" the backward computes S and
dP = dO·V^T in bf16 too. Every mode is compared against the float64
reference (of the bf16-rounded inputs) at the bf16 tolerance of conftest.py on odd shapes: head dims
40/41/80/160, key lengths 1/77/226/1000 and online softmax (M > 1024), masks, strided / BSHD layouts, map
key sub-ranges starting at odd keys. On a CPU without AVX512-BF16 the forced modes are skipped.
"""

from __future__ import annotations

import os

import pytest
import torch

from dare_kernels import _ext, sra_attention

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import switch_env
from test_sra_cpu import case_inputs, check_all, close, make_qkv, make_weight, run_both, sra_problem

pytestmark = pytest.mark.skipif(not _ext.has_cpu_kernels(), reason="CPU kernels not built")

ENV = "DARE_KERNELS_CPU_BF16_DOT"
GEMM_ENV = "DARE_KERNELS_CPU_GEMM"


@pytest.fixture(autouse=True)
def _own_products(monkeypatch):
    """These tests are about our own products: on a CPU with AMX tiles "auto" takes cpublas::brgemm instead
    (test_sra_cpu_brgemm.py), so they pin DARE_KERNELS_CPU_GEMM=native."""
    monkeypatch.setenv(GEMM_ENV, "native")


def _bf16_dot_available() -> bool:
    """Ask the kernel itself: mode "1" fails with a clear error on a CPU without AVX512-BF16."""
    q = torch.randn(1, 1, 2, 4).bfloat16()
    with switch_env(GEMM_ENV, "native"), switch_env(ENV, "1"):
        try:
            sra_attention(q, q, q, backend="cpu")
            return True
        except RuntimeError as e:
            if "lacks AVX-512" in str(e):
                return False
            raise


HAVE_BF16_DOT = _ext.has_cpu_kernels() and _bf16_dot_available()
needs_bf16_dot = pytest.mark.skipif(not HAVE_BF16_DOT, reason="this CPU (or OS / compiler) lacks AVX512-BF16")
# a whole run under ATEN_CPU_CAPABILITY=default|avx2 or DARE_KERNELS_CPU_ISA=avx2 keeps "auto" (and "qk") on the
# fp32 products and rows by design: the tests that the paths really differ need the AVX-512 default
AVX512_BY_DEFAULT = (HAVE_BF16_DOT and os.environ.get("ATEN_CPU_CAPABILITY") not in ("default", "avx2")
                     and os.environ.get("DARE_KERNELS_CPU_ISA") != "avx2")
needs_avx512_default = pytest.mark.skipif(
    not AVX512_BY_DEFAULT, reason="AVX512-BF16 missing, or this run forces AVX2 (ATEN_CPU_CAPABILITY / DARE_KERNELS_CPU_ISA)")

MODES = [
    pytest.param("0", id="fp32-products"),
    pytest.param("qk", id="bf16-qk", marks=needs_bf16_dot),
    pytest.param("1", id="bf16-qk-pv", marks=needs_bf16_dot),
]

CASES = [
    # B, H, N, M, D, Dv, weight kind, mask, map keys, layout
    (2, 3, 37, 77, 40, 40, "bm", False, None, "bhsd"),
    (1, 2, 25, 226, 80, 80, "bhm", True, (11, 200), "bshd"),
    (2, 2, 9, 1, 160, 160, "m", False, None, "strided"),
    (1, 2, 33, 1000, 41, 33, None, True, (0, 1000), "strided"),  # odd D and Dv
    (1, 2, 21, 1100, 32, 24, "bm_strided", True, (1000, 1100), "bhsd"),  # online softmax
    (1, 1, 19, 2100, 160, 40, "bm", False, (3, 2051), "bshd"),  # online, map range from an odd key
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[3]}-D{c[4]}-Dv{c[5]}-{c[9]}")
def test_bf16_forward_matches_reference(monkeypatch, case, mode):
    # gradients on the small cases: the backward reuses the forward's O and LSE
    _check_case(monkeypatch, case, mode, seed=17, with_grad=case[3] <= 226)


def _check_case(monkeypatch, case, mode, seed, with_grad):
    """One CASES / BWD_CASES row in DARE_KERNELS_CPU_BF16_DOT=mode against the float64 reference."""
    q, k, v, w, mask, gen = case_inputs(case, torch.bfloat16, seed)
    monkeypatch.setenv(ENV, mode)
    res = run_both(q, k, v, w, mask, 0.8, case[8], with_grad=with_grad, gen=gen)
    check_all(res, torch.bfloat16)


@needs_bf16_dot
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sra_problem(), st.sampled_from(["qk", "1"]))
def test_hypothesis_bf16_products(problem, mode):
    """Random shapes (N 1..41, M 1..1030, D 8..160, Dv), layouts, weights, masks, map ranges; gradients for M <= 300."""
    B, H, N, M, D, Dv, layout, wkind, use_mask, keys, strength, seed = problem
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(B, H, N, M, D, Dv, torch.bfloat16, layout=layout, gen=gen)
    w = make_weight(wkind, B, H, M, torch.bfloat16, gen=gen)
    mask = (torch.rand(B, M, generator=gen) > 0.3) if use_mask else None
    with switch_env(ENV, mode):
        # gradients too where M is small (the backward's bf16 S and dP on random layouts and odd sizes)
        res = run_both(q, k, v, w, mask, strength, keys, with_grad=M <= 300, gen=gen)
    check_all(res, torch.bfloat16)


BWD_CASES = [
    # B, H, N, M, D, Dv, weight kind, mask, map keys, layout: Q / dO rows read in place (bhsd, bshd) or
    # copied (odd D / Dv, strided), exact and online softmax (M > 1024, map range from an odd key)
    (2, 3, 37, 77, 40, 40, "bm", False, None, "bhsd"),
    (1, 2, 25, 226, 80, 80, "bhm", True, (11, 200), "bshd"),
    (1, 2, 33, 300, 41, 33, None, True, (0, 300), "strided"),
    (2, 2, 9, 1, 160, 160, "m", False, None, "bshd"),
    (1, 2, 21, 1100, 32, 24, "bm_strided", True, (1001, 1100), "bhsd"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", BWD_CASES, ids=lambda c: f"M{c[3]}-D{c[4]}-Dv{c[5]}-{c[9]}")
def test_bf16_backward_matches_reference(monkeypatch, case, mode):
    """The backward's S and dP = dO·V^T take the bf16 products in modes "qk" and "1" (dV, dK, dQ stay fp32):
    gradients of q, k, v and the weights (through the output, the map and the LSE) against float64."""
    _check_case(monkeypatch, case, mode, seed=19, with_grad=True)


@needs_avx512_default
def test_bf16_backward_really_switches(monkeypatch):
    """The backward's bf16 products are a different computation from its fp32 ones (else the test above
    would check one path twice), and the two stay within the bf16 tolerance of each other."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(2, 2, 64, 77, 40, 40, torch.bfloat16, gen=gen)
    w = make_weight("bm", 2, 2, 77, torch.bfloat16, gen=gen)
    go = torch.randn(2, 2, 64, 40, generator=gen, dtype=torch.float64).bfloat16()
    grads = {}
    for mode in ("0", "1"):
        monkeypatch.setenv(ENV, mode)
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        # the forward in fp32 products for both: only the backward's switch differs
        monkeypatch.setenv(ENV, "0")
        o = sra_attention(*leaves, w, backend="cpu")
        monkeypatch.setenv(ENV, mode)
        o.backward(go)
        grads[mode] = [t.grad for t in leaves]
    assert not torch.equal(grads["0"][0], grads["1"][0]), "bf16 S / dP left dq bitwise unchanged"
    for a, b, name in zip(grads["1"], grads["0"], ("dq", "dk", "dv")):
        close(a, b.double(), torch.bfloat16, f"1 vs 0: {name}")


@needs_avx512_default
@pytest.mark.parametrize("M", [77, 1100])
def test_bf16_modes_really_switch(monkeypatch, M):
    """The three modes are different computations (else the comparisons above would test one path):
    bf16 S changes the LSE / map bits, bf16 P·V changes the output bits; all stay within tolerance of
    each other."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(2, 2, 64, M, 40, 40, torch.bfloat16, gen=gen)
    w = make_weight("bm", 2, 2, M, torch.bfloat16, gen=gen)
    out = {}
    for mode in ("0", "qk", "1"):
        monkeypatch.setenv(ENV, mode)
        out[mode] = sra_attention(q, k, v, w, return_attn_map=True, return_lse=True, backend="cpu")
    assert not torch.equal(out["0"][2], out["qk"][2]), "bf16 Q·K^T left the LSE bitwise unchanged"
    assert not torch.equal(out["qk"][0], out["1"][0]), "bf16 P·V left the output bitwise unchanged"
    assert torch.equal(out["qk"][1], out["1"][1]) and torch.equal(out["qk"][2], out["1"][2]), \
        "the map and LSE come from the fp32 P: P·V in bf16 must not change them"
    for mode in ("qk", "1"):
        for a, b, name in zip(out[mode], out["0"], ("o", "map", "lse")):
            close(a, b.double(), torch.bfloat16, f"{mode} vs 0: {name}")


@needs_bf16_dot
def test_bf16_dot_fully_masked_rows_and_huge_logits(monkeypatch):
    """Rows without a valid key give zeros and an LSE of -inf; logits of ~±1e4 stay finite."""
    monkeypatch.setenv(ENV, "1")
    B, H, N, M, D = 2, 3, 11, 77, 40
    q, k, v = make_qkv(B, H, N, M, D, D, torch.bfloat16)
    w = (torch.rand(B, H, M, dtype=torch.float64) + 0.1).bfloat16()
    w[0, 1] = 0.0
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[1] = False
    o, amap, lse = sra_attention(q * 30, k * 30, v, w, key_padding_mask=mask, return_attn_map=True,
                                 return_lse=True, backend="cpu")
    assert torch.all(o[0, 1] == 0) and torch.all(o[1] == 0) and torch.all(amap[1] == 0)
    assert torch.isneginf(lse[0, 1]).all() and torch.isneginf(lse[1]).all()
    assert torch.isfinite(lse[0, 0]).all() and torch.isfinite(o).all() and torch.isfinite(amap).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_other_dtypes_ignore_the_switch(monkeypatch, dtype):
    """Only bf16 inputs take the bf16 products: fp16 / fp32 results are bitwise the same in every mode."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = make_qkv(1, 2, 33, 77, 40, 40, dtype, gen=gen)
    monkeypatch.setenv(ENV, "0")
    a = sra_attention(q, k, v, return_attn_map=True, backend="cpu")
    monkeypatch.setenv(ENV, "auto")
    b = sra_attention(q, k, v, return_attn_map=True, backend="cpu")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_switch_value_is_rejected(monkeypatch):
    monkeypatch.setenv(ENV, "yes")
    q = torch.randn(1, 1, 2, 4).bfloat16()
    with pytest.raises(RuntimeError, match="DARE_KERNELS_CPU_BF16_DOT must be auto, 0, 1 or qk"):
        sra_attention(q, q, q, backend="cpu")



@needs_avx512_default
@pytest.mark.parametrize("var,value", [("DARE_KERNELS_CPU_ISA", "avx2"), ("ATEN_CPU_CAPABILITY", "avx2")])
def test_isa_switches_turn_the_bf16_products_off(monkeypatch, var, value):
    """DARE_KERNELS_CPU_ISA=avx2 (and, for "auto", ATEN_CPU_CAPABILITY=avx2|default) give the fp32 products
    and the at::vec rows: bitwise the result of DARE_KERNELS_CPU_BF16_DOT=0 with the at::vec rows."""
    gen = torch.Generator().manual_seed(8)
    q, k, v = make_qkv(1, 2, 40, 77, 40, 40, torch.bfloat16, gen=gen)
    monkeypatch.setenv(ENV, "0")
    monkeypatch.setenv("DARE_KERNELS_CPU_ISA", "avx2")
    off = sra_attention(q, k, v, return_attn_map=True, return_lse=True, backend="cpu")
    monkeypatch.delenv("DARE_KERNELS_CPU_ISA")
    monkeypatch.setenv(ENV, "auto")
    on = sra_attention(q, k, v, return_attn_map=True, return_lse=True, backend="cpu")
    assert not torch.equal(on[2], off[2])
    monkeypatch.setenv(var, value)
    switched = sra_attention(q, k, v, return_attn_map=True, return_lse=True, backend="cpu")
    for a, b in zip(switched, off):
        assert torch.equal(a, b)
