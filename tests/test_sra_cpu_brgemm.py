"""The bf16 / fp16 block products of the CPU SRA forward through PyTorch's cpublas::brgemm
(csrc/cpu/sra_brgemm16.*), selected by DARE_KERNELS_CPU_GEMM.

"auto" takes them, packed for the tiles, where cpublas::could_pack says the CPU packs for the dtype (AMX-BF16
for bf16, AMX-FP16 for fp16), else our own products ("native"); "brgemm" forces them: packed on such a CPU,
else on plain row-major panels (brgemm's reference fallback in PyTorch), so the panels, padding, scaling,
P rounding and the epilogues are checked on any CPU. Every path this CPU runs is compared against the
float64 reference of the rounded inputs at the dtype's tolerance on odd shapes (odd head dims, one key,
online softmax with M > 1024, masks, strided / BSHD layouts, map ranges starting at odd keys).
"""

from __future__ import annotations

import pytest
import torch

from dare_kernels import _ext, sra_attention

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import switch_env
from test_sra_cpu import case_inputs, check_all, close, make_qkv, make_weight, run_both, sra_problem

pytestmark = pytest.mark.skipif(not _ext.has_cpu_kernels() or not hasattr(_ext.EXT, "cpu_paths"),
                                reason="CPU kernels not built (or built before DARE_KERNELS_CPU_GEMM)")

ENV = "DARE_KERNELS_CPU_GEMM"
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
PATH_KEY = {torch.bfloat16: "cpu_path_bfloat16", torch.float16: "cpu_path_float16"}


def path_of(dtype, mode):
    with switch_env(ENV, mode):
        return _ext.cpu_paths()[PATH_KEY[dtype]]


def packs(dtype) -> bool:
    """The CPU packs for the tiles (cpublas::could_pack): "brgemm" then runs packed."""
    return "packed" in path_of(dtype, "brgemm")


CASES = [
    # B, H, N, M, D, Dv, weight kind, mask, map keys, layout
    (2, 3, 37, 77, 40, 40, "bm", False, None, "bhsd"),
    (1, 2, 25, 226, 80, 80, "bhm", True, (11, 200), "bshd"),
    (2, 2, 9, 1, 160, 160, "m", False, None, "strided"),  # one key: an odd P·V reduction padded to 2
    (1, 2, 33, 129, 41, 33, None, True, (0, 129), "strided"),  # odd D and Dv, panels with a tail
    (1, 2, 21, 1100, 32, 24, "bm_strided", True, (1000, 1100), "bhsd"),  # online softmax, a 76-key last block
    (1, 1, 19, 2100, 72, 136, "bm", False, (3, 2051), "bshd"),  # online, map range from an odd key
]



@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[3]}-D{c[4]}-Dv{c[5]}-{c[9]}")
def test_brgemm_forward_matches_reference(monkeypatch, case, dtype):
    """Forward (output, map, LSE) with the products through cpublas::brgemm; gradients where M is small
    (the backward reuses the forward's output and LSE)."""
    q, k, v, w, mask, gen = case_inputs(case, dtype, seed=23)
    M, keys = case[3], case[8]
    monkeypatch.setenv(ENV, "brgemm")
    assert "cpublas::brgemm (" in _ext.cpu_paths()[PATH_KEY[dtype]]
    res = run_both(q, k, v, w, mask, 0.8, keys, with_grad=M <= 226, gen=gen)
    check_all(res, dtype)


