"""CI compile check of the CUDA kernels (no GPU, no CUDA torch needed): every csrc/cuda/*.cu compiles with
plain nvcc for every target of the build's TORCH_CUDA_ARCH_LIST (SASS with no register spills, PTX for newer
GPUs) and no warnings (tools/nvcc_check.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import nvcc_check  # noqa: E402

CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def test_parse_ptxas_report():
    report = (
        "ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'\n"
        "ptxas info    : Function properties for _Z3fooPf\n"
        "    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 360 bytes cmem[0]\n"
    )
    (row,) = nvcc_check.parse_ptxas(report)
    assert (row.registers, row.stack, row.spill_stores, row.spill_loads, row.smem) == (40, 8, 12, 4, 2048)
    assert "foo" in row.kernel


def test_arch_list_is_read_as_torch_reads_it():
    assert nvcc_check.parse_arch_list("8.0;9.0a;9.0+PTX") == (["sm_80", "sm_90a", "sm_90"], ["compute_90"])
    assert nvcc_check.parse_arch_list("8.0 8.6+PTX") == (["sm_80", "sm_86"], ["compute_86"])
    with pytest.raises(ValueError, match="Hopper"):
        nvcc_check.parse_arch_list("Hopper")


def test_build_ships_ptx_that_newer_gpus_can_jit():
    """The highest arch of the default list has portable PTX (compute_XY, not the arch-specific XYa)."""
    sass, ptx = nvcc_check.parse_arch_list(nvcc_check.build_arch_list())
    highest = max(int(a.removeprefix("sm_").rstrip("af")) for a in sass)
    assert f"compute_{highest}" in ptx, (nvcc_check.build_arch_list(), ptx)


@pytest.mark.skipif(nvcc_check.cuda_root() is None, reason="no CUDA toolkit (nvcc) on this machine")
@pytest.mark.skipif(not CU_FILES, reason="no csrc/cuda/*.cu files")
def test_every_cuda_file_compiles_without_spills():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "nvcc_check.py"), "--jobs", "2"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    for f in CU_FILES:
        for arch in nvcc_check.DEFAULT_ARCHS:
            assert f"| {f.name} | {arch} | `" in proc.stdout, f"{f.name} [{arch}] has no kernel rows"
        for arch in nvcc_check.DEFAULT_PTX:
            assert f"| {f.name} | {arch} | PTX only (compiles;" in proc.stdout, f"{f.name} [{arch}] PTX"


def test_sass_diff_verdicts():
    """tools/sass_diff.py tells a register renaming and a reordering from a real change (synthetic SASS)."""
    import sass_diff

    old = ["Function : _ZN4dare4cuda53_GLOBAL__N__fa7b95e0_20_sra_attention_bwd_cu_69c1249e3fooEv",
           "/*0000*/ CS2R R10, SRZ ; /* 0x00000000000a7805 */", "/*0010*/ FADD R1, R2, R3 ; /* 0x0000000302017221 */"]
    rehashed = [old[0].replace("fa7b95e0", "f4bc03d8"), *old[1:]]
    assert sass_diff.verdict([sass_diff._ANON.sub("ANON", x) for x in old],
                             [sass_diff._ANON.sub("ANON", x) for x in rehashed]) == "identical"
    renamed = [old[0], "/*0000*/ CS2R R8, SRZ ; /* 0x0000000000087805 */", old[2].replace("R1,", "R4,")]
    assert sass_diff.verdict(old, renamed) == "registers renamed"
    swapped = [old[0], "/*0000*/ FADD R1, R2, R3 ;", "/*0010*/ CS2R R10, SRZ ;"]
    assert sass_diff.verdict(old, swapped) == "rescheduled"
    changed = [old[0], old[1], old[2].replace("FADD", "FMUL")]
    assert sass_diff.verdict(old, changed) == "differs"
