"""Compile the SRA Triton kernels for a GPU architecture without a GPU and prove their resources: shared
memory (Triton's metadata), registers and spills (the log of Triton's own ptxas run) per kernel and config.

    python -m dare_kernels.triton.aot_check --all          # every pickable case, sm_90 and sm_80; exit 1 on
                                                           # a spill, an over-limit config or a failed compile
    python -m dare_kernels.triton.aot_check --all --write-md bench/results/triton_resources.md
    python -m dare_kernels.triton.aot_check --arch 90 --quick   # one small config per kernel

``--all`` enumerates, per architecture, kernel, padded head dim (40, 64, 80, 128, 160, 256) and dtype
(fp16, bf16, fp32), every config the autotuner can keep after pruning and every config the dispatcher
picks with autotuning off (``_sra_configs``), over every key / map width that changes that choice, and
the fused-map kernel at every ``BLOCK_M`` the dispatcher sends to it. Token weights and the mask are on
(the most code); the backward runs with and without the map gradient. For every fused-map case the
dispatcher's shared-memory formula is compared with the compiled size. Results are cached (keyed on the
kernel source, Triton's version, ptxas and the case) under ``$DARE_KERNELS_AOT_CACHE`` or
``~/.cache/dare_kernels``; ``-j`` compiles in parallel; ``--only 'sm_80/sra_bwd_dq_kernel/*'`` limits a
run to the matching cases. The committed seed of each Triton version
(``bench/results/triton_resources-<version>.json``, written with ``--write-seed``) fills the cache when
its fingerprint matches; ``--verify N`` recompiles N of them.

Must run without ``TRITON_INTERPRET=1``. Strides of the innermost dims are specialised to 1 and pointers /
the other specialised strides marked divisible by 16, as Triton's JIT does for aligned contiguous inputs;
the sizes and the strides in ``_sra_kernels.NO_SPECIALIZE`` stay general (``ALIGN=1``: the aligned case).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fnmatch
import functools
import hashlib
import inspect
import io
import itertools
import json
import os
import random
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

from .. import switches
from . import _sra_configs as C

HEAD_DIMS = (40, 64, 80, 128, 160, 256)
DTYPES = ("fp16", "bf16", "fp32")
ARCHS = (90, 80)
# key counts / map widths standing for every class the pruning and heuristics distinguish (next_pow2)
M_CLASSES = (16, 32, 64, 128, 256, 512, 1024)

_FLOAT_ARGS = ("qk_scale", "strength", "inv_heads", "sm_scale")
_UNIT_STRIDES = ("sqd", "skd", "svd", "sod", "sdod", "sdqd", "sdkd", "sdvd", "sam", "swm", "smm", "sgm")
_TENSORS = ("Q", "K", "V", "O", "DO", "DQ")
# (dk / dv are written as float32 partials, one slot per query split: sra_attention_bwd_triton)
_FP32_PTRS = ("W", "LSE", "AMAP", "DELTA", "GLSE", "GMAP", "DW", "DK", "DV_")

# (kernel, constexprs, num_warps, num_stages): one small config per kernel
QUICK_PLANS = [
    ("sra_fwd_kernel", dict(BLOCK_N=64, BLOCK_M=32, BLOCK_D=64, BLOCK_DV=64), 4, 2),
    ("sra_fwd_map_kernel", dict(BLOCK_N=32, BLOCK_M=64, BLOCK_D=64, BLOCK_DV=64), 4, 2),
    ("sra_map_kernel", dict(BLOCK_N=32, BLOCK_M=32, BLOCK_D=64), 4, 2),
    ("sra_bwd_delta_kernel", dict(BLOCK_N=32, BLOCK_M=32, BLOCK_D=64, BLOCK_DV=64, HAS_GLSE=True, HAS_GMAP=True),
     4, 2),
    ("sra_bwd_dkdv_kernel", dict(BLOCK_N=32, BLOCK_M=32, BLOCK_D=64, BLOCK_DV=64, HAS_GMAP=True), 4, 2),
    ("sra_bwd_dq_kernel", dict(BLOCK_N=32, BLOCK_M=32, BLOCK_D=64, BLOCK_DV=64, HAS_GMAP=True), 4, 2),
]


# ---------------------------------------------------------------------------------------------
# the cases: everything the autotuner or the dispatcher can launch
# ---------------------------------------------------------------------------------------------

def _cfg_tuple(c) -> tuple:
    """(BLOCK_N, BLOCK_M or None, num_warps, num_stages) of a triton.Config or a heuristic dict."""
    if isinstance(c, dict):
        return c["BLOCK_N"], c.get("BLOCK_M"), c["num_warps"], c["num_stages"]
    return c.kwargs["BLOCK_N"], c.kwargs.get("BLOCK_M"), c.num_warps, c.num_stages


def pickable(arch: int, D: int, dtype: str) -> list[tuple[str, dict, int, int]]:
    """Every (kernel, constexprs, num_warps, num_stages) that can launch on ``arch`` for head dim D (= Dv)."""
    bd = C.pow2(D)
    ieee = 1 if dtype == "fp32" else 0
    elem = 4 if dtype == "fp32" else 2
    dims = dict(D=D, DV=D, BLOCK_D=bd, BLOCK_DV=bd)
    kw = dict(BLOCK_D=bd, BLOCK_DV=bd, IEEE=ieee, HAS_W=True, HAS_MASK=True)
    cases: dict[tuple, tuple] = {}

    def add(name, cfg, extra=None, fixed_m=None):
        n, m, w, s = _cfg_tuple(cfg)
        cx = dict(dims, BLOCK_N=n, **({"BLOCK_M": m} if m is not None else {}), **(extra or {}))
        if fixed_m is not None:
            cx["BLOCK_M"] = fixed_m
        if name == "sra_map_kernel":
            cx = {k: v for k, v in cx.items() if k not in ("DV", "BLOCK_DV")}
        key = (name, tuple(sorted(cx.items())), w, s)
        cases.setdefault(key, (name, cx, w, s))

    for M in M_CLASSES:
        nargs = dict(M=M, map_start=0, map_stop=M)
        for c in C.prune_fwd(C.fwd_configs(arch), nargs, arch=arch, **kw):
            add("sra_fwd_kernel", c)
        add("sra_fwd_kernel", C.heuristic("sra_fwd_kernel", M, bd, elem, arch))
        for c in C.prune_map(C.map_configs(arch), nargs, arch=arch, **kw):
            add("sra_map_kernel", c)
        add("sra_map_kernel", C.heuristic("sra_map_kernel", M, bd, elem, arch))
        block_m = C.pow2(M)
        if C.use_fused_map(block_m, bd, bd, elem, arch):
            for c in C.prune_fused_map(C.fused_map_configs(arch), nargs, arch=arch, BLOCK_M=block_m, **kw):
                add("sra_fwd_map_kernel", c, fixed_m=block_m)
            add("sra_fwd_map_kernel", C.heuristic("sra_fwd_map_kernel", M, bd, elem, arch), fixed_m=block_m)
        for gmap in (False, True):
            for name in ("sra_bwd_dkdv_kernel", "sra_bwd_dq_kernel"):
                configs, prune = C.TUNED[name]
                for c in prune(configs(arch), nargs, arch=arch, HAS_GMAP=gmap, **kw):
                    add(name, c, {"HAS_GMAP": gmap})
                add(name, C.heuristic(name, M, bd, elem, arch), {"HAS_GMAP": gmap})
    for gmap in (False, True):
        add("sra_bwd_delta_kernel", C.delta_config(bd, elem), {"HAS_GMAP": gmap, "HAS_GLSE": True})
    return list(cases.values())


def all_cases(archs=ARCHS, dims=HEAD_DIMS, dtypes=DTYPES) -> list[dict]:
    out = []
    for arch in archs:
        for D in dims:
            for dtype in dtypes:
                for name, cx, w, s in pickable(arch, D, dtype):
                    out.append(dict(name=name, cx=cx, arch=arch, warps=w, stages=s, dtype=dtype,
                                    ieee=1 if dtype == "fp32" else 0))
    return out


# ---------------------------------------------------------------------------------------------
# compiling one case
# ---------------------------------------------------------------------------------------------

def launch_specialization(name: str, args: tuple, kwargs: dict, arch: int = 90, kernel_fn=None) -> tuple:
    """What decides which binary Triton's JIT runs for ``kernel[grid](*args, **kwargs)``: the
    specialization its own binder computes (argument types, divisibility by 16 / equal to 1 of the
    specialised integers and pointers, constexpr values) plus the launch options, for sm_``arch``,
    without a GPU. ``kernel_fn``: the python function to bind (default: kernel ``name``, with its
    ``do_not_specialize``); pass a raw function to see what an undeclared kernel would specialise."""
    _bound, specialization, options = _binder(name, arch, kernel_fn)(*args, **kwargs)
    return (name, repr(specialization), tuple(sorted(options.items())))


@functools.lru_cache(maxsize=None)
def _binder(name: str, arch: int, kernel_fn):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from . import _sra_kernels as K

    raw = getattr(K, name).fn if kernel_fn is None else kernel_fn
    jf = JITFunction(raw, do_not_specialize=K.no_specialize(raw) if kernel_fn is None else None)
    return create_function_from_signature(jf.signature, jf.params, make_backend(GPUTarget("cuda", arch, 32)))


def compile_kernel(name: str, constexprs: dict, arch: int, num_warps: int, num_stages: int,
                   dtype: str = "bf16", ieee: int = 0) -> dict:
    """Compile kernel ``name`` for sm_``arch``; returns {shared, regs, spill_bytes, ptxas} (raises on errors).

    Registers and spills come from the ``-v`` log of the ptxas run Triton itself makes (same flags as a
    launch), so Triton's cache is bypassed for this compile. The register count is ptxas's own: where a
    kernel's demand is far past 255 registers ptxas can settle on 32 and move the rest to the stack (it
    did for float32 tiles at D=256 with 4 warps on sm_90: "Used 32 registers", 6832 B stack frame, 10 KB
    of spill stores), which the spill bytes catch."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import _sra_kernels as K

    fn = getattr(K, name)
    if not hasattr(fn, "fn"):
        raise RuntimeError("the kernels were built for TRITON_INTERPRET=1; run without it")
    names = list(inspect.signature(fn.fn).parameters)
    cx = dict(HAS_W=True, HAS_MASK=True, IEEE=ieee, ALIGN=1, **constexprs)
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
    # what the JIT sees for aligned tensors: pointers and the specialised strides divisible by 16; the
    # sizes and the strides in NO_SPECIALIZE stay general, as the kernels declare them
    aligned = [n for n in names if sig[n].startswith("*")
               or (sig[n] == "i32" and n.startswith("s") and n not in K.NO_SPECIALIZE)]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in cx.items()}, attrs=attrs)
    log = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope():
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                    options={"num_warps": num_warps, "num_stages": num_stages})
    out = log.getvalue()
    regs = re.findall(r"Used (\d+) registers", out)
    spill = re.findall(r"(\d+) bytes spill stores", out)
    return {"shared": int(kernel.metadata.shared), "regs": int(regs[-1]) if regs else None,
            "spill_bytes": int(spill[-1]) if spill else (0 if regs else None), "ptxas": out}