BWD_CASES = [
    # the backward's S and dP through brgemm: exact and online blocks, map ranges from odd keys (the
    # products then start inside a 64-column panel), odd head dims, strided / BSHD rows
    (1, 2, 25, 226, 80, 72, "bhm", True, (11, 200), "bshd"),
    (1, 2, 33, 300, 41, 33, None, True, (0, 300), "strided"),
    (1, 2, 21, 1100, 32, 24, "bm_strided", True, (1001, 1100), "bhsd"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", BWD_CASES, ids=lambda c: f"M{c[3]}-D{c[4]}-Dv{c[5]}-{c[9]}")
def test_brgemm_backward_matches_reference(monkeypatch, case, dtype):
    """Gradients of q, k, v and the weights (through the output, the map and the LSE) with S and dP through
    brgemm (dV, dK, dQ in fp32) against float64."""
    q, k, v, w, mask, gen = case_inputs(case, dtype, seed=29)
    keys = case[8]
    monkeypatch.setenv(ENV, "brgemm")
    check_all(run_both(q, k, v, w, mask, 0.8, keys, with_grad=True, gen=gen), dtype)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sra_problem(), st.sampled_from([torch.bfloat16, torch.float16]))
def test_hypothesis_brgemm_products(problem, dtype):
    """Random shapes (N 1..41, M 1..1030, D 8..160, Dv), layouts, weights, masks, map ranges."""
    B, H, N, M, D, Dv, layout, wkind, use_mask, keys, strength, seed = problem
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(B, H, N, M, D, Dv, dtype, layout=layout, gen=gen)
    w = make_weight(wkind, B, H, M, dtype, gen=gen)
    mask = (torch.rand(B, M, generator=gen) > 0.3) if use_mask else None
    with switch_env(ENV, "brgemm"):
        res = run_both(q, k, v, w, mask, strength, keys, with_grad=False, gen=gen)
    check_all(res, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [77, 1100])
def test_brgemm_really_switches(monkeypatch, dtype, M):
    """brgemm and native are different computations (else the test above would check the native path):
    the outputs differ in some bits (P rounded to the input dtype for P·V) and stay within tolerance."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(2, 2, 64, M, 40, 40, dtype, gen=gen)
    w = make_weight("bm", 2, 2, M, dtype, gen=gen)
    out = {}
    for mode in ("native", "brgemm"):
        monkeypatch.setenv(ENV, mode)
        out[mode] = sra_attention(q, k, v, w, return_attn_map=True, return_lse=True, backend="cpu")
    assert not all(torch.equal(a, b) for a, b in zip(out["native"], out["brgemm"])), \
        "DARE_KERNELS_CPU_GEMM=brgemm left every result bitwise unchanged"
    for a, b, name in zip(out["brgemm"], out["native"], ("o", "map", "lse")):
        close(a, b.double(), dtype, f"brgemm vs native: {name}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_auto_is_brgemm_where_the_cpu_packs_else_native(monkeypatch, dtype):
    """auto = the packed brgemm products on a CPU with the tiles for the dtype, our own products elsewhere
    (bitwise the chosen path)."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = make_qkv(1, 2, 40, 77, 40, 40, dtype, gen=gen)
    w = make_weight("m", 1, 2, 77, dtype, gen=gen)
    got = {}
    for mode in ("auto", "native", "brgemm"):
        monkeypatch.setenv(ENV, mode)
        got[mode] = sra_attention(q, k, v, w, return_attn_map=True, return_lse=True, backend="cpu")
    expect = got["brgemm"] if packs(dtype) else got["native"]
    assert all(torch.equal(a, b) for a, b in zip(got["auto"], expect))
    monkeypatch.setenv(ENV, "auto")
    assert ("cpublas::brgemm (" in _ext.cpu_paths()[PATH_KEY[dtype]]) == packs(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_brgemm_fully_masked_rows_and_huge_logits(monkeypatch, dtype):
    """Rows without a valid key give zeros and an LSE of -inf; logits of ~±1e3 stay finite."""
    monkeypatch.setenv(ENV, "brgemm")
    B, H, N, M, D = 2, 3, 11, 77, 40
    q, k, v = make_qkv(B, H, N, M, D, D, dtype)
    w = (torch.rand(B, H, M, dtype=torch.float64) + 0.1).to(dtype)
    w[0, 1] = 0.0
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[1] = False
    o, amap, lse = sra_attention(q * 8, k * 8, v, w, key_padding_mask=mask, return_attn_map=True,
                                 return_lse=True, backend="cpu")
    assert torch.all(o[0, 1] == 0) and torch.all(o[1] == 0) and torch.all(amap[1] == 0)
    assert torch.isneginf(lse[0, 1]).all() and torch.isneginf(lse[1]).all()
    assert torch.isfinite(lse[0, 0]).all() and torch.isfinite(o).all() and torch.isfinite(amap).all()


def test_float32_ignores_the_switch(monkeypatch):
    """Only bf16 / fp16 inputs take the brgemm products of this switch: fp32 is bitwise the same."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = make_qkv(1, 2, 33, 77, 40, 40, torch.float32, gen=gen)
    monkeypatch.setenv(ENV, "native")
    a = sra_attention(q, k, v, return_attn_map=True, backend="cpu")
    monkeypatch.setenv(ENV, "brgemm")
    b = sra_attention(q, k, v, return_attn_map=True, backend="cpu")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_switch_value_is_rejected(monkeypatch):
    monkeypatch.setenv(ENV, "amx")
    q = torch.randn(1, 1, 2, 4).bfloat16()
    with pytest.raises(RuntimeError, match="DARE_KERNELS_CPU_GEMM must be auto, native or brgemm, got 'amx'"):
        sra_attention(q, q, q, backend="cpu")
    assert _ext.cpu_paths()["cpu_path_bfloat16"].startswith("error: DARE_KERNELS_CPU_GEMM must be")
    out = sra_attention(q.float(), q.float(), q.float(), backend="cpu")  # fp32 never reads it
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("var,value", [("DARE_KERNELS_CPU_ISA", "avx2"), ("DARE_KERNELS_CPU_BLAS", "fallback")])
def test_auto_stays_native_when_forced_to_the_avx2_paths(monkeypatch, var, value):
    """DARE_KERNELS_CPU_ISA=avx2 and DARE_KERNELS_CPU_BLAS=fallback keep "auto" on our own products (what an
    AVX2 host runs), whatever the CPU packs."""
    monkeypatch.setenv(ENV, "auto")
    monkeypatch.setenv(var, value)
    for key in PATH_KEY.values():
        assert "cpublas::brgemm (" not in _ext.cpu_paths()[key]
