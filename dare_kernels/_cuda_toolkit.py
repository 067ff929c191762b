"""Where the CUDA toolkit is: the one finder of setup.py (the build) and tools/nvcc_check.py (the compile check).

Standard library only: setup.py loads this file by path (``runpy.run_path``) in a build environment where
the package itself is not importable yet.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path


def cuda_root() -> Path | None:
    """The CUDA toolkit folder holding bin/nvcc and include/cuda_runtime_api.h, or None.

    Candidates in order: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, the folder above the ``nvcc`` on PATH, and
    the folders named inside that ``nvcc`` when it is a wrapper script that execs the real one.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        candidates.append(str(real.parent.parent))
        try:
            text = real.read_text(errors="ignore")[:4096]
            candidates += [m[: -len("/bin/nvcc")] for m in re.findall(r"(/\S+/bin/nvcc)", text)]
        except OSError:
            pass
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime_api.h").exists():
            return Path(c)
    return None
