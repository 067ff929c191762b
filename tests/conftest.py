"""Shared test helpers: random inputs, per-dtype tolerances, the float64 oracle."""

from __future__ import annotations

import os

import pytest
import torch

# absolute / relative tolerance of a backend's output against the float64 reference, per input dtype
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (3e-3, 3e-3),
}


def tol(dtype: torch.dtype) -> dict:
    atol, rtol = TOL[dtype]
    return {"atol": atol, "rtol": rtol}


def rand(*shape, dtype=torch.float32, device="cpu", generator=None, scale=1.0):
    """Random normal tensor (never zeros)."""
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def has_cuda() -> bool:
    return torch.cuda.is_available()


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


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
