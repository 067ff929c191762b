"""Packaging: the sdist carries every source the extension build reads; a wheel built from that sdist
against the installed torch (``pip wheel --no-build-isolation --no-deps``) contains ``dare_kernels._C``
and it loads; a build that cannot see torch (pip's default isolated build) fails with the fix in its
message instead of producing a wheel without kernels.

The wheel build reuses one CMake build folder (``build/sdist-check/cmake``, via DARE_KERNELS_BUILD_DIR)
and unpacks the sdist to the same place each run, so a second run on the same machine recompiles only
what changed. From scratch it is one full compile of the extension (minutes on 2 cores); time-boxed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "build" / "sdist-check"  # fixed paths: CMake's cache is tied to the source folder
WHEEL_TIMEOUT_S = 1500  # one clean compile of every .cpp on a loaded 2-core machine, with margin

pytestmark = pytest.mark.xdist_group("packaging")  # one worker: the wheel build uses both cores

# files of the checkout that the extension build reads (CMakeLists.txt globs csrc/ and python/)
BUILD_INPUTS = ("CMakeLists.txt", "setup.py", "pyproject.toml", "MANIFEST.in", "csrc", "python", "dare_kernels")


def _build_inputs() -> list[str]:
    """Tracked files the build needs, relative to the repository root (git when available, else a walk)."""
    try:
        out = subprocess.run(["git", "ls-files", *BUILD_INPUTS], cwd=REPO, capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return sorted(out)
    except (OSError, subprocess.SubprocessError):
        pass
    files = []
    for name in BUILD_INPUTS:
        p = REPO / name
        files += [str(f.relative_to(REPO)) for f in ([p] if p.is_file() else p.rglob("*"))
                  if f.is_file() and "__pycache__" not in f.parts and f.suffix not in (".so", ".pyc")]
    return sorted(files)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PIP_"))}
    env.update(extra)
    return env


def _clean_copy(dest: Path) -> Path:
    """The checkout as a fresh clone has it (tracked and untracked-not-ignored files): no build products and
    no stale ``*.egg-info/SOURCES.txt``, which setuptools would otherwise add to the sdist by itself."""
    try:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                               text=True, timeout=30, check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("needs a git checkout to know which files a fresh clone has")
    for f in files:
        if (REPO / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f)
    return dest


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    """An sdist of a clean copy of the checkout, built through setuptools' PEP 517 hook (what
    `python -m build --sdist` calls)."""
    src = _clean_copy(tmp_path_factory.mktemp("checkout"))
    out = tmp_path_factory.mktemp("sdist")
    code = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    res = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True,
                         timeout=300, env=_env())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (out / "build.log").write_text(res.stdout + res.stderr)
    name = res.stdout.strip().splitlines()[-1]
    return out / name


def test_packaging_prints_no_deprecation_warning(sdist):
    """Our pyproject.toml / setup.py use current setuptools forms (the SPDX string for project.license)."""
    log = (sdist.parent / "build.log").read_text()
    assert "Deprecat" not in log, log[-3000:]
    with tarfile.open(sdist) as tf:
        pkg_info = tf.extractfile(f"{sdist.name[:-len('.tar.gz')]}/PKG-INFO").read().decode()
    assert "License-Expression: Apache-2.0" in pkg_info


def _unpack(sdist: Path, dest: Path) -> Path:
    """Unpack ``sdist`` into ``dest`` (emptied first); returns the project folder inside."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    with tarfile.open(sdist) as tf:
        try:  # keeps the files' times: an unchanged source is not recompiled
            tf.extractall(dest, filter="data")
        except TypeError:  # Python without extraction filters (< 3.10.12 / 3.11.4)
            tf.extractall(dest)
    (root,) = [p for p in dest.iterdir() if p.is_dir()]
    return root


def test_sdist_carries_every_build_input(sdist):
    with tarfile.open(sdist) as tf:
        names = tf.getnames()
    prefix = names[0].split("/")[0]
    inside = {n.split("/", 1)[1] for n in names if "/" in n}
    missing = [f for f in _build_inputs() if f not in inside]
    assert not missing, f"{sdist.name} lacks files the build reads: {missing[:20]}"
    assert not [n for n in inside if n.endswith((".so", ".pyd", ".o"))], "build products must not travel"
    assert prefix.startswith("dare_kernels-")


