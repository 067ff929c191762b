"""The C++ switch table (csrc/include/switches.h): parsed once and cached, re-read by reload_cpu_switches(),
listed by cpu_switches(); a rejected value fails only the kernels that consult it. Also the build_info
entry naming the x86 ISA the binary requires."""

from __future__ import annotations

import os
import platform

import pytest
import torch

from dare_kernels import _ext, sra_attention

EXT = _ext.EXT
pytestmark = pytest.mark.skipif(EXT is None or not hasattr(EXT, "cpu_switches"),
                                reason="extension not built (or built before the switch table)")

NAMES = {
    "ATEN_CPU_CAPABILITY", "DARE_KERNELS_CPU_ISA", "DARE_KERNELS_CPU_BF16_DOT", "DARE_KERNELS_CPU_GEMM",
    "DARE_KERNELS_CPU_ROWS",
    "DARE_KERNELS_CPU_STREAM_OUT_BYTES", "DARE_KERNELS_CPU_SCORE_BLOCK", "DARE_KERNELS_CPU_HUGE_PAGES",
    "DARE_KERNELS_CPU_BLAS", "DARE_KERNELS_CPU_BRGEMM", "DARE_KERNELS_CUDA_SRA_PATH", "DARE_KERNELS_CUDA_CFG_PATH",
}


def test_lists_every_switch_with_defaults(monkeypatch):
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
    table = EXT.cpu_switches()
    assert set(table) == NAMES
    assert table["DARE_KERNELS_CPU_SCORE_BLOCK"] == "262144"
    assert table["DARE_KERNELS_CPU_STREAM_OUT_BYTES"] == str(48 << 20)
    assert table["DARE_KERNELS_CPU_BF16_DOT"] == "auto" and table["DARE_KERNELS_CUDA_SRA_PATH"] == "auto"
    assert table["DARE_KERNELS_CPU_GEMM"] == "auto"


def test_parsed_once_until_reload():
    name = "DARE_KERNELS_CPU_SCORE_BLOCK"
    old = os.environ.get(name)
    try:
        os.environ[name] = "4096"
        EXT.reload_cpu_switches()
        assert EXT.cpu_switches()[name] == "4096"
        os.environ[name] = "8192"  # not seen until the next reload
        assert EXT.cpu_switches()[name] == "4096"
        EXT.reload_cpu_switches()
        assert EXT.cpu_switches()[name] == "8192"
        os.environ[name] = "10"  # below 1024: the default
        EXT.reload_cpu_switches()
        assert EXT.cpu_switches()[name] == "262144"
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
        EXT.reload_cpu_switches()


def test_bad_value_fails_only_the_kernels_that_read_it(monkeypatch):
    monkeypatch.setenv("DARE_KERNELS_CPU_BF16_DOT", "yes")  # conftest's monkeypatch reloads the table
    assert EXT.cpu_switches()["DARE_KERNELS_CPU_BF16_DOT"].startswith("error: DARE_KERNELS_CPU_BF16_DOT must be")
    q = torch.randn(1, 2, 5, 8)
    out = sra_attention(q, q, q, backend="cpu")  # float32 never reads the bf16 switch
    assert torch.isfinite(out).all()
    with pytest.raises(RuntimeError, match="DARE_KERNELS_CPU_BF16_DOT must be auto, 0, 1 or qk, got 'yes'"):
        sra_attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), backend="cpu")


def test_build_info_names_the_required_isa():
    info = EXT.build_info()
    if platform.machine().lower() in ("x86_64", "amd64") and info["cpu_vec"] == "avx2":
        assert info["cpu_isa_required"] == "avx2+fma+f16c"
    else:
        assert info["cpu_isa_required"] == ""


def test_info_names_the_cpu_path_of_each_dtype(monkeypatch):
    """build_info() (and so `dare-kernels info`) says which CPU path the SRA forward takes per dtype: the
    ISA and the product kernel, following the switches as they stand."""
    if not hasattr(EXT, "cpu_paths"):
        pytest.skip("extension built before cpu_paths()")
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
    info = _ext.build_info()
    keys = ("cpu_path_float32", "cpu_path_bfloat16", "cpu_path_float16")
    for key in keys:
        isa, _, kernel = info[key].partition(" / ")
        assert isa in ("avx2", "avx512f", "avx512-bf16", "amx-bf16", "amx-fp16") and kernel, info[key]
    monkeypatch.setenv("DARE_KERNELS_CPU_GEMM", "native")
    native = _ext.build_info()
    assert all("cpublas::brgemm (" not in native[key] for key in keys)
    monkeypatch.setenv("DARE_KERNELS_CPU_GEMM", "brgemm")
    forced = _ext.build_info()
    assert forced["cpu_path_float32"] == native["cpu_path_float32"]  # fp32 does not read the switch
    assert all("cpublas::brgemm (" in forced[key] for key in keys[1:])
    monkeypatch.setenv("DARE_KERNELS_CPU_ISA", "avx2")
    monkeypatch.setenv("DARE_KERNELS_CPU_GEMM", "native")
    assert _ext.build_info()["cpu_path_float32"].startswith("avx2 / ")
