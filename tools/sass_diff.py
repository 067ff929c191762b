#!/usr/bin/env python3
"""Compare the machine code of the CUDA kernels at a git revision with the working tree (no GPU needed).

For a refactor of csrc/cuda that should not change what runs: compiles every ``csrc/cuda/*.cu`` of REV
(``git archive``) and of the working tree with the flags of ``nvcc_check.py`` (without ``-lineinfo``), for
every target of the build's arch list, and compares the SASS (``cuobjdump -sass``) and the PTX. The hash
nvcc puts in anonymous-namespace names (it depends on the file's text) is masked. Each row says:
``identical``; ``registers renamed`` (same instructions in the same order); ``rescheduled`` (the same
instructions in another order); or ``differs``. Exit status 0 when every row is identical, 1 otherwise,
2 when no toolkit or cuobjdump is found.

    python tools/sass_diff.py [REV]   (default HEAD)
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nvcc_check import DEFAULT_ARCHS, DEFAULT_PTX, ROOT, cuda_root

_ANON = re.compile(r"_GLOBAL__N__[0-9a-f]+_[0-9]+_\w+?_[0-9a-f]{8}")
_ENCODING = re.compile(r"/\* 0x[0-9a-f]+ \*/")
_REGISTER = re.compile(r"\b(U?R|%r|%rd|%rs|%f|%fd|%p)[0-9]+\b")


def cuobjdump(root: Path) -> Path | None:
    """The toolkit's cuobjdump, else the one Triton ships (its NVIDIA backend bundles the binary tools)."""
    for cand in (root / "bin" / "cuobjdump", shutil.which("cuobjdump")):
        if cand and Path(cand).exists():
            return Path(cand)
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        cand = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if cand.exists():
            return cand
    return None


def machine_code(nvcc: Path, dump: Path, src_root: Path, name: str, arch: str) -> list[str]:
    """SASS (sm_XY) or PTX (compute_XY) of src_root/csrc/cuda/name, hash-masked, blank and comment lines dropped."""
    src = src_root / "csrc" / "cuda" / name
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        kind = ["-ptx"] if arch.startswith("compute_") else ["-cubin"]
        subprocess.run([str(nvcc), "-std=c++17", "-O3", f"-arch={arch}", *kind, f"-I{src_root / 'csrc' / 'include'}",
                        f"-I{src_root / 'csrc'}", str(src), "-o", str(out)], check=True, capture_output=True)
        text = out.read_text() if kind == ["-ptx"] else subprocess.run(
            [str(dump), "-sass", str(out)], check=True, capture_output=True, text=True).stdout
    lines = (_ANON.sub("ANON", ln).strip() for ln in text.splitlines())
    return [ln for ln in lines if ln and not ln.startswith(("//", ".file", ".loc"))]


def verdict(old: list[str], new: list[str]) -> str:
    if old == new:
        return "identical"
    strip = [[_REGISTER.sub(r"\1", _ENCODING.sub("", ln)).split() for ln in code] for code in (old, new)]
    if strip[0] == strip[1]:
        return "registers renamed"
    unplaced = [sorted(" ".join(w[1:] if w and w[0].startswith("/*") else w) for w in s) for s in strip]
    return "rescheduled" if unplaced[0] == unplaced[1] else "differs"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", nargs="?", default="HEAD", help="git revision to compare against (default HEAD)")
    args = ap.parse_args(argv)
    root = cuda_root()
    dump = cuobjdump(root) if root else None
    if root is None or dump is None:
        print("sass_diff: no CUDA toolkit (set CUDA_HOME) or no cuobjdump found", file=sys.stderr)
        return 2
    nvcc = root / "bin" / "nvcc"
    with tempfile.TemporaryDirectory() as tmp:
        old_root = Path(tmp)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.rev, "csrc"], check=True,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
                tar.extractall(old_root, filter="data")
            else:
                tar.extractall(old_root)
        files = sorted(p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
        jobs = [(name, arch) for name in files for arch in (*DEFAULT_ARCHS, *DEFAULT_PTX)]

        def compare(job: tuple[str, str]) -> str:
            name, arch = job
            if not (old_root / "csrc" / "cuda" / name).exists():
                return "new file"
            old = machine_code(nvcc, dump, old_root, name, arch)
            new = machine_code(nvcc, dump, ROOT, name, arch)
            return verdict(old, new)

        with ThreadPoolExecutor(max_workers=2) as pool:
            verdicts = list(pool.map(compare, jobs))
    for (name, arch), v in zip(jobs, verdicts):
        print(f"{name:28s} {arch:12s} {v}")
    return 0 if all(v == "identical" for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
