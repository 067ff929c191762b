"""Builds dare_kernels and its extension ``dare_kernels._C`` by driving CMakeLists.txt with Ninja.

Install with ``pip install --no-build-isolation -e .`` (torch must already be installed: the
extension is compiled against the torch it will run with). Environment switches:

- ``DARE_KERNELS_BUILD_EXT=0``   skip the extension (the package then runs on the reference backend).
- ``DARE_KERNELS_REQUIRE_EXT=1`` make a failed extension build fail the install (CI sets it).
- ``DARE_KERNELS_CUDA=auto|0|1`` build the CUDA kernels: auto = when torch has CUDA and nvcc is found.
- ``DARE_KERNELS_BUILD_DIR``     persistent CMake build folder (default build/cmake-<python>-<torch>).
- ``MAX_JOBS``                   parallel compile jobs (default: CPU count).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def _log(msg: str) -> None:
    print(f"[dare_kernels build] {msg}", flush=True)


def _cuda_root() -> Path | None:
    """The CUDA toolkit folder holding bin/nvcc and include/cuda_runtime_api.h, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        candidates.append(str(real.parent.parent))
        try:  # a wrapper script that execs the real nvcc
            text = real.read_text(errors="ignore")[:4096]
            candidates += [m[: -len("/bin/nvcc")] for m in re.findall(r"(/\S+/bin/nvcc)", text)]
        except OSError:
            pass
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime_api.h").exists():
            return Path(c)
    return None


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self) -> None:
        if os.environ.get("DARE_KERNELS_BUILD_EXT", "1") == "0":
            _log("DARE_KERNELS_BUILD_EXT=0: skipping the extension; the reference backend will be used")
            return
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - a failed build must not block a pure-Python install
            if os.environ.get("DARE_KERNELS_REQUIRE_EXT", "0") == "1":
                raise
            _log(f"WARNING: the extension failed to build ({exc}); dare_kernels will use the reference backend")

    def build_extension(self, ext: Extension) -> None:
        import torch

        with_cuda = self._want_cuda(torch)
        tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-{'cuda' if with_cuda else 'cpu'}"
        build_dir = Path(os.environ.get("DARE_KERNELS_BUILD_DIR", ROOT / "build" / f"cmake-{re.sub(r'[^A-Za-z0-9.]+', '_', tag)}"))
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = shutil.which("cmake") or "cmake"
        args = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DDARE_KERNELS_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
        ]
        env = dict(os.environ)
        if with_cuda:
            root = _cuda_root()
            args += [f"-DCMAKE_CUDA_COMPILER={root / 'bin' / 'nvcc'}", f"-DCUDA_TOOLKIT_ROOT_DIR={root}"]
            env["CUDA_HOME"] = str(root)
        _log(" ".join(args))
        subprocess.check_call(args, env=env)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call([cmake, "--build", str(build_dir), "-j", jobs], env=env)

        built = sorted(build_dir.glob("_C*.so")) + sorted(build_dir.glob("_C*.pyd"))
        if not built:
            raise RuntimeError(f"CMake produced no _C library in {build_dir}")
        dest = Path(self.get_ext_fullpath(ext.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built[0], dest)
        if not self.inplace:  # keep a copy beside the sources so a source checkout finds it too
            shutil.copy2(built[0], ROOT / "dare_kernels" / dest.name)
        _log(f"built {dest.name} (cuda={'on' if with_cuda else 'off'})")

    @staticmethod
    def _want_cuda(torch) -> bool:
        mode = os.environ.get("DARE_KERNELS_CUDA", "auto").lower()
        if mode in ("0", "off", "false"):
            return False
        possible = torch.version.cuda is not None and _cuda_root() is not None
        if mode in ("1", "on", "true"):
            if not possible:
                raise RuntimeError("DARE_KERNELS_CUDA=1 but torch has no CUDA or no CUDA toolkit (nvcc) was found")
            return True
        return possible


setup(
    ext_modules=[CMakeExtension("dare_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