def _compile_case(case: dict) -> dict:
    t0 = time.perf_counter()
    try:
        info = compile_kernel(case["name"], case["cx"], case["arch"], case["warps"], case["stages"],
                              case["dtype"], case["ieee"])
        info.pop("ptxas")
        info["error"] = None
    except Exception as exc:  # reported as a failed row
        info = {"shared": None, "regs": None, "spill_bytes": None, "error": f"{type(exc).__name__}: {str(exc)[-400:]}"}
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return info


# ---------------------------------------------------------------------------------------------
# cache
# ---------------------------------------------------------------------------------------------

def _fingerprint() -> str:
    """Everything besides the case that decides a compile: kernel source, Triton, ptxas."""
    import triton
    from triton import knobs

    from . import _sra_kernels as K

    ptxas = knobs.nvidia.ptxas.path
    try:
        pv = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    except Exception:
        pv = "?"
    src = inspect.getsource(K)  # (with the triton version: what decides a compile of a given case)
    return hashlib.sha256(f"{triton.__version__}|{pv}|{src}".encode()).hexdigest()[:20]


def _case_key(case: dict) -> str:
    return json.dumps([case["name"], sorted(case["cx"].items()), case["arch"], case["warps"], case["stages"],
                       case["dtype"], case["ieee"]])


