"""Compile the SRA Triton kernels for a GPU architecture without a GPU: catches compile errors and reports
shared memory, registers and spills (from Triton's bundled ptxas) per kernel and configuration.

    python -m dare_kernels.triton.aot_check              # sm_90 and sm_80, the configurations below
    python -m dare_kernels.triton.aot_check --arch 90 --quick

Must run without ``TRITON_INTERPRET=1`` (the kernels have to be real ``@triton.jit`` functions). Strides
of the innermost dims are specialised to 1 and pointers / other strides marked divisible by 16, as Triton's
JIT does for aligned contiguous inputs; sizes (N, M, D) stay general.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile

_FLOAT_ARGS = ("qk_scale", "strength", "inv_heads", "sm_scale")
_UNIT_STRIDES = ("sqd", "skd", "svd", "sod", "sdod", "sdqd", "sdkd", "sdvd", "sam", "swm", "smm", "sgm")
_TENSORS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV_")
_FP32_PTRS = ("W", "LSE", "AMAP", "DELTA", "GLSE", "GMAP", "DW")

# (kernel, constexprs, num_warps, num_stages): the shapes that matter (D=64/128/256, one-block and online)
PLANS = [
    ("sra_fwd_kernel", dict(BLOCK_N=128, BLOCK_M=64, BLOCK_D=128, BLOCK_DV=128), 8, 3),
    ("sra_fwd_kernel", dict(BLOCK_N=128, BLOCK_M=128, BLOCK_D=128, BLOCK_DV=128), 8, 3),
    ("sra_fwd_kernel", dict(BLOCK_N=128, BLOCK_M=64, BLOCK_D=64, BLOCK_DV=64), 4, 3),
    ("sra_fwd_kernel", dict(BLOCK_N=64, BLOCK_M=32, BLOCK_D=256, BLOCK_DV=256), 8, 2),
    ("sra_fwd_map_kernel", dict(BLOCK_N=32, BLOCK_M=128, BLOCK_D=64, BLOCK_DV=64), 4, 2),
    ("sra_fwd_map_kernel", dict(BLOCK_N=64, BLOCK_M=128, BLOCK_D=64, BLOCK_DV=64), 8, 2),
    ("sra_map_kernel", dict(BLOCK_N=64, BLOCK_M=64, BLOCK_D=64), 4, 3),
    ("sra_bwd_delta_kernel", dict(BLOCK_N=64, BLOCK_M=64, BLOCK_D=64, BLOCK_DV=64, HAS_GLSE=True, HAS_GMAP=True),
     4, 2),
    ("sra_bwd_dkdv_kernel", dict(BLOCK_N=64, BLOCK_M=64, BLOCK_D=128, BLOCK_DV=128, HAS_GMAP=False), 4, 3),
    ("sra_bwd_dkdv_kernel", dict(BLOCK_N=64, BLOCK_M=128, BLOCK_D=128, BLOCK_DV=128, HAS_GMAP=True), 8, 3),
    ("sra_bwd_dq_kernel", dict(BLOCK_N=64, BLOCK_M=64, BLOCK_D=128, BLOCK_DV=128, HAS_GMAP=False), 4, 3),
    ("sra_bwd_dq_kernel", dict(BLOCK_N=128, BLOCK_M=64, BLOCK_D=128, BLOCK_DV=128, HAS_GMAP=True), 8, 3),
]
QUICK_PLANS = [
    ("sra_fwd_kernel", dict(BLOCK_N=64, BLOCK_M=32, BLOCK_D=64, BLOCK_DV=64), 4, 2),
    ("sra_fwd_map_kernel", dict(BLOCK_N=32, BLOCK_M=64, BLOCK_D=64, BLOCK_DV=64), 4, 2),
    ("sra_map_kernel", dict(BLOCK_N=32, BLOCK_M=32, BLOCK_D=64), 4, 2),
    ("sra_bwd_delta_kernel", dict(BLOCK_N=32, BLOCK_M=32, BLOCK_D=64, BLOCK_DV=64, HAS_GLSE=True, HAS_GMAP=True),
     4, 2),
    ("sra_bwd_dkdv_kernel", dict(BLOCK_N=32, BLOCK_M=32, BLOCK_D=64, BLOCK_DV=64, HAS_GMAP=True), 4, 2),
    ("sra_bwd_dq_kernel", dict(BLOCK_N=32, BLOCK_M=32, BLOCK_D=64, BLOCK_DV=64, HAS_GMAP=True), 4, 2),
]


def compile_kernel(name: str, constexprs: dict, arch: int, num_warps: int, num_stages: int,
                   dtype: str = "bf16", ieee: int = 0) -> dict:
    """Compile kernel ``name`` for sm_``arch``; returns {shared, regs, spill_bytes, ptxas} (raises on errors)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import _sra_kernels as K

    fn = getattr(K, name)
    if not hasattr(fn, "fn"):
        raise RuntimeError("the kernels were built for TRITON_INTERPRET=1; run without it")
    names = list(inspect.signature(fn.fn).parameters)
    cx = dict(HAS_W=True, HAS_MASK=True, IEEE=ieee, **constexprs)
    cx.setdefault("D", constexprs.get("BLOCK_D"))
    cx.setdefault("DV", constexprs.get("BLOCK_DV", constexprs.get("BLOCK_D")))
    cx.update({n: 1 for n in names if n in _UNIT_STRIDES})
    cx = {k: v for k, v in cx.items() if k in names}
    sig = {}
    for n in names:
        if n in cx:
            sig[n] = "constexpr"
        elif n in _TENSORS:
            sig[n] = f"*{dtype}"
        elif n == "MASK":
            sig[n] = "*u8"
        elif n in _FP32_PTRS:
            sig[n] = "*fp32"
        elif n in _FLOAT_ARGS:
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    # what the JIT sees for aligned tensors: pointers and strides divisible by 16 (sizes left general)
    aligned = [n for n in names if sig[n].startswith("*") or (sig[n] == "i32" and n.startswith("s"))]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in cx.items()}, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    info = {"shared": kernel.metadata.shared, "regs": None, "spill_bytes": None, "ptxas": ""}
    ptxas = _ptxas_path()
    if ptxas:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "k.ptx")
            with open(path, "w") as f:
                f.write(kernel.asm["ptx"])
            gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
            res = subprocess.run([ptxas, "--regAllocOptLevel=2", "-lineinfo", f"--gpu-name={gpu}", "-v", path,
                                  "-o", os.path.join(d, "k.o")], capture_output=True, text=True)
            out = res.stderr + res.stdout
        regs = re.findall(r"Used (\d+) registers", out)
        spill = re.findall(r"(\d+) bytes spill stores", out)
        info.update(regs=int(regs[-1]) if regs else None, spill_bytes=int(spill[-1]) if spill else 0, ptxas=out)
    return info


def _ptxas_path() -> str | None:
    try:
        from triton import knobs

        return knobs.nvidia.ptxas.path
    except Exception:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, action="append", help="compute capability x10 (80, 90); repeatable")
    parser.add_argument("--quick", action="store_true", help="one small configuration per kernel")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("aot_check: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)")
        return 2
    failed = 0
    for arch in args.arch or [90, 80]:
        for name, cx, warps, stages in (QUICK_PLANS if args.quick else PLANS):
            label = f"sm_{arch} {name:<22} " + " ".join(f"{k}={v}" for k, v in cx.items()) + f" w{warps} s{stages}"
            try:
                info = compile_kernel(name, cx, arch, warps, stages)
            except Exception as exc:
                failed += 1
                print(f"{label}: FAILED {type(exc).__name__}: {str(exc)[-800:]}", flush=True)
                continue
            print(f"{label}: shared={info['shared']} regs={info['regs']} spill={info['spill_bytes']}B", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
