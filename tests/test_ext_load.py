"""Loading the extension: a torch mismatch and a CPU without the build's ISA each give one clear warning
and the PyTorch fallback, never a crash (faked in subprocesses: the build itself is not broken)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from dare_kernels import _ext

needs_ext = pytest.mark.skipif(_ext.EXT is None, reason=f"the extension is not loaded here ({_ext.EXT_ERROR})")

_CHECK_FALLBACK = """
import torch, dare_kernels as dk
assert dk._ext.EXT is None, "the extension must not be used"
q = torch.randn(1, 2, 5, 8); k = torch.randn(1, 2, 3, 8)
with warnings.catch_warnings(record=True) as later:
    warnings.simplefilter("always")
    o = dk.sra_attention(q, k, k)
torch.testing.assert_close(o, dk.sra_attention(q, k, k, backend="reference"), atol=2e-5, rtol=2e-5)
assert any("fallback" in str(x.message) for x in later)
info = dk.info()
assert info["backends"]["cpu"][0] is False
"""


def _run(prelude: str, check: str) -> subprocess.CompletedProcess:
    code = "import warnings\nwarnings.simplefilter('always')\nwith warnings.catch_warnings(record=True) as at_import:\n" \
           + textwrap.indent(prelude + "\nimport dare_kernels", "    ") + "\n" + _CHECK_FALLBACK + check + "\nprint('ok')\n"
    env = {k: v for k, v in os.environ.items() if k != "DARE_KERNELS_DISABLE_EXT"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def _one_warning(match: str) -> str:
    return (f"msgs = [str(x.message) for x in at_import if issubclass(x.category, RuntimeWarning)]\n"
            f"assert len(msgs) == 1, msgs\n"
            f"assert {match!r} in msgs[0], msgs\n")


@needs_ext
def test_torch_version_mismatch_warns_once_names_both_versions_and_the_rebuild():
    # the running torch claims another version than the one the extension recorded at build time
    prelude = "import torch\nbuilt = None\ntorch.__version__ = '9.8.7+fake'"
    check = _one_warning("9.8.7+fake") + textwrap.dedent("""
        built = dk._ext.TORCH_MISMATCH["built"]
        assert built in msgs[0] and "pip install --no-build-isolation -e ." in msgs[0] and "make setup" in msgs[0]
        assert dk.info()["torch_mismatch"] == {"built": built, "running": "9.8.7+fake"}
        assert "9.8.7+fake" in dk.info()["extension"]
    """)
    out = _run(prelude, check)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok" in out.stdout


def test_undefined_symbol_at_import_warns_once_with_the_rebuild_command():
    # an import of _C that fails as a torch ABI mismatch does (undefined symbol)
    prelude = textwrap.dedent("""
        import sys
        class _Broken:
            def find_spec(self, name, path=None, target=None):
                if name == "dare_kernels._C":
                    raise ImportError("/x/_C.so: undefined symbol: _ZN3c104impl8GPUTrace")
                return None
        sys.meta_path.insert(0, _Broken())
    """)
    check = _one_warning("undefined symbol") + textwrap.dedent("""
        assert "pip install --no-build-isolation -e ." in msgs[0]
        assert dk.info()["torch_mismatch"]["running"] == str(torch.__version__)
    """)
    out = _run(prelude, check)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok" in out.stdout


@pytest.mark.skipif(__import__("platform").machine().lower() not in ("x86_64", "amd64"), reason="x86-64 check")
def test_cpu_without_avx2_does_not_import_the_extension():
    # /proc/cpuinfo reads as a CPU with SSE only: _C must not even be imported (it would die of SIGILL)
    prelude = textwrap.dedent("""
        import builtins, io, sys
        _open = builtins.open
        def _fake_open(path, *a, **k):
            if str(path) == "/proc/cpuinfo":
                return io.StringIO("processor\\t: 0\\nflags\\t\\t: fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt\\n")
            return _open(path, *a, **k)
        builtins.open = _fake_open
    """)
    check = _one_warning("avx2, fma, f16c") + textwrap.dedent("""
        builtins.open = _open
        assert "dare_kernels._C" not in sys.modules
        assert "lacks" in dk.info()["extension"]
    """)
    out = _run(prelude, check)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ok" in out.stdout


def test_missing_features_reads_the_flags(monkeypatch):
    monkeypatch.setattr(_ext, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(_ext.platform, "machine", lambda: "x86_64")
    assert _ext.missing_cpu_features() == ["f16c"]
    monkeypatch.setattr(_ext, "cpu_flags", lambda: {"avx2", "fma", "f16c", "avx512f"})
    assert _ext.missing_cpu_features() == []
    monkeypatch.setattr(_ext.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(_ext, "cpu_flags", lambda: set())
    assert _ext.missing_cpu_features() == []  # the x86 flags say nothing about an aarch64 build
