"""The catalog's tables agree with the copies the kernels still hold, and its shapes keep what they claim."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from dare_kernels.benchmarking.shapes import ATTN_SHAPES, TEST_CUT_SHAPES
from dare_kernels.reference import CFG_MODE_ID, CFG_MODES

ROOT = Path(__file__).resolve().parents[1]


def test_cfg_mode_ids_match_the_kernels():
    # the C++ enum (CPU and CUDA) and the Triton MODE constexpr take these integers
    header = (ROOT / "csrc" / "include" / "rectified_cfg_params.h").read_text()
    enum = dict((name, int(v)) for name, v in re.findall(r"kMode(\w+) = (\d+)", header))
    assert enum == {"Cfg": CFG_MODE_ID["cfg"], "ZeroStar": CFG_MODE_ID["cfg_zero_star"], "Apg": CFG_MODE_ID["apg"]}
    assert tuple(CFG_MODE_ID) == CFG_MODES
    try:
        from dare_kernels.triton import rectified_cfg as triton_cfg
    except ImportError as exc:
        pytest.skip(f"triton is not importable: {exc}")
    assert triton_cfg._MODES == CFG_MODE_ID


def test_bench_cfg_modes_are_the_contract():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import _cfg_common
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert _cfg_common.MODES == CFG_MODES


def test_cut_shapes_keep_the_key_side():
    for name, cut in TEST_CUT_SHAPES.items():
        real = ATTN_SHAPES[name.replace("-joint", "")]
        assert cut.D == real.D and cut.N <= real.N and cut.B * cut.H * cut.N * cut.M < 7_000_000
        if real.map_keys is None:
            assert cut.M == real.M
        else:  # joint attention: the text range stays whole, the video keys are shortened
            assert cut.map_keys[1] - cut.map_keys[0] == real.map_keys[1] - real.map_keys[0]
            assert cut.map_keys[1] == cut.M
    scaled = ATTN_SHAPES["cogvideox-5b"].scaled(8)
    assert scaled.map_keys == (scaled.M - 226, scaled.M) and scaled.N == ATTN_SHAPES["cogvideox-5b"].N // 8