def _cache_path(fp: str) -> str:
    root = switches.get("DARE_KERNELS_AOT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                      "dare_kernels")
    return os.path.join(root, f"aot_check-{fp}.json")


# the committed results of the last full run on each Triton version (written with --write-seed or
# --write-md): a seed for the cache when the fingerprint matches, so that CI compiles only what changed
# plus the --verify sample. One file per version: the resources differ between Triton releases.
RESULTS = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "results")


def seed_path(version: str | None = None) -> str:
    """bench/results/triton_resources-<triton version>.json (default: the running Triton)."""
    if version is None:
        import triton

        version = triton.__version__
    return os.path.join(RESULTS, f"triton_resources-{version.split('+')[0]}.json")


def _load_seed(fp: str) -> dict:
    try:
        with open(seed_path()) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data.get("results", {}) if data.get("fingerprint") == fp else {}


def _write_seed(fp: str, results) -> None:
    import triton

    data = {"fingerprint": fp, "triton": triton.__version__,
            "failing": sum(1 for _, _, p in results if p),
            "results": {_case_key(c): {k: info[k] for k in ("shared", "regs", "spill_bytes", "error")}
                        for c, info, _ in results}}
    with open(seed_path(), "w") as f:
        json.dump(data, f, indent=0, sort_keys=True)
        f.write("\n")


