"""The fused softmax rows of the CPU SRA forward (bf16dot::softmax_rows, csrc/cpu/sra_bf16_dot.cpp).

With all keys in one block (M <= 1024), bf16 inputs with the bf16 products, and fp32, fp16 and bf16 inputs
(fp32 products) on a CPU with AVX-512, run max, exp (our own polynomial), sum, map row, bf16 P (bf16 "1") and, for fp32, P / l in
one AVX-512 pass per row; rows of up to 128 keys are held in registers two at a time, longer rows take a
general pass. fp32 then writes P·V straight into the output. DARE_KERNELS_CPU_ISA=avx2 gives fp32 the
at::vec rows of the build; DARE_KERNELS_CPU_ROWS=avx512f the same AVX-512 pass built without BF16 (the
path of AVX-512 CPUs without AVX512-BF16), which must be bitwise the BF16 build's. Every case is checked
against the float64 reference (conftest tolerances): key counts at the register-case edges (1, 16, 17, 128, 129) and beyond, odd query counts (a last row
alone), map sub-ranges (the map read back from the fp32 P), masks, a first / last head without valid keys
(the map rows of a task are summed over heads in a buffer, the last head writing the output), layouts.
"""

from __future__ import annotations

import os

import pytest
import torch

from dare_kernels import _ext, sra_attention
from dare_kernels.reference import sra_attention_ref

from test_sra_cpu import case_inputs, check_all, close, make_qkv, make_weight, run_both
from test_sra_cpu_bf16_dot import ENV as DOT_ENV, HAVE_BF16_DOT, needs_avx512_default

pytestmark = pytest.mark.skipif(not _ext.has_cpu_kernels(), reason="CPU kernels not built")

ISA_ENV = "DARE_KERNELS_CPU_ISA"


@pytest.fixture(autouse=True)
def _own_products(monkeypatch):
    """The rows under test sit around our own products: on a CPU with AMX tiles "auto" takes cpublas::brgemm
    for bf16 / fp16 instead (test_sra_cpu_brgemm.py), so these tests pin DARE_KERNELS_CPU_GEMM=native."""
    monkeypatch.setenv("DARE_KERNELS_CPU_GEMM", "native")

ROWS_ENV = "DARE_KERNELS_CPU_ROWS"
needs_avx512_rows = pytest.mark.skipif(not HAVE_BF16_DOT, reason="this CPU (or OS / compiler) lacks AVX512-BF16")


# AVX-512 F/BW/VL without a forced AVX2 run (an AVX-512 CPU, BF16 or not): PyTorch's own capability (which
# follows ATEN_CPU_CAPABILITY), so a rows switch that silently stays on at::vec fails the tests below
HAVE_AVX512F_ROWS = (_ext.has_cpu_kernels() and torch.backends.cpu.get_cpu_capability() == "AVX512"
                     and os.environ.get(ISA_ENV) != "avx2")
needs_avx512f_rows = pytest.mark.skipif(
    not HAVE_AVX512F_ROWS, reason="no AVX-512 F/BW/VL, or this run forces AVX2 (ATEN_CPU_CAPABILITY / DARE_KERNELS_CPU_ISA)")

PATHS = [
    pytest.param(torch.float32, "auto", id="fp32-avx512-rows", marks=needs_avx512_rows),
    pytest.param(torch.float32, "avx512f", id="fp32-avx512f-rows", marks=needs_avx512f_rows),
    pytest.param(torch.float32, "avx2", id="fp32-avx2-rows"),
    pytest.param(torch.float16, "auto", id="fp16-avx512-rows", marks=needs_avx512f_rows),
    pytest.param(torch.bfloat16, "0", id="bf16-fp32-products-avx512-rows", marks=needs_avx512f_rows),
    pytest.param(torch.bfloat16, "1", id="bf16-qk-pv", marks=needs_avx512_rows),
    pytest.param(torch.bfloat16, "qk", id="bf16-qk", marks=needs_avx512_rows),
]

CASES = [
    # B, H, N, M, D, Dv, weight kind, mask, map keys, layout, head without valid keys (batch 0)
    (1, 2, 7, 1, 40, 40, "m", False, None, "bhsd", None),  # one key; 7 rows: the last one alone
    (2, 2, 9, 16, 80, 80, "bm", True, (3, 14), "bshd", None),  # one whole vector, map sub-range
    (1, 3, 11, 17, 40, 40, "bhm", False, (0, 17), "strided", 2),  # a one-lane tail; the last head dead
    (2, 2, 13, 77, 40, 40, "bhm", True, (5, 70), "bhsd", 0),  # the first head (map rows start there) dead
    (1, 2, 10, 128, 160, 160, "bm", False, None, "bhsd", None),  # eight vectors: the largest register case
    (1, 2, 9, 129, 40, 24, "bhm", True, (1, 129), "bshd", 1),  # the general row pass, the last head dead
    (1, 1, 6, 1000, 41, 33, None, True, (999, 1000), "strided", None),  # one head: first and last
]


def _set_path(monkeypatch, dtype, mode):
    if dtype == torch.float32 and mode == "avx512f":  # the rows built without AVX512-BF16
        monkeypatch.setenv(ROWS_ENV, mode)
    elif dtype in (torch.float32, torch.float16):
        monkeypatch.setenv(ISA_ENV, mode)
    else:
        monkeypatch.setenv(DOT_ENV, mode)


def _case_inputs(case, dtype, seed):
    """q, k, v, weights and mask of one CASES row (a dead head: every key of it weighted 0)."""
    q, k, v, w, mask, gen = case_inputs(case[:10], dtype, seed)  # (zeroing a head draws nothing)
    dead_head = case[10]
    if dead_head is not None:
        w[0, dead_head] = 0.0  # every key of that head weighted 0: zero output, no map share, LSE -inf
    return q, k, v, w, mask, gen


