"""Interleaved side-by-side timing of the CPU sra_attention forward (a complement to
test_bench_sra_cpu.py for a loaded, noisy machine): providers run round-robin, call by call, on
rotating inputs, the order rotating every round, and the medians are compared, so load spikes hit
every provider alike.

Providers per shape and dtype (bench/shapes.CPU_ATTN_SHAPES):
  dare        sra_attention(..., backend="cpu")                          vs  sdpa_bias
  dare_map    sra_attention(..., return_attn_map=True, backend="cpu")   vs  eager_maps (and, for bf16,
              eager_maps_fp32), the peers of test_bench_sra_cpu.py.
  mm_floor    the two block products alone in fp32 (Q K^T and P V, torch.matmul into preallocated outputs; no
              bias, softmax or map): what torch's GEMM takes for the products of any exact attention.

    python bench/sra_cpu_interleaved.py [--shapes cpu-d128-m512] [--dtypes fp32 bf16] [--rounds 9]
        [--dot-modes 0 qk]

--dot-modes adds, for bf16, dare / dare_map run with DARE_KERNELS_CPU_BF16_DOT set to each mode (e.g.
"dare@0", "dare_map@0": the fp32 block products) next to the default, so the paths compare in one process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

import dare_kernels as dk  # noqa: E402
from _sra_cpu_common import STRENGTH, eager_maps, eager_maps_fp32, input_set  # noqa: E402
from shapes import CPU_ATTN_SHAPES  # noqa: E402


# the C++ kernels parse their switches once (csrc/include/switches.h): re-read them after each change
reload_cpu_switches = getattr(dk._ext.EXT, "reload_cpu_switches", lambda: None)


def with_env(name, value, fn):
    def run(x):
        old = os.environ.get(name)
        os.environ[name] = value
        reload_cpu_switches()
        try:
            return fn(x)
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old
            reload_cpu_switches()
    return run


def providers_for(shape, dname, dot_modes=()):
    def dare(x):
        return dk.sra_attention(x["q"], x["k"], x["v"], x["w"], strength=STRENGTH, backend="cpu")

    def dare_map(x):
        return dk.sra_attention(x["q"], x["k"], x["v"], x["w"], strength=STRENGTH, return_attn_map=True,
                                backend="cpu")

    def sdpa_bias(x):
        return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], attn_mask=x["bias"])

    def mm_floor(x):
        # the two block products alone, in fp32, into preallocated outputs (no softmax, no bias, no map)
        buf = x.setdefault("_floor", {})
        if not buf:
            buf["q"], buf["k"], buf["v"] = (x[n].float() for n in ("q", "k", "v"))
            buf["s"] = torch.empty(shape.B, shape.H, shape.N, shape.M)
            buf["o"] = torch.empty(shape.B, shape.H, shape.N, shape.D)
        torch.matmul(buf["q"], buf["k"].transpose(-1, -2), out=buf["s"])
        return torch.matmul(buf["s"], buf["v"], out=buf["o"])

    p = {"dare": dare, "sdpa_bias": sdpa_bias, "dare_map": dare_map, "eager_maps": lambda x: eager_maps(x, shape),
         "mm_floor": mm_floor}
    if dname != "fp32":
        p["eager_maps_fp32"] = lambda x: eager_maps_fp32(x, shape)
    if dname == "bf16":
        for mode in dot_modes:
            p[f"dare@{mode}"] = with_env("DARE_KERNELS_CPU_BF16_DOT", mode, dare)
            p[f"dare_map@{mode}"] = with_env("DARE_KERNELS_CPU_BF16_DOT", mode, dare_map)
    return p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(CPU_ATTN_SHAPES))
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="+", default=None, help="subset of providers")
    ap.add_argument("--dot-modes", nargs="*", default=[],
                    help="bf16: also run dare/dare_map with DARE_KERNELS_CPU_BF16_DOT=<mode> (0, qk, 1)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the process CPU clock (with --threads 1: robust to time slicing on a busy machine)")
    args = ap.parse_args()
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    for sname in args.shapes:
        shape = CPU_ATTN_SHAPES[sname]
        flops = 4 * shape.B * shape.H * shape.N * shape.M * shape.D
        for dname in args.dtypes:
            sets = [input_set(shape, dtypes[dname], torch.Generator().manual_seed(s)) for s in (0, 1)]
            provs = providers_for(shape, dname, args.dot_modes)
            if args.only:
                provs = {k: v for k, v in provs.items() if k in args.only}
            names = list(provs)
            times = {k: [] for k in names}
            for r in range(args.rounds + 1):
                order = names[r % len(names):] + names[: r % len(names)]
                for k in order:
                    x = sets[r & 1]
                    t0 = clock()
                    provs[k](x)
                    dt = clock() - t0
                    if r > 0:
                        times[k].append(dt)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            line = f"{sname:14s} {dname:5s} thr={args.threads}{' cpu-clock' if args.cpu_time else ''} |"
            for k in names:
                line += f" {k} {med[k]:7.1f} ms ({flops / med[k] / 1e6:5.1f} GF/s) |"
            print(line)
            ratios = []
            if "dare" in med and "sdpa_bias" in med:
                ratios.append(f"fwd x sdpa_bias {med['sdpa_bias'] / med['dare']:.3f}")
            if "dare_map" in med and "eager_maps" in med:
                ratios.append(f"map x eager {med['eager_maps'] / med['dare_map']:.3f}")
            if "dare_map" in med and "eager_maps_fp32" in med:
                ratios.append(f"map x eager_fp32 {med['eager_maps_fp32'] / med['dare_map']:.3f}")
            if "mm_floor" in med and "dare_map" in med:
                ratios.append(f"dare_map / mm_floor {med['dare_map'] / med['mm_floor']:.3f}")
            for k in names:
                if "@" in k:
                    peer = "sdpa_bias" if k.startswith("dare@") else "eager_maps"
                    if peer in med:
                        ratios.append(f"{k} x {peer} {med[peer] / med[k]:.3f}")
            print("    " + ", ".join(ratios), flush=True)


if __name__ == "__main__":
    main()
