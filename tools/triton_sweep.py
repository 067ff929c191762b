"""Time the candidate launch configs of the SRA Triton kernels at the headline shapes on a GPU and write the
chosen table: one call, time-boxed (the device check runs it in its second part).

    python tools/triton_sweep.py --out DIR --budget-s 240            # GPU: DIR/triton_sweep-sm_<arch>.json
    python tools/triton_sweep.py --out DIR --budget-s 240 --install  # ... and into the package's table
    python tools/triton_sweep.py --out DIR --budget-s 60 --rehearse  # CPU: same code path, interpreter,
                                                                     # tiny shapes (CI)

For each kernel (forward, map from the LSE, dk/dv, dq) and head-dim class, every tile of
``_sra_configs.candidate_tiles`` (the spill-free lists that ``aot_check --all`` proves on every supported
Triton) is forced in turn and the op stage that launches it is timed at the shapes of that class:
Wan-1.3B cross-attention (B1 H12 N32760 M512 D128), LTX-Video (B1 H32 N6144 M128 D64) and CogVideoX joint
attention (B1 H30 N=M=17776 D64, map over the 226 text keys), bfloat16, token weights and a mask on. The
tile with the least summed time per (kernel, class) is the choice. The table records the device, date,
project commit (``GPU_CHECK_COMMIT`` or git, else "unknown"), the Triton and torch versions and every
timing; ``_sra_configs`` reads ``dare_kernels/triton/sweep_tables/sm_<arch>.json`` when it exists
(commit the file written here to that path, or pass ``--install``), and uses a choice only while it is
still one of the candidates. A run cut by the budget keeps what it timed (``complete: false``).

``--rehearse`` runs the same code under ``TRITON_INTERPRET=1`` on CPU tensors at tiny shapes (timings
there mean nothing; the table is marked ``rehearsal`` and is never installed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (label, B, H, N, M, D, map window or None)
HEADLINE = [
    ("wan1.3b-cross", 1, 12, 32760, 512, 128, (0, 512)),
    ("ltx-video", 1, 32, 6144, 128, 64, (0, 128)),
    ("cogvideox-joint", 1, 30, 17776, 17776, 64, (0, 226)),
]
REHEARSAL = [("rehearsal-d64", 1, 2, 40, 64, 40, (0, 64))]
KERNELS = ("sra_fwd_kernel", "sra_map_kernel", "sra_bwd_dkdv_kernel", "sra_bwd_dq_kernel")


def _commit() -> str:
    if os.environ.get("GPU_CHECK_COMMIT"):
        return os.environ["GPU_CHECK_COMMIT"]
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _inputs(torch, device, B, H, N, M, D, window):
    g = torch.Generator(device="cpu").manual_seed(0)

    def bnhd(rows):  # the [B, N, H, D] memory layout diffusers passes, viewed as [B, H, N, D]
        return (torch.randn(B, rows, H, D, generator=g) * 0.5).to(torch.bfloat16).to(device).transpose(1, 2)

    q, k, v = bnhd(N), bnhd(M), bnhd(M)
    w = (torch.rand(B, H, M, generator=g) + 0.5).to(device)
    mask = torch.ones(B, M, dtype=torch.bool, device=device)
    return dict(q=q, k=k, v=v, w=w, mask=mask, window=window, scale=D ** -0.5)


def _stage(tsra, name, x):
    """The call that launches kernel ``name`` (with the kernels before it where it needs their outputs)."""
    q, k, v, w, mask, scale = x["q"], x["k"], x["v"], x["w"], x["mask"], x["scale"]
    if name == "sra_fwd_kernel":
        return lambda: tsra.sra_attention_fwd_triton(q, k, v, w, mask, 0.5, scale, 0, 0)
    if name == "sra_map_kernel":
        return lambda: tsra.sra_attention_fwd_triton(q, k, v, w, mask, 0.5, scale, *x["window"])
    out, lse, amap = tsra.sra_attention_fwd_triton(q, k, v, w, mask, 0.5, scale, 0, 0)
    go = out.clone().normal_()
    return lambda: tsra.sra_attention_bwd_triton(go, None, None, q, k, v, w, mask, out, lse, 0.5, scale, 0, 0)


def _timer(torch, rehearse):
    if rehearse:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return run
    from triton.testing import do_bench

    return lambda fn: float(do_bench(fn, warmup=10, rep=40, return_mode="median"))


def sweep(out_dir: str, budget_s: float, rehearse: bool, install: bool = False) -> dict:
    if rehearse:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first imported
    sys.path.insert(0, ROOT)  # a tree where the package is not installed
    import torch
    import triton

    from dare_kernels.triton import _sra_configs as C
    from dare_kernels.triton import sra_attention as tsra

    t_start = time.perf_counter()
    device = "cpu" if rehearse else "cuda"
    if not rehearse and not torch.cuda.is_available():
        raise SystemExit("triton_sweep: no CUDA device (use --rehearse for the CPU rehearsal)")
    arch = tsra._arch()
    timer = _timer(torch, rehearse)
    tsra.set_autotune(False)
    tsra.FORCE_MAP_PATH = "two-kernel"  # the map-from-LSE kernel is the one with a tile to choose
    timings, totals, complete = [], {}, True
    for label, B, H, N, M, D, window in (REHEARSAL if rehearse else HEADLINE):
        x = _inputs(torch, device, B, H, N, M, D, window)
        bd = C.pow2(D)
        for name in KERNELS:
            width = window[1] - window[0] if name == "sra_map_kernel" else M
            key = C.table_key(name, bd, 2)
            for tile in C.candidate_tiles(name, width, bd, 2, arch):
                if time.perf_counter() - t_start > budget_s:
                    complete = False
                    break
                n, m, warps, stages = tile
                cfg = dict(BLOCK_N=n, BLOCK_M=m)
                if not rehearse:  # (the interpreter takes no launch options)
                    cfg.update(num_warps=warps, num_stages=stages)
                tsra.FORCE_CONFIG.clear()
                tsra.FORCE_CONFIG[name] = cfg
                try:
                    ms = timer(_stage(tsra, name, x))
                except Exception as exc:  # recorded; the tile is not chosen
                    timings.append(dict(kernel=name, shape=label, tile=list(tile), ms=None,
                                        error=f"{type(exc).__name__}: {str(exc)[-300:]}"))
                    continue
                timings.append(dict(kernel=name, shape=label, tile=list(tile), ms=round(ms, 4)))
                totals.setdefault(key, {}).setdefault(tuple(tile), []).append(ms)
                print(f"triton_sweep: {label} {name} {tile}: {ms:.3f} ms", flush=True)
        del x
    tsra.FORCE_CONFIG.clear()
    tsra.FORCE_MAP_PATH = None
    choices = {}
    for key, per_tile in totals.items():
        # a tile timed on fewer shapes of the class than the best-covered one (budget cut) cannot win
        most = max(len(v) for v in per_tile.values())
        full = {t: sum(v) for t, v in per_tile.items() if len(v) == most}
        choices[key] = list(min(full, key=full.get))
    dev = "cpu (interpreter rehearsal)" if rehearse else torch.cuda.get_device_name()
    table = dict(arch=arch, device=dev, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 commit=_commit(), triton=triton.__version__, torch=torch.__version__, rehearsal=rehearse,
                 complete=complete, budget_s=budget_s, elapsed_s=round(time.perf_counter() - t_start, 1),
                 choices=choices, timings=timings,
                 note="tiles chosen among _sra_configs.candidate_tiles (aot_check-proven); times in ms, "
                      "median of triton.testing.do_bench" + (" (interpreter: meaningless)" if rehearse else ""))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"triton_sweep-sm_{arch}.json")
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    print(f"triton_sweep: {len(choices)} choices, {len(timings)} timings in {table['elapsed_s']} s "
          f"({'complete' if complete else 'cut by the budget'}) -> {path}", flush=True)
    if install and not rehearse:
        os.makedirs(C.TABLE_DIR, exist_ok=True)
        with open(C.table_path(arch), "w") as f:
            json.dump(table, f, indent=1)
            f.write("\n")
        print(f"triton_sweep: installed as {C.table_path(arch)} (commit it)", flush=True)
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for triton_sweep-sm_<arch>.json")
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop timing new tiles after this (s)")
    parser.add_argument("--rehearse", action="store_true", help="CPU interpreter, tiny shapes (CI)")
    parser.add_argument("--install", action="store_true", help="also write dare_kernels/triton/sweep_tables/")
    args = parser.parse_args(argv)
    sweep(args.out, args.budget_s, args.rehearse, args.install)
    return 0


if __name__ == "__main__":
    sys.exit(main())