def case_label(case: dict) -> str:
    """``sm_<arch>/<kernel>/D<head dim>/<dtype>``: what ``--only`` patterns match."""
    return f"sm_{case['arch']}/{case['name']}/D{case['cx']['D']}/{case['dtype']}"


def _load_cache(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _save_cache(path: str, cache: dict) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, path)
    except OSError as exc:
        print(f"aot_check: cannot write the cache {path}: {exc}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# judging and reporting
# ---------------------------------------------------------------------------------------------

def _config_label(case: dict) -> str:
    cx = case["cx"]
    parts = [f"BLOCK_N={cx['BLOCK_N']}"]
    if "BLOCK_M" in cx:
        parts.append(f"BLOCK_M={cx['BLOCK_M']}")
    parts += [f"{k}={int(v)}" for k, v in sorted(cx.items()) if k.startswith("HAS_")]
    return " ".join(parts) + f" w{case['warps']} s{case['stages']}"


def judge(case: dict, info: dict) -> list[str]:
    """The reasons this case fails (empty: it passes)."""
    if info.get("error"):
        return [f"compile failed: {info['error']}"]
    problems = []
    limit = C.smem_limit(case["arch"])
    if info["shared"] > limit:
        problems.append(f"shared {info['shared']} B > {limit} B")
    if info["spill_bytes"] is None:
        problems.append("no ptxas log (registers / spills unknown)")
    elif info["spill_bytes"] > 0:
        problems.append(f"spills {info['spill_bytes']} B")
    est = formula_estimate(case)
    if est is not None and info["shared"] > est:
        problems.append(f"compiled shared {info['shared']} B > the dispatcher's estimate {est} B")
    return problems


def formula_estimate(case: dict) -> int | None:
    """The dispatcher's shared-memory estimate for this case, where it has one (the fused-map kernel)."""
    if case["name"] != "sra_fwd_map_kernel":
        return None
    cx = case["cx"]
    return C.fused_map_smem(cx["BLOCK_N"], cx["BLOCK_M"], cx["BLOCK_D"], cx["BLOCK_DV"],
                            4 if case["dtype"] == "fp32" else 2)


def _row(case: dict, info: dict, problems: list[str]) -> str:
    est = formula_estimate(case)
    extra = f" estimate={est}" if est is not None else ""
    status = "ok" if not problems else "FAIL " + "; ".join(problems)
    return (f"sm_{case['arch']} {case['name']:<21} {_config_label(case):<44} D={case['cx']['D']:<3} "
            f"{case['dtype']}: shared={info['shared']} regs={info['regs']} spill={info['spill_bytes']}B{extra}"
            f" [{status}]")


def write_markdown(path: str, results: list[tuple[dict, dict, list]], seconds: float, jobs: int,
                   n_compiled: int) -> None:
    import triton

    n_fail = sum(1 for _, _, p in results if p)
    lines = [
        "# Triton kernel resources (aot_check --all)",
        "",
        f"Generated {datetime.date.today().isoformat()} by `python -m dare_kernels.triton.aot_check --all "
        f"--write-md {path}` with triton {triton.__version__} (its bundled ptxas), without a GPU: every kernel x "
        "every config the autotuner (after pruning) or the dispatcher (autotuning off) can pick x padded head "
        "dim x dtype, for sm_90 (limit 232448 B shared per block) and sm_80 (166912 B). Token weights and "
        "mask on; backward with and without the map gradient (HAS_GMAP). `estimate`: the dispatcher's "
        "shared-memory formula (fused-map kernel), which must not be below the compiled size.",
        "",
        f"{len(results)} cases, {n_fail} failing; the run that wrote this file compiled {n_compiled} of them in "
        f"{seconds:.0f} s wall with -j {jobs} (the others came from its cache); the cases' own compile times "
        f"sum to {sum(info.get('seconds') or 0 for _, info, _ in results):.0f} s.",
        "",
        "Every Triton version the pins allow, from its committed seed (`aot_check --all --write-seed` under "
        "that version; `make test` recompiles a sample of each):",
        "",
        *_seed_summaries(),
        "",
        "| arch | kernel | config | D | dtype | shared B | regs | spill B | estimate B | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case, info, problems in results:
        est = formula_estimate(case)
        lines.append(f"| sm_{case['arch']} | {case['name']} | {_config_label(case)} | {case['cx']['D']} | "
                     f"{case['dtype']} | {info['shared']} | {info['regs']} | {info['spill_bytes']} | "
                     f"{'' if est is None else est} | {'ok' if not problems else '; '.join(problems)} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _seed_summaries() -> list[str]:
    import glob

    out = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "triton_resources-*.json"))):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        out.append(f"- triton {data.get('triton')}: {len(data.get('results', {}))} cases, "
                   f"{data.get('failing', '?')} failing (`bench/results/{os.path.basename(path)}`)")
    return out


