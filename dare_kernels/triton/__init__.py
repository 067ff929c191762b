"""Triton kernels of dare_kernels (SRA attention, rectified CFG); see sra_attention.py and rectified_cfg.py."""

import os as _os

if _os.environ.get("TRITON_INTERPRET", "0") == "1":  # Triton <= 3.6 interpreter with NumPy >= 2.4 (_compat.py)
    try:
        from ._compat import patch_interpreter_index as _patch

        _patch()
    except ImportError:  # triton missing: the kernel modules raise the clear error on import
        pass
