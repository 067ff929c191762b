"""Interleaved side-by-side timing of rectified_cfg on CPU (a complement to test_bench_cfg_cpu.py for a
loaded, noisy machine): providers run round-robin, call by call, on rotating inputs, and the medians
are compared, so load spikes hit every provider alike. The order is shuffled every round.

    python bench/cfg_cpu_interleaved.py [--threads 1 2] [--rounds 15] [--shapes wan-49f-480x720] [--compare-isa]

--compare-isa adds the provider dare_avx2: the same call with DARE_KERNELS_CPU_ISA=avx2 (the AVX2 path on a
CPU whose default is the AVX-512 combine), interleaved with the others.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import dare_kernels as dk  # noqa: E402
from _cfg_common import MODES, dare_kwargs, guider_fn, latent_inputs  # noqa: E402
from shapes import LATENT_SHAPES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--compiled", action="store_true", help="also time torch.compile of the guider")
    ap.add_argument("--shapes", nargs="+", default=list(LATENT_SHAPES), choices=list(LATENT_SHAPES))
    ap.add_argument("--compare-isa", action="store_true", help="also time dare with DARE_KERNELS_CPU_ISA=avx2")
    args = ap.parse_args()
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    warnings.simplefilter("ignore")
    print("thr shape            mode           dtype | dare ms  guider ms  copy ms | x guider  bw/copy (2.5x in vs 2x in)"
          + ("  | compiled ms  x compiled" if args.compiled else "")
          + ("  | avx2 ms  bw/copy" if args.compare_isa else ""))
    isa0 = os.environ.get("DARE_KERNELS_CPU_ISA")

    def set_isa(isa):  # outside the timed call: os.environ writes cost microseconds
        if isa is None:
            os.environ.pop("DARE_KERNELS_CPU_ISA", None)
        else:
            os.environ["DARE_KERNELS_CPU_ISA"] = isa
        # the C++ kernels parse their switches once (csrc/include/switches.h): re-read them
        getattr(dk._ext.EXT, "reload_cpu_switches", lambda: None)()

    for thr in args.threads:
        torch.set_num_threads(thr)
        for shape in args.shapes:
            for dname in args.dtypes:
                inputs = latent_inputs(shape, dtypes[dname])
                in_bytes = inputs[0].numel() * inputs[0].element_size()
                out = torch.empty_like(inputs[0][: inputs[0].shape[0] // 2])
                dst = torch.empty_like(inputs[0])
                for mode in MODES:
                    kw = dare_kwargs(mode)
                    guider = guider_fn(mode)
                    providers = {
                        "dare": lambda p: dk.rectified_cfg(p, 5.0, out=out, backend="cpu", **kw),
                        "guider": guider,
                        "copy": lambda p: dst.copy_(p),
                    }
                    if args.compare_isa:
                        providers["dare_avx2"] = providers["dare"]
                    if args.compiled:
                        torch._dynamo.reset()
                        providers["compiled"] = torch.compile(guider_fn(mode), dynamic=False)
                        providers["compiled"](inputs[0])
                    times = {k: [] for k in providers}
                    names = list(providers)
                    for r in range(args.rounds + 1):
                        # a new order each round (seeded): the guider's large temporaries evict the cache and
                        # leave dirty lines, which would otherwise always slow whoever runs right after it
                        # (rotating a fixed order keeps the same provider right after the guider)
                        for name in random.Random(r).sample(names, len(names)):
                            fn = providers[name]
                            x = inputs[r % len(inputs)]
                            set_isa("avx2" if name == "dare_avx2" else isa0)
                            t0 = time.perf_counter()
                            fn(x)
                            if r:  # round 0 warms up
                                times[name].append(time.perf_counter() - t0)
                    med = {k: statistics.median(v) for k, v in times.items()}
                    frac = (2.5 * in_bytes / med["dare"]) / (2 * in_bytes / med["copy"])
                    print(f"{thr:3d} {shape:16} {mode:14} {dname:5} | {med['dare']*1e3:7.3f} {med['guider']*1e3:9.1f} "
                          f"{med['copy']*1e3:8.3f} | {med['guider']/med['dare']:8.1f}  {frac:6.2f}"
                          + (f"  | {med['compiled']*1e3:11.2f}  {med['compiled']/med['dare']:10.1f}" if args.compiled else "")
                          + (f"  | {med['dare_avx2']*1e3:7.3f}  {1.25 * med['copy'] / med['dare_avx2']:6.2f}"
                             if args.compare_isa else ""),
                          flush=True)
                set_isa(isa0)


if __name__ == "__main__":
    main()
