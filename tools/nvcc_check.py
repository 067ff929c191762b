#!/usr/bin/env python3
"""Compile-check every CUDA kernel file with plain nvcc (no torch, no GPU) and fail on any register spill.

Compiles each ``csrc/cuda/*.cu`` for every target of the build's default ``TORCH_CUDA_ARCH_LIST``
(read from CMakeLists.txt, "8.0;9.0a;9.0+PTX": SASS for sm_80, sm_90a and sm_90, and compute_90 PTX that
newer GPUs compile at load time) with ``-std=c++17 -O3 -Xptxas -v,-warn-spills``, parses ptxas' report
and prints one row per kernel: registers, stack frame, spill stores/loads and static shared memory
(dynamic shared memory is sized at launch; see each kernel file). A PTX target has no ptxas report: it
must compile without a warning. Exit status 0 when everything compiles with no spills, 1 otherwise, 2
when no CUDA toolkit is found.

    python tools/nvcc_check.py [--jobs 2] [--arch sm_80 --arch compute_90 | --arch-list "8.0;9.0a;9.0+PTX"]
                               [--markdown bench/results/nvcc_resources.md]
"""

from __future__ import annotations

import argparse
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_CMAKE_ARCH_LIST = re.compile(r'set\(ENV\{TORCH_CUDA_ARCH_LIST\}\s+"([^"]+)"\)')


def build_arch_list() -> str:
    """The default TORCH_CUDA_ARCH_LIST of the build (CMakeLists.txt), e.g. "8.0;9.0a;9.0+PTX"."""
    try:
        m = _CMAKE_ARCH_LIST.search((ROOT / "CMakeLists.txt").read_text())
    except OSError:
        m = None
    return m.group(1) if m else "8.0;9.0a"


def parse_arch_list(arch_list: str) -> tuple[list[str], list[str]]:
    """nvcc targets of a TORCH_CUDA_ARCH_LIST string, as torch's CMake reads it: (SASS archs, PTX archs).

    "X.Y" (optionally with an "a" / "f" suffix) gives SASS sm_XY; "+PTX" adds PTX compute_XY as well as
    the SASS (so "9.0+PTX" is sm_90 and compute_90). Named generations ("Hopper") are not accepted here.
    """
    sass: list[str] = []
    ptx: list[str] = []
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        if not entry:
            continue
        with_ptx = entry.endswith("+PTX")
        entry = entry.removesuffix("+PTX")
        m = re.fullmatch(r"(\d+)\.(\d)([af]?)", entry)
        if m is None:
            raise ValueError(f"arch list entry {entry!r}: expected X.Y, X.Ya or X.Y+PTX (in {arch_list!r})")
        num = m.group(1) + m.group(2) + m.group(3)
        if f"sm_{num}" not in sass:
            sass.append(f"sm_{num}")
        if with_ptx and f"compute_{num}" not in ptx:
            ptx.append(f"compute_{num}")
    return sass, ptx


DEFAULT_ARCHS, DEFAULT_PTX = (tuple(x) for x in parse_arch_list(build_arch_list()))


# the toolkit finder of setup.py (loaded by path: this tool runs without importing the package or torch)
cuda_root = runpy.run_path(str(ROOT / "dare_kernels" / "_cuda_toolkit.py"))["cuda_root"]


@dataclass
class KernelRow:
    kernel: str
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0


@dataclass
class Result:
    file: str
    arch: str
    ok: bool
    seconds: float
    kernels: list[KernelRow] = field(default_factory=list)
    log: str = ""


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\S+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse_ptxas(text: str) -> list[KernelRow]:
    """Kernel rows from ptxas' -v report (entry functions only)."""
    rows: dict[str, KernelRow] = {}
    current = None
    props_for = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = rows.setdefault(m.group(1), KernelRow(m.group(1)))
            continue
        if m := _PROPS.search(line):
            props_for = m.group(1)
            continue
        if m := _FRAME.search(line):
            if props_for in rows:
                r = rows[props_for]
                r.stack, r.spill_stores, r.spill_loads = (int(x) for x in m.groups())
            continue
        if current is not None and (m := _USED.search(line)):
            current.registers = int(m.group(1))
            if s := _SMEM.search(line):
                current.smem = int(s.group(1))
    names = _demangle(list(rows))
    for r in rows.values():
        r.kernel = names.get(r.kernel, r.kernel)
    return list(rows.values())