@pytest.mark.parametrize("dtype,mode", PATHS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[3]}-D{c[4]}-Dv{c[5]}-{c[9]}")
def test_fused_rows_match_reference(monkeypatch, case, dtype, mode):
    keys, dead_head = case[8], case[10]
    q, k, v, w, mask, gen = _case_inputs(case, dtype, seed=23)
    _set_path(monkeypatch, dtype, mode)
    res = run_both(q, k, v, w, mask, 0.7, keys, with_grad=False, gen=gen)
    check_all(res, dtype)
    if dead_head is not None:
        o, amap, lse = (res[n][0] for n in ("o", "map", "lse"))
        assert torch.all(o[0, dead_head] == 0) and torch.isneginf(lse[0, dead_head]).all()
        assert torch.isfinite(amap).all() and bool((amap[0].sum(-1) > 0).all())
    # without a map: tasks per (batch, head, query block)
    o = sra_attention(q, k, v, w, key_padding_mask=mask, strength=0.7, backend="cpu")
    o_ref = sra_attention_ref(q.double(), k.double(), v.double(), None if w is None else w.double(),
                              key_padding_mask=mask, strength=0.7)
    close(o, o_ref, dtype, "o (no map)")


@needs_avx512_default
def test_fp32_isa_switch_really_switches(monkeypatch):
    """fp32: the AVX-512 rows and the at::vec (AVX2) rows are different computations (else the cases above
    would test one path twice), within the fp32 tolerance of each other."""
    gen = torch.Generator().manual_seed(29)
    q, k, v = make_qkv(2, 2, 64, 77, 40, 40, torch.float32, gen=gen)
    w = make_weight("bm", 2, 2, 77, torch.float32, gen=gen)
    out = {}
    for isa in ("auto", "avx2"):
        monkeypatch.setenv(ISA_ENV, isa)
        out[isa] = sra_attention(q, k, v, w, return_attn_map=True, return_lse=True, backend="cpu")
    for a, b, name in zip(out["auto"], out["avx2"], ("o", "map", "lse")):
        assert not torch.equal(a, b), f"DARE_KERNELS_CPU_ISA=avx2 left {name} bitwise unchanged"
        close(a, b.double(), torch.float32, f"avx512 vs avx2 rows: {name}")


@needs_avx512f_rows
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[3]}-D{c[4]}-Dv{c[5]}-{c[9]}")
def test_fp32_rows_without_bf16_are_bitwise_the_same(monkeypatch, case):
    """The AVX-512 rows built without AVX512-BF16 (rows512, for CPUs that lack it) are the same source as the
    BF16 build's: fp32 outputs, maps and LSE bitwise equal on every case, and not the at::vec rows."""
    if not HAVE_BF16_DOT:
        pytest.skip("needs both builds: this CPU lacks AVX512-BF16")
    q, k, v, w, mask, _ = _case_inputs(case, torch.float32, seed=31)
    out = {}
    for rows, isa in (("auto", "auto"), ("avx512f", "auto"), ("auto", "avx2")):
        monkeypatch.setenv(ROWS_ENV, rows)
        monkeypatch.setenv(ISA_ENV, isa)
        out[rows, isa] = sra_attention(q, k, v, w, key_padding_mask=mask, strength=0.7, return_attn_map=True,
                                       attn_map_keys=case[8], return_lse=True, backend="cpu")
    for a, b, name in zip(out["auto", "auto"], out["avx512f", "auto"], ("o", "map", "lse")):
        assert torch.equal(a, b), f"rows without BF16 changed {name}"
    if case[3] > 1:  # (one key: P = 1 on every path)
        assert any(not torch.equal(a, b) for a, b in zip(out["avx512f", "auto"], out["auto", "avx2"])), \
            "DARE_KERNELS_CPU_ROWS=avx512f gave the at::vec rows"


def test_bad_rows_switch_value_is_rejected(monkeypatch):
    monkeypatch.setenv(ROWS_ENV, "avx512bf16")
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(RuntimeError, match="DARE_KERNELS_CPU_ROWS must be auto or avx512f"):
        sra_attention(q, q, q, backend="cpu")


@needs_avx512f_rows
@pytest.mark.parametrize("dtype,dot", [(torch.float16, None), (torch.bfloat16, "0")], ids=["fp16", "bf16-fp32-products"])
def test_half_inputs_take_the_fused_rows(monkeypatch, dtype, dot):
    """fp16, and bf16 without the bf16 products, take the AVX-512 rows too (P unnormalised, O scaled on the
    store): a different computation from the at::vec rows (DARE_KERNELS_CPU_ISA=avx2), within tolerance."""
    if dot is not None:
        monkeypatch.setenv(DOT_ENV, dot)
    gen = torch.Generator().manual_seed(37)
    q, k, v = make_qkv(2, 2, 64, 77, 40, 40, dtype, gen=gen)
    w = make_weight("bm", 2, 2, 77, dtype, gen=gen)
    out = {}
    for isa in ("auto", "avx2"):
        monkeypatch.setenv(ISA_ENV, isa)
        out[isa] = sra_attention(q, k, v, w, return_attn_map=True, return_lse=True, backend="cpu")
    assert any(not torch.equal(a, b) for a, b in zip(out["auto"], out["avx2"])), "the rows did not switch"
    for a, b, name in zip(out["auto"], out["avx2"], ("o", "map", "lse")):
        close(a, b.double(), dtype, f"avx512 vs at::vec rows: {name}")