def test_build_without_torch_fails_loudly(sdist, tmp_path):
    """pip's isolated build has no torch: the backend must stop with the fix, not write a wheel without _C."""
    src = _unpack(sdist, tmp_path / "src")
    block = "import sys; sys.modules['torch'] = None\n"  # `import torch` now raises ImportError, as without torch
    hook = block + "from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))"
    out = tmp_path / "wheels"
    out.mkdir()
    res = subprocess.run([sys.executable, "-I", "-c", hook, str(out)], cwd=src, capture_output=True, text=True,
                         timeout=300, env=_env())
    assert res.returncode != 0, "a build without torch must fail"
    msg = res.stdout + res.stderr
    assert "torch is not importable" in msg and "--no-build-isolation" in msg, msg[-3000:]
    assert "DARE_KERNELS_BUILD_EXT=0" in msg
    assert not list(out.glob("*.whl"))

    # the explicit pure-Python escape hatch still builds (a wheel without _C, asked for by name)
    res = subprocess.run([sys.executable, "-I", "-c", hook, str(out)], cwd=src, capture_output=True, text=True,
                         timeout=300, env=_env(DARE_KERNELS_BUILD_EXT="0"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (whl,) = out.glob("*.whl")
    with zipfile.ZipFile(whl) as zf:
        assert not [n for n in zf.namelist() if "/_C" in n]


def test_a_failed_extension_build_fails_the_build(sdist, tmp_path):
    """README, docs/BUILD.md and setup.py: a failed extension build fails the install, whatever the switches
    say (only DARE_KERNELS_BUILD_EXT=0 builds without the extension); no wheel without _C is written."""
    pytest.importorskip("torch")
    if not (shutil.which("ninja") or _has_module("ninja")) or not (shutil.which("cmake") or _has_module("cmake")):
        pytest.skip("cmake and ninja are needed to run the extension build")
    src = _unpack(sdist, tmp_path / "src")
    cmakelists = src / "CMakeLists.txt"
    cmakelists.write_text('message(FATAL_ERROR "planted configure failure")\n' + cmakelists.read_text())
    hook = "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))"
    out = tmp_path / "wheels"
    out.mkdir()
    for require in ("1", "0"):  # DARE_KERNELS_REQUIRE_EXT only says whether the tests need _C; the build fails
        env = _env(DARE_KERNELS_BUILD_DIR=str(tmp_path / f"cmake-{require}"), DARE_KERNELS_CUDA="0",
                   DARE_KERNELS_REQUIRE_EXT=require)
        env.pop("DARE_KERNELS_BUILD_EXT", None)
        res = subprocess.run([sys.executable, "-c", hook, str(out)], cwd=src, capture_output=True, text=True,
                             timeout=600, env=env)
        assert res.returncode != 0, "a failed extension build must fail the build"
        assert "planted configure failure" in res.stdout + res.stderr
        assert not list(out.glob("*.whl"))


@pytest.mark.slow
def test_wheel_from_sdist_contains_a_loadable_extension(sdist, tmp_path):
    pytest.importorskip("torch")
    if not (shutil.which("ninja") or _has_module("ninja")) or not (shutil.which("cmake") or _has_module("cmake")):
        pytest.skip("cmake and ninja are needed to build the extension (pip install 'cmake>=3.26' ninja)")
    src = _unpack(sdist, WORK / "src")
    wheels = tmp_path / "wheels"
    env = _env(DARE_KERNELS_BUILD_DIR=str(WORK / "cmake"), MAX_JOBS=os.environ.get("MAX_JOBS", "2"),
               DARE_KERNELS_CUDA=os.environ.get("DARE_KERNELS_CUDA", "auto"))
    env.pop("DARE_KERNELS_BUILD_EXT", None)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-cache-dir",
           "--disable-pip-version-check", "-w", str(wheels), str(src)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=WHEEL_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the wheel build took over {WHEEL_TIMEOUT_S} s")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    (whl,) = wheels.glob("dare_kernels-*.whl")
    with zipfile.ZipFile(whl) as zf:
        ext = [n for n in zf.namelist() if n.startswith("dare_kernels/_C") and n.endswith((".so", ".pyd"))]
        assert ext, f"{whl.name} has no dare_kernels/_C: {zf.namelist()[:30]}"
        target = tmp_path / "site"
        zf.extractall(target)
    # import from the unpacked wheel only (-I: no cwd, no PYTHONPATH; the wheel's folder first on sys.path)
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "import dare_kernels, dare_kernels._C\n"
            "from dare_kernels import _ext\n"
            "assert dare_kernels.__file__.startswith(sys.argv[1]), dare_kernels.__file__\n"
            "assert _ext.EXT is not None, _ext.EXT_ERROR\n"
            "print('loaded', dare_kernels._C.__file__)\n")
    res = subprocess.run([sys.executable, "-I", "-c", code, str(target)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=_env())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "loaded" in res.stdout and str(target) in res.stdout


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
