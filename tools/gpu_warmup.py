#!/usr/bin/env python3
"""The compile stage of the device check (tools/gpu_check.sh): compile up front, in parallel, and keep what was
compiled for a later run.

    python tools/gpu_warmup.py run --device cuda|cpu [--jobs N] [--json FILE]
        drives the public ops (``sra_attention`` forward, map and backward with backend="triton";
        ``rectified_cfg`` with backend="triton") once at every dtype, head dim, flag set and mode the later
        stages use: the selftest's small and model cases, the benchmark's model shapes with and without a
        map, every rectified_cfg mode, branch count and dtype; on a GPU also the benchmark's compiled
        FlexAttention peer at the headline shape (its Inductor compile is the longest one). The cases are
        spread over ``--jobs`` processes (default: every core) that share one TRITON_CACHE_DIR, so each
        Triton specialization is compiled once, on all cores, and every later stage (run with the same
        TRITON_CACHE_DIR) loads it from disk instead of paying 4-13 s of JIT per case. Prints one line per
        case with its seconds. On CPU (the rehearsal) the smallest cases run in Triton's interpreter, which
        compiles nothing: it checks the command path.
    python tools/gpu_warmup.py count CACHE [--json FILE]
        the compiled kernels in a Triton cache, per kernel name (a kernel that recompiles for another N, M
        or B shows up as more binaries after the stages than after the warm-up).
    python tools/gpu_warmup.py pack ARCHIVE [--max-mib 15.5]
        a tar.gz of what a later run needs to skip the build and the compiles: the built extension
        (dare_kernels/_C*.so), TRITON_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR, with a manifest (versions,
        device, commit). Too large for ``--max-mib``: the intermediate IR files (.ttir, .ttgir, .llir,
        .ptx) and then the inductor cache are left out, and the manifest says so.
    python tools/gpu_warmup.py unpack ARCHIVE
        puts the files back (cache folders at TRITON_CACHE_DIR / TORCHINDUCTOR_CACHE_DIR of this run); exit
        1 with the reason when the archive was made with another torch, Triton or GPU kind.

Triton's cache records its files by absolute path (``__grp__*.json``): unpack rewrites those paths to where
the cache now lies, so an archive made in one folder is a cache hit in another.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import json
import multiprocessing as mp
import os
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BINARY_SUFFIXES = (".cubin", ".hsaco")
IR_SUFFIXES = (".ttir", ".ttgir", ".llir", ".ptx", ".amdgcn", ".source")
MANIFEST = "gpu_reuse_manifest.json"


# ---------------------------------------------------------------------------------------------
# the cases: what the later stages call
# ---------------------------------------------------------------------------------------------

def sra_cases(device: str) -> list[dict]:
    """One dict per sra_attention call: shape, dtype, layout, weight shape, mask, map keys, gradients.

    The model shapes come first (the benchmark's headline shape leads): with and without a map, as the
    benchmark's fwd / fwd+map / fwd+bwd / fwd+map+bwd rows call them; then the selftest's small cases."""
    import torch

    from dare_kernels import selftest
    from dare_kernels.benchmarking.shapes import ATTN_SHAPES, SELFTEST_SHAPES, TINY_SHAPES

    cases = []
    shapes = list(TINY_SHAPES.values()) if device == "cpu" else [ATTN_SHAPES[n] for n in SELFTEST_SHAPES]
    for s in shapes:
        for want_map in (True, False):
            cases.append(dict(name=f"{s.name} {'fwd+map+bwd' if want_map else 'fwd+bwd'}", B=s.B, H=s.H, N=s.N,
                              M=s.M, D=s.D, Dv=s.D, dtype=torch.bfloat16, w_shape="bm", mask=True,
                              want_map=want_map, map_keys=s.map_keys, layout="bnhd", joint=s.map_keys is not None,
                              strength=1.0, extra={}, big=True))
    for c in selftest.small_cases(device):
        cases.append(dict(name=f"selftest {c.name}", B=c.B, H=c.H, N=c.N, M=c.M, D=c.D, Dv=c.Dv or c.D,
                          dtype=c.dtype, w_shape=c.w_shape, mask=c.mask, want_map=c.want_map, map_keys=c.map_keys,
                          layout=c.layout, joint=c.joint, strength=c.strength, extra=dict(c.extra), big=False))
    return cases


CFG_MODES = {"cfg": {"guidance_rescale": 0.7}, "cfg_zero_star": {}, "apg": {"eta": 0.3, "norm_threshold": 6.0}}


def cfg_cases(device: str) -> list[dict]:
    """rectified_cfg calls: every mode x branch count x dtype at a small latent, and the benchmark's
    bfloat16 Wan latent with rescale (the chunking of the combine depends on the size)."""
    import torch

    from dare_kernels.benchmarking.shapes import LATENT_SHAPES

    small = (4, 2, 8, 8)
    out = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for mode in CFG_MODES:
            for k in (2, 3):
                out.append(dict(name=f"rectified_cfg {mode} K={k} {str(dtype).split('.')[-1]}", K=k, mode=mode,
                                dtype=dtype, shape=small))
    big = (4, 2, 8, 8) if device == "cpu" else LATENT_SHAPES["wan-81f-480p"]
    out.append(dict(name="rectified_cfg cfg+rescale wan latent bf16", K=2, mode="cfg", dtype=torch.bfloat16,
                    shape=big))
    return out


# ---------------------------------------------------------------------------------------------
# running one case (in a worker process)
# ---------------------------------------------------------------------------------------------

def _inputs(case: dict, device: str):
    import torch

    g = torch.Generator().manual_seed(0)
    B, H, N, M, D, Dv = (case[k] for k in ("B", "H", "N", "M", "D", "Dv"))

    def rnd(rows, d):
        if case["layout"] == "bnhd":  # [B, N, H, D] memory viewed as [B, H, N, D], as diffusers hands it over
            t = torch.randn(B, rows, H, d, generator=g).transpose(1, 2)
        else:
            t = torch.randn(B, H, rows, d, generator=g)
        return t.to(device=device, dtype=case["dtype"])

    q, k, v = rnd(N, D), rnd(M, D), rnd(M, Dv)
    w = None
    if case["w_shape"] is not None:
        w = torch.rand({"m": (M,), "bm": (B, M), "bhm": (B, H, M)}[case["w_shape"]], generator=g) * 1.9 + 0.1
        if case["joint"] and case["map_keys"] is not None:
            w[..., : case["map_keys"][0]] = 1.0
        w = w.to(device)
    mask = None
    if case["mask"]:
        mask = torch.ones(B, M, dtype=torch.bool)
        if M > 4:
            mask[:, M - max(1, M // 10):] = False
        if case["extra"].get("empty_batch") and B > 1:
            mask[1] = False
        mask = mask.to(device)
    return q, k, v, w, mask


def run_sra(case: dict, device: str) -> None:
    """Forward (with the map when the case has one) and backward of the output and the map, as the selftest
    and the benchmark call it (no gradient through the LSE)."""
    import torch

    import dare_kernels as dk

    q, k, v, w, mask = _inputs(case, device)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    wl = None if w is None else w.requires_grad_()
    res = dk.sra_attention(*leaves, wl, key_padding_mask=mask, strength=case["strength"],
                           return_attn_map=case["want_map"], attn_map_keys=case["map_keys"], backend="triton")
    outs = list(res) if isinstance(res, tuple) else [res]
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    if device == "cuda":
        torch.cuda.synchronize()


def run_cfg(case: dict, device: str) -> None:
    import torch

    import dare_kernels as dk

    g = torch.Generator().manual_seed(0)
    preds = torch.randn(case["K"], *case["shape"], generator=g).to(device=device, dtype=case["dtype"])
    kw = dict(CFG_MODES[case["mode"]])
    if case["mode"] == "apg":
        kw.update(momentum=0.5, momentum_buffer=torch.zeros_like(preds[:1]))
    dk.rectified_cfg(preds, 5.0, num_branches=case["K"], mode=case["mode"], backend="triton", **kw)
    if device == "cuda":
        torch.cuda.synchronize()


def run_flex(case: dict, device: str) -> None:
    """The benchmark's compiled FlexAttention peer (per-key-bias score_mod) at the headline shape, forward and
    backward: its Inductor kernels land in TRITON_CACHE_DIR and its graphs in TORCHINDUCTOR_CACHE_DIR, so the
    bench's own compile of the same graph is a cache hit."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v, w, mask = _inputs(case, device)
    w = torch.where(mask, w, torch.zeros_like(w))
    kb = torch.where(w > 0, torch.log(torch.where(w > 0, w, torch.ones_like(w))), float("-inf")).float()

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + kb[b, kv_idx]
    flex = torch.compile(flex_attention, dynamic=False)
    flex(q, k, v, score_mod=score_mod)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = flex(*leaves, score_mod=score_mod)
    torch.autograd.grad(out, leaves, torch.ones_like(out))
    torch.cuda.synchronize()


def _worker_init(device: str) -> None:
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported in this process
    import warnings

    warnings.filterwarnings("ignore")
    import dare_kernels  # noqa: F401  (import cost paid once per worker, not per case)


def _run_case(kind: str, case: dict, device: str) -> tuple[str, float, str]:
    t0 = time.perf_counter()
    try:
        {"sra": run_sra, "cfg": run_cfg, "flex": run_flex}[kind](case, device)
        err = ""
    except Exception as exc:  # noqa: BLE001 - one failing case does not stop the others; the stage fails
        err = f"{type(exc).__name__}: {str(exc)[:300]}"
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
    return case["name"], time.perf_counter() - t0, err


def warm(device: str, jobs: int, json_path: Path | None) -> int:
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    import dare_kernels
    from dare_kernels import backends

    print(f"gpu_warmup: dare_kernels {dare_kernels.__version__} from {Path(dare_kernels.__file__).parent}, "
          f"torch {torch.__version__}", flush=True)
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_warmup: --device cuda but torch sees no CUDA device here", flush=True)
        return 2

    why = backends.unsupported_reason("sra_attention", "triton", torch.device(device), torch.bfloat16)
    if why is not None:
        print(f"gpu_warmup: SKIP: the Triton backend cannot run here: {why}", flush=True)
        return 0
    work = [("sra", c) for c in sra_cases(device)] + [("cfg", c) for c in cfg_cases(device)]
    if device == "cuda":  # the headline shape's compiled FlexAttention peer, its longest compile, starts first
        headline = dict(work[0][1], name=work[0][1]["name"].split()[0] + " flex_attention compiled fwd+bwd")
        work.insert(0, ("flex", headline))
    if device == "cpu":  # the interpreter compiles nothing: the smallest cases check the command path
        work = [w for w in work if w[0] == "sra"][-1:] + [w for w in work if w[0] == "cfg"][:1]
    cache = os.environ.get("TRITON_CACHE_DIR", "(Triton's default)")
    print(f"gpu_warmup: {len(work)} cases on {jobs} processes, device {device}, TRITON_CACHE_DIR {cache}",
          flush=True)
    t0 = time.perf_counter()
    results = []
    ctx = mp.get_context("spawn")  # CUDA cannot be forked; each worker has its own context
    with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init,
                                initargs=(device,)) as pool:
        futures = [pool.submit(_run_case, kind, case, device) for kind, case in work]
        for fut in cf.as_completed(futures):
            name, secs, err = fut.result()
            results.append({"case": name, "seconds": round(secs, 2), "error": err})
            print(f"  {secs:6.1f} s  {name}{'  FAILED ' + err if err else ''}", flush=True)
    wall = time.perf_counter() - t0
    failed = [r for r in results if r["error"]]
    counts = count_binaries(Path(os.environ["TRITON_CACHE_DIR"])) if "TRITON_CACHE_DIR" in os.environ else {}
    summary = {"device": device, "jobs": jobs, "cases": len(results), "failed": len(failed), "wall_s": round(wall, 1),
               "case_seconds_sum": round(sum(r["seconds"] for r in results), 1), "binaries": counts,
               "results": results}
    if json_path:
        json_path.write_text(json.dumps(summary, indent=1))
    print(f"gpu_warmup: {len(results)} cases in {wall:.1f} s on {jobs} processes "
          f"({summary['case_seconds_sum']:.0f} s of case time), {len(failed)} failed; "
          f"{sum(counts.values())} compiled kernels in the cache", flush=True)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# the cache: count, pack, unpack