def compile_one(nvcc: Path, src: Path, arch: str, extra: list[str]) -> Result:
    """Compile ``src`` for ``arch``: "sm_XY[a]" (SASS, with ptxas' report) or "compute_XY" (PTX only)."""
    t0 = time.perf_counter()
    if arch.startswith("compute_"):  # PTX embedded as is: no ptxas run, so no resource report
        target = [f"-gencode=arch={arch},code={arch}"]
    else:
        target = [f"-arch={arch}", "-Xptxas", "-v,-warn-spills"]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(nvcc), "-std=c++17", "-O3", *target, "-lineinfo",
               f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc'}", "-c", str(src), "-o",
               str(Path(tmp) / "out.o"), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    kernels = parse_ptxas(log)
    spills = any(k.spill_stores or k.spill_loads for k in kernels)
    bad_warning = re.search(r"\bwarning\b", log) is not None  # nvcc/ptxas warnings count as failures
    return Result(str(src.relative_to(ROOT)), arch, proc.returncode == 0 and not spills and not bad_warning,
                  time.perf_counter() - t0, kernels, log)


def _short(name: str) -> str:
    name = name.replace("(anonymous namespace)::", "").replace("dare::cuda::", "")
    return re.sub(r"\(.*\)$", "", name)


def table(results: list[Result]) -> str:
    lines = ["| file | arch | kernel | registers | stack B | spill st/ld B | static smem B |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        if r.arch.startswith("compute_"):
            lines.append(f"| {Path(r.file).name} | {r.arch} | PTX only ({'compiles' if r.ok else 'FAILS'}; "
                         "ptxas runs at load time on the GPU) | | | | |")
        for k in sorted(r.kernels, key=lambda k: k.kernel):
            lines.append(f"| {Path(r.file).name} | {r.arch} | `{_short(k.kernel)}` | {k.registers} | {k.stack} | "
                         f"{k.spill_stores}/{k.spill_loads} | {k.smem} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append",
                    help="sm_XY[a] or compute_XY (PTX), repeatable; default: the targets of --arch-list")
    ap.add_argument("--arch-list", default=None,
                    help=f"a TORCH_CUDA_ARCH_LIST string (default: the build's, {build_arch_list()!r})")
    ap.add_argument("--jobs", type=int, default=2, help="parallel nvcc processes (default 2)")
    ap.add_argument("--markdown", type=Path, help="also write the table to this file")
    ap.add_argument("files", nargs="*", type=Path, help="default: every csrc/cuda/*.cu")
    args = ap.parse_args(argv)

    root = cuda_root()
    if root is None:
        print("nvcc_check: no CUDA toolkit found (set CUDA_HOME)", file=sys.stderr)
        return 2
    nvcc = root / "bin" / "nvcc"
    files = [f.resolve() for f in args.files] or sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    if not files:
        print("nvcc_check: no .cu files", file=sys.stderr)
        return 1
    if args.arch:
        archs = list(args.arch)
    else:
        sass, ptx = parse_arch_list(args.arch_list) if args.arch_list else (DEFAULT_ARCHS, DEFAULT_PTX)
        archs = [*sass, *ptx]
    jobs = [(f, a) for f in files for a in archs]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, min(args.jobs, 2))) as pool:
        results = list(pool.map(lambda fa: compile_one(nvcc, fa[0], fa[1], []), jobs))
    wall = time.perf_counter() - t0

    text = table(results)
    print(text)
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"\nFAILED {r.file} [{r.arch}]:\n{r.log}", file=sys.stderr)
    print(f"\n{len(results) - len(failed)}/{len(results)} compiles clean (no spills, no warnings); "
          f"nvcc {root}, {wall:.1f} s wall")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(
            "# CUDA kernel resources (ptxas -v)\n\nGenerated by `python tools/nvcc_check.py --markdown "
            f"{args.markdown}` with {root / 'bin' / 'nvcc'}; `-O3 -std=c++17`; targets {', '.join(archs)} "
            f"(TORCH_CUDA_ARCH_LIST {args.arch_list or build_arch_list()!r}). Static shared memory only: "
            "the SRA kernels size their dynamic shared memory at launch (see the kernel files).\n\n"
            + text + "\n")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
