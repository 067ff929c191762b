"""The Triton SRA kernels as the tests load them: compiled on a GPU, else in Triton's interpreter.

Importing this module without a CUDA device sets ``TRITON_INTERPRET=1`` (unless already set) before anything
imports the kernels: Triton reads it when ``@triton.jit`` decorates them, at the first import of
``dare_kernels.triton.sra_attention``. Test modules import it before ``dare_kernels``; conftest has
usually imported the kernels interpreted already, and this keeps a module right when it runs alone.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def load_sra_triton():
    """``(dare_kernels.triton.sra_attention, None)``, or ``(None, why the Triton tests skip)``."""
    try:
        import triton  # noqa: F401

        from dare_kernels.triton import sra_attention as module
    except ImportError as exc:  # triton missing
        return None, f"triton is not importable: {exc}"
    if DEVICE == "cpu" and not module._INTERPRET_AT_IMPORT:
        return None, "the Triton kernels were imported before TRITON_INTERPRET=1 was set in this process"
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return None, "TRITON_INTERPRET is set to something other than 1"
    return module, None
