"""The package imports, reports its backends, and the extension is really built where CI expects it."""

import os
import subprocess
import sys

import pytest

import dare_kernels
from dare_kernels import _ext


def test_info_lists_every_backend():
    info = dare_kernels.info()
    assert set(info["backends"]) == {"reference", "cpu", "cuda", "triton"}
    assert info["backends"]["reference"][0] is True
    for ok, why in info["backends"].values():
        assert isinstance(ok, bool) and why


@pytest.mark.skipif(os.environ.get("DARE_KERNELS_BUILD_EXT", "1") == "0" or os.environ.get("DARE_KERNELS_REQUIRE_EXT") == "0",
                    reason="a pure-Python install was asked for (DARE_KERNELS_BUILD_EXT=0 / DARE_KERNELS_REQUIRE_EXT=0)")
def test_extension_is_loaded():
    # set-up (tools/setup_env.sh, pip install --no-build-isolation) fails when the extension does not build:
    # a missing extension here is a build defect
    assert _ext.EXT is not None, _ext.EXT_ERROR
    assert "cpu_vec" in _ext.build_info()


def test_cli_info_runs():
    out = subprocess.run([sys.executable, "-m", "dare_kernels", "info"], capture_output=True, text=True, check=True)
    assert "backends:" in out.stdout and "reference" in out.stdout


def test_import_without_extension_falls_back_with_a_warning():
    code = (
        "import warnings, torch, dare_kernels as dk\n"
        "assert dk._ext.EXT is None\n"
        "q = torch.randn(1, 2, 5, 8); k = torch.randn(1, 2, 3, 8)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    o = dk.sra_attention(q, k, k)\n"
        "    o = dk.sra_attention(q, k, k)\n"
        "msgs = [str(x.message) for x in w if 'reference' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert dk.info()['backends']['cpu'][0] is False\n"
        "print('ok')\n"
    )
    env = dict(os.environ, DARE_KERNELS_DISABLE_EXT="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout
