"""Builds dare_kernels and its extension ``dare_kernels._C`` by driving CMakeLists.txt with Ninja.

Install with ``pip install --no-build-isolation .`` (or ``-e .``; also for an sdist:
``pip install --no-build-isolation dare_kernels-<v>.tar.gz``). torch, cmake>=3.26 and ninja must already
be installed: the extension is compiled against the torch it will run with. pip's default isolated build
has no torch, so it stops with that fix in the message instead of producing a wheel without kernels;
a failed extension build fails the install, always (docs/BUILD.md). Environment switches:

- ``DARE_KERNELS_BUILD_EXT=0``   pure-Python package, no extension (runs on the reference backend).
  Explicit only; pip may cache that wheel, so add ``--no-cache-dir`` when you later want the kernels.
- ``DARE_KERNELS_CUDA=auto|0|1`` build the CUDA kernels: auto = when torch has CUDA and nvcc is found.
- ``DARE_KERNELS_BUILD_DIR``     persistent CMake build folder (default build/cmake-<python>-<torch>).
- ``MAX_JOBS``                   parallel compile jobs (default: CPU count).
"""

from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
SPDX_SETUPTOOLS = 77  # the first setuptools that reads project.license as an SPDX string (pyproject.toml)


def _let_old_setuptools_read_the_license() -> None:
    """pyproject.toml gives ``license = "Apache-2.0"`` (SPDX), which setuptools >= 77 reads without a warning.

    build-system.requires asks for setuptools >= 77, but ``--no-build-isolation`` builds and the offline GPU
    machines use whatever setuptools is installed; one older than 77 knows only the table form and would
    refuse the whole file. For those, the string is handed over as ``{text = "Apache-2.0"}``.
    """
    import setuptools

    try:
        if int(setuptools.__version__.split(".")[0]) >= SPDX_SETUPTOOLS:
            return
        from setuptools.config import pyprojecttoml
        load_file = pyprojecttoml.load_file
    except (ValueError, ImportError, AttributeError):  # not a layout this shim knows: setuptools' own message
        return

    def load_with_license_table(filepath):
        data = load_file(filepath)
        project = data.get("project", {})
        if isinstance(project.get("license"), str):
            project["license"] = {"text": project["license"]}
        return data

    pyprojecttoml.load_file = load_with_license_table


_let_old_setuptools_read_the_license()


def _log(msg: str) -> None:
    print(f"[dare_kernels build] {msg}", flush=True)


# the toolkit finder shared with tools/nvcc_check.py; loaded by path, the package is not importable here
_cuda_root = runpy.run_path(str(ROOT / "dare_kernels" / "_cuda_toolkit.py"))["cuda_root"]


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


NO_TORCH_MESSAGE = """dare_kernels: torch is not importable in this build environment ({error}).

The extension dare_kernels._C is compiled against the torch it will run with, so torch must be
installed before the build and visible to it. pip builds in an isolated environment without torch
by default; build in your environment instead:

    pip install torch "cmake>=3.26" ninja "setuptools>=77" wheel
    pip install --no-build-isolation .            # or an sdist: --no-build-isolation dare_kernels-*.tar.gz

For a pure-Python install without kernels (the slow reference backend), set DARE_KERNELS_BUILD_EXT=0."""


def _import_torch():
    """torch of the running interpreter, or a SystemExit whose message says how to build."""
    try:
        import torch
    except ImportError as exc:
        raise SystemExit(NO_TORCH_MESSAGE.format(error=exc)) from None
    return torch


def _tool(name: str, bin_dir_attr: str) -> str:
    """Path of cmake / ninja: the pip package's binary first (the version build-system.requires pins), then PATH."""
    try:
        mod = __import__(name)
        exe = Path(getattr(mod, bin_dir_attr)) / name
        if exe.exists():
            return str(exe)
    except (ImportError, AttributeError):
        pass
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"dare_kernels: {name} not found; install it first: pip install \"cmake>=3.26\" ninja "
                         "(then build with --no-build-isolation)")
    return found


class CMakeBuild(build_ext):
    def run(self) -> None:
        if os.environ.get("DARE_KERNELS_BUILD_EXT", "1") == "0":
            _log("DARE_KERNELS_BUILD_EXT=0: no extension built; dare_kernels will use the reference backend")
            return
        _import_torch()  # before anything else: the one failure an isolated build always hits
        super().run()  # any failure of the extension build fails the install (no silent wheel without _C)

    def build_extension(self, ext: Extension) -> None:
        torch = _import_torch()

        with_cuda = self._want_cuda(torch)
        tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}-{'cuda' if with_cuda else 'cpu'}"
        build_dir = Path(os.environ.get("DARE_KERNELS_BUILD_DIR", ROOT / "build" / f"cmake-{re.sub(r'[^A-Za-z0-9.]+', '_', tag)}"))
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = _tool("cmake", "CMAKE_BIN_DIR")
        args = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={_tool('ninja', 'BIN_DIR')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DDARE_KERNELS_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
        ]
        env = dict(os.environ)
        if with_cuda:
            root = _cuda_root()
            args += [f"-DCMAKE_CUDA_COMPILER={root / 'bin' / 'nvcc'}", f"-DCUDA_TOOLKIT_ROOT_DIR={root}"]
            env["CUDA_HOME"] = str(root)
        configured = build_dir / ".dare_kernels-configure"  # the arguments of the last configure of this folder
        if (build_dir / "build.ninja").exists() and configured.exists() and configured.read_text() == " ".join(args):
            _log(f"CMake configuration in {build_dir} is up to date (ninja re-runs CMake if CMakeLists.txt changed)")
        else:
            _log(" ".join(args))
            subprocess.check_call(args, env=env)
            configured.write_text(" ".join(args))
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
