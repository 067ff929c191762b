"""Shared test helpers: random inputs, per-dtype tolerances, the float64 oracle."""

from __future__ import annotations

import contextlib
import os
import sys

import pytest

# torch.compile's on-disk cache (TORCHINDUCTOR_CACHE_DIR) is not keyed on ATEN_CPU_CAPABILITY: a CPU kernel generated
# for 16-lane AVX-512 vectors and later built with ATEN_CPU_CAPABILITY=avx2 (8 lanes), or the reverse, overruns its
# buffers (heap corruption, NaN gradients; seen with torch 2.13). A run under a forced capability gets its own cache.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{os.getuid()}_{os.environ['ATEN_CPU_CAPABILITY']}")

import torch  # noqa: E402

try:  # an offline machine set up without the test extras: @given tests skip with the reason, the rest run
    import hypothesis  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(__file__))
    import _hypothesis_stub

    _hypothesis_stub.install()

# absolute / relative tolerance of a backend's output against the float64 reference, per input dtype
from dare_kernels.benchmarking.tolerances import TOL  # noqa: E402,F401  (the catalog's table)


def tol(dtype: torch.dtype) -> dict:
    atol, rtol = TOL[dtype]
    return {"atol": atol, "rtol": rtol}


def rand(*shape, dtype=torch.float32, device="cpu", generator=None, scale=1.0):
    """Random normal tensor (never zeros)."""
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def assert_close_to_scale(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    """Same shape and max |a - b| <= rel * max |b|, in float64: for end-to-end outputs (pipelines, models)
    whose error is rounding carried through many layers, judged against the size of the expected ``b``."""
    assert a.shape == b.shape
    err = float((a.double() - b.double()).abs().max())
    scale = float(b.double().abs().max())
    assert err <= rel * scale, f"max abs error {err} vs scale {scale}"


def has_cuda() -> bool:
    return torch.cuda.is_available()


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _import_triton_kernels_interpreted() -> None:
    """Without CUDA, decorate our Triton kernels for the interpreter before any test module imports them.

    ``@triton.jit`` reads TRITON_INTERPRET when it decorates, and that includes Triton's own library
    functions (``tl.zeros`` ...), decorated when ``triton`` is first imported. If something imports triton
    without the variable first (diffusers does), interpreted kernels fail later with "Cannot call
    @triton.jit'd outside of the scope of a kernel". Importing triton and our kernels here, first, makes the
    Triton tests independent of the order the test files run in. The environment is restored afterwards.
    """
    if torch.cuda.is_available() or "triton" in sys.modules:
        return
    had = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # before triton itself is imported: its own @jit helpers too
    try:
        import triton  # noqa: F401

        import dare_kernels.triton.rectified_cfg  # noqa: F401
        import dare_kernels.triton.sra_attention  # noqa: F401
    except ImportError:
        pass  # no triton: the Triton tests skip with their own reason
    finally:
        if had is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = had


_import_triton_kernels_interpreted()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


def pytest_report_header(config):
    import dare_kernels

    info = dare_kernels.info()
    lines = [f"dare_kernels {info['version']}, torch {info['torch']}, extension: {info['extension']}"]
    lines += [f"  backend {k}: {'yes' if ok else 'no'} ({why})" for k, (ok, why) in info["backends"].items()]
    if os.environ.get("CI"):
        lines.append("  CI=true")
    return lines


def reload_cpu_switches() -> None:
    """Make the kernels re-read their environment switches: Python and C++ parse them once into cached
    tables (dare_kernels/switches.py, csrc/include/switches.h), so a test that changes os.environ at run
    time calls this afterwards."""
    from dare_kernels import switches

    switches.reload()


@contextlib.contextmanager
def switch_env(name: str, value: str | None):
    """Set (or, with None, unset) one environment switch for the block, with the kernels re-reading it on the
    way in and out; for code outside a test function (module-level probes, hypothesis bodies)."""
    with pytest.MonkeyPatch.context() as mp:
        if value is None:
            mp.delenv(name, raising=False)
        else:
            mp.setenv(name, value)
        reload_cpu_switches()
        try:
            yield
        finally:
            mp.undo()
            reload_cpu_switches()


class SwitchAwareMonkeyPatch(pytest.MonkeyPatch):
    """pytest's MonkeyPatch whose environment changes (and their undo) also reload the C++ switch table."""

    def setenv(self, name, value, prepend=None):
        super().setenv(name, value, prepend)
        reload_cpu_switches()

    def delenv(self, name, raising=True):
        super().delenv(name, raising)
        reload_cpu_switches()

    def undo(self):
        super().undo()
        reload_cpu_switches()


@pytest.fixture
def monkeypatch():
    """The builtin monkeypatch fixture, switch-aware (SwitchAwareMonkeyPatch): a monkeypatch.setenv of a
    DARE_KERNELS_* / ATEN_CPU_CAPABILITY switch reaches the kernels at once, and its undo at teardown too."""
    mp = SwitchAwareMonkeyPatch()
    yield mp
    mp.undo()