# ---------------------------------------------------------------------------------------------

def count_binaries(cache: Path) -> dict[str, int]:
    """{kernel name: number of compiled binaries} in the Triton cache ``cache`` (one per specialization
    and launch config)."""
    counts: dict[str, int] = {}
    if not cache.is_dir():
        return counts
    for binary in cache.rglob("*"):
        if binary.suffix in BINARY_SUFFIXES:
            counts[binary.stem] = counts.get(binary.stem, 0) + 1
    return dict(sorted(counts.items()))


def _cache_dirs() -> dict[str, Path]:
    dirs = {}
    for var in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        if os.environ.get(var):
            dirs[var] = Path(os.environ[var]).resolve()
    return dirs


def _fingerprint() -> dict:
    import torch

    fp = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import triton

        fp["triton"] = triton.__version__
    except ImportError:
        fp["triton"] = None
    if torch.cuda.is_available():
        fp["device"] = torch.cuda.get_device_name(0)
        fp["capability"] = "%d.%d" % torch.cuda.get_device_capability(0)
    return fp


def pack(archive: Path, max_mib: float) -> int:
    sos = sorted((ROOT / "dare_kernels").glob("_C*.so"))
    dirs = _cache_dirs()
    from gpu_check_report import project_commit  # tools/ is this script's first path entry

    manifest = {"fingerprint": _fingerprint(), "commit": project_commit(ROOT)[0],
                "extension": [p.name for p in sos], "caches": {k: str(v) for k, v in dirs.items()},
                "binaries": count_binaries(dirs["TRITON_CACHE_DIR"]) if "TRITON_CACHE_DIR" in dirs else {},
                "left_out": []}
    archive.parent.mkdir(parents=True, exist_ok=True)
    for attempt in ("everything", "no IR", "no inductor cache"):
        if attempt == "no IR":
            manifest["left_out"].append("intermediate IR files (" + " ".join(IR_SUFFIXES) + ")")
        if attempt == "no inductor cache" and "TORCHINDUCTOR_CACHE_DIR" in dirs:
            manifest["left_out"].append("TORCHINDUCTOR_CACHE_DIR")
        tmp = archive.with_suffix(".tmp")
        with tarfile.open(tmp, "w:gz", compresslevel=3) as tar:
            for so in sos:
                tar.add(so, arcname=f"extension/{so.name}")
            for var, d in dirs.items():
                if not d.is_dir() or (var == "TORCHINDUCTOR_CACHE_DIR" and attempt == "no inductor cache"):
                    continue
                for f in sorted(d.rglob("*")):
                    if f.is_file() and not (attempt != "everything" and f.suffix in IR_SUFFIXES):
                        tar.add(f, arcname=f"{var}/{f.relative_to(d)}")
            data = json.dumps(manifest, indent=1).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        size = tmp.stat().st_size / 2**20
        tmp.replace(archive)
        if size <= max_mib:
            break
    print(f"gpu_warmup pack: {archive} {size:.1f} MiB: extension {', '.join(manifest['extension']) or 'none'}, "
          f"{sum(manifest['binaries'].values())} compiled Triton kernels"
          + (f"; left out: {'; '.join(manifest['left_out'])}" if manifest["left_out"] else ""), flush=True)
    if size > max_mib:
        print(f"gpu_warmup pack: still {size:.1f} MiB > {max_mib} MiB", flush=True)
        return 1
    return 0


def unpack(archive: Path) -> int:
    if not archive.is_file():
        print(f"gpu_warmup unpack: {archive} does not exist", flush=True)
        return 1
    dirs = _cache_dirs()
    with tarfile.open(archive, "r:gz") as tar:
        manifest = json.loads(tar.extractfile(MANIFEST).read())
        here = _fingerprint()
        theirs = manifest["fingerprint"]
        differ = [f"{k} {theirs.get(k)} there, {here.get(k)} here" for k in ("torch", "triton", "python", "capability")
                  if theirs.get(k) != here.get(k)]
        if differ:
            print(f"gpu_warmup unpack: {archive} was made elsewhere ({'; '.join(differ)}): not used", flush=True)
            return 1
        n = 0
        for m in tar.getmembers():
            if not m.isfile() or m.name == MANIFEST:
                continue
            top, _, rel = m.name.partition("/")
            if ".." in Path(rel).parts:
                continue
            if top == "extension":
                dest = ROOT / "dare_kernels" / rel
            elif top in dirs:
                dest = dirs[top] / rel
            else:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(tar.extractfile(m).read())
            n += 1
    fixed = 0
    if "TRITON_CACHE_DIR" in dirs and "TRITON_CACHE_DIR" in manifest["caches"]:
        old, new = manifest["caches"]["TRITON_CACHE_DIR"], str(dirs["TRITON_CACHE_DIR"])
        for grp in dirs["TRITON_CACHE_DIR"].rglob("__grp__*.json"):
            data = json.loads(grp.read_text())
            paths = data.get("child_paths", {})
            data["child_paths"] = {k: p.replace(old, new, 1) if p.startswith(old) else p for k, p in paths.items()}
            grp.write_text(json.dumps(data))
            fixed += 1
    print(f"gpu_warmup unpack: {n} files from {archive} (commit {manifest.get('commit')}, "
          f"{sum(manifest.get('binaries', {}).values())} compiled kernels, {fixed} cache groups re-rooted)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("--device", choices=("cuda", "cpu"), required=True)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", type=Path, default=None)
    p = sub.add_parser("count")
    p.add_argument("cache", type=Path)
    p.add_argument("--json", type=Path, default=None)
    p = sub.add_parser("pack")
    p.add_argument("archive", type=Path)
    p.add_argument("--max-mib", type=float, default=15.5)
    p = sub.add_parser("unpack")
    p.add_argument("archive", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        return warm(args.device, max(1, args.jobs), args.json)
    if args.cmd == "count":
        counts = count_binaries(args.cache)
        for name, n in counts.items():
            print(f"  {n:4d}  {name}")
        print(f"gpu_warmup count: {sum(counts.values())} compiled kernels in {args.cache}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(counts, indent=1))
        return 0
    if args.cmd == "pack":
        return pack(args.archive, args.max_mib)
    return unpack(args.archive)


if __name__ == "__main__":
    sys.exit(main())