def run_all(archs, jobs: int, md_path: str | None, use_cache: bool = True, progress: bool = False,
            verify: int = 0, only: list[str] | None = None, write_seed: bool = False) -> int:
    cases = all_cases(archs)
    if only:
        cases = [c for c in cases if any(fnmatch.fnmatch(case_label(c), pat) for pat in only)]
    fp = _fingerprint()
    cache_path = _cache_path(fp)
    cache = {**_load_seed(fp), **_load_cache(cache_path)} if use_cache else {}
    todo = [c for c in cases if _case_key(c) not in cache]
    print(f"aot_check --all: {len(cases)} cases ({len(cases) - len(todo)} cached, fingerprint {fp}), {jobs} jobs",
          flush=True)
    # a random sample of the cached results is compiled again and must match exactly
    cached = [c for c in cases if _case_key(c) in cache]
    sample = random.Random().sample(cached, min(verify, len(cached)))
    mismatched = 0
    if sample:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for case, info in zip(sample, pool.map(_compile_case, sample)):
                old = cache[_case_key(case)]
                same = all(info[k] == old[k] for k in ("shared", "regs", "spill_bytes"))
                mismatched += not same
                print(f"  verify {'ok' if same else 'MISMATCH'}: " + _row(case, info, judge(case, info))
                      + ("" if same else f" (cached: {old})"), flush=True)
    t0 = time.perf_counter()
    # the biggest tiles first so that the pool does not end on one long compile, kernels interleaved
    todo.sort(key=lambda c: -c["cx"]["BLOCK_N"] * c["cx"].get("BLOCK_M", 64) * c["cx"]["BLOCK_D"])
    by_kernel: dict[str, list] = {}
    for c in todo:
        by_kernel.setdefault(c["name"], []).append(c)
    todo = [c for group in itertools.zip_longest(*by_kernel.values()) for c in group if c is not None]
    done = 0
    if todo:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(_compile_case, c): c for c in todo}
            for fut in as_completed(futures):
                case = futures[fut]
                info = fut.result()
                cache[_case_key(case)] = info
                done += 1
                if progress:
                    print(f"  [{done}/{len(todo)} {time.perf_counter() - t0:.0f} s] " + _row(case, info, judge(case, info)),
                          flush=True)
                if use_cache and done % 10 == 0:
                    _save_cache(cache_path, cache)
        if use_cache:
            _save_cache(cache_path, cache)
    seconds = time.perf_counter() - t0
    results = []
    for case in cases:
        info = cache[_case_key(case)]
        problems = judge(case, info)
        results.append((case, info, problems))
        print(_row(case, info, problems))
    n_fail = sum(1 for _, _, p in results if p)
    print(f"aot_check --all: {len(cases)} cases, {len(todo)} compiled in {seconds:.0f} s, {n_fail} failing, "
          f"{mismatched} of {len(sample)} cached results not reproduced", flush=True)
    if (md_path or write_seed) and set(archs) == set(ARCHS) and not only:
        _write_seed(fp, results)  # (first: the markdown lists every version's seed)
    if md_path:
        write_markdown(md_path, results, seconds, jobs, len(todo))
    return 1 if n_fail or mismatched else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, action="append", help="compute capability x10 (80, 90); repeatable")
    parser.add_argument("--quick", action="store_true", help="one small configuration per kernel")
    parser.add_argument("--all", action="store_true", help="every pickable case (see above)")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--write-md", metavar="PATH", help="with --all: write the table as markdown")
    parser.add_argument("--no-cache", action="store_true", help="with --all: compile everything again")
    parser.add_argument("--progress", action="store_true", help="with --all: print each case as it compiles")
    parser.add_argument("--only", action="append", metavar="PATTERN",
                        help="with --all: only the cases whose sm_<arch>/<kernel>/D<d>/<dtype> matches this glob "
                             "(repeatable), e.g. 'sm_80/sra_bwd_dq_kernel/D40/*'")
    parser.add_argument("--write-seed", action="store_true",
                        help="with --all: write bench/results/triton_resources-<triton version>.json")
    parser.add_argument("--verify", type=int, default=0, metavar="N",
                        help="with --all: compile N random cached cases again; a different result fails")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("aot_check: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)")
        return 2
    archs = args.arch or list(ARCHS)
    if args.all:
        return run_all(archs, max(1, args.jobs), args.write_md, use_cache=not args.no_cache, progress=args.progress,
                       verify=args.verify, only=args.only, write_seed=args.write_seed)
    failed = 0
    for arch in archs:
        for name, cx, warps, stages in QUICK_PLANS:
            case = dict(name=name, cx=dict(cx, D=cx["BLOCK_D"]), arch=arch, warps=warps, stages=stages,
                        dtype="bf16", ieee=0)
            info = _compile_case(case)
            problems = judge(case, info)
            failed += bool(problems)
            print(_row(case, info, problems), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
