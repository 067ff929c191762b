#!/usr/bin/env python3
"""The benchmark table of the device check (tools/gpu_check.sh): peers first, ratios always, on a budget.

The rows and their order are ``plan(part, tiny)`` (bench/gpucheck/plan.py): unit by unit (one kernel at one
shape and dtype), the headline unit first (Wan-1.3B cross-attention, bfloat16); inside a unit mode by mode
(fwd, fwd+map, fwd+bwd with the weight gradient, fwd+map+bwd), and inside a mode the peers a dare row is
judged against (SDPA FLASH without the bias, SDPA as users call it with the bias; eager maps for map modes)
before dare_triton and dare_cuda, the other peers (SDPA default without the bias, SDPA EFFICIENT and cuDNN with
the bias, compiled FlexAttention with a per-key-bias score_mod) after them.

    --part 1    the headline unit, then rectified_cfg (dare Triton / CUDA, eager PyTorch, diffusers' guider, copy)
    --part 2    LTX-Video, CogVideoX-5B joint, AnimateDiff D40/80/160, the headline shape in float16, and one
                real-size diffusers attention layer (Wan-1.3B attn2: stock processor vs DARE, with and without maps)
    --part all  both (default)

Every row is appended to ``<out>/bench_rows.jsonl`` the moment it is done, and bench.json (ratios first, then the
rows), bench_ratios.csv, bench.csv and bench.md are rewritten after every row, so a run cut anywhere keeps the
ratios of what it reached (bench/gpucheck/table.py). A row that would start after the budget is recorded as
skipped with that reason, as is every provider that cannot run here (and why). On CPU (the rehearsal: tiny
shapes, Triton in its interpreter, FlexAttention eager) timings are wall-clock medians of a few calls.
Exit status 1 when a dare row fails with an error (a peer's error is only recorded), else 0.

    python tools/gpu_check_bench.py --part 1|2|all --out DIR --device cuda|cpu --budget-s S [--tiny --rows-per-provider N]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # the gpucheck package, the shape table and the guider set-up

import torch  # noqa: E402

from gpucheck.attention import DTYPES, Skip, allow_recompiles, attn_call, attn_inputs, attn_work  # noqa: E402,F401
from gpucheck.cfg_rows import cfg_bytes, cfg_call, cfg_inputs  # noqa: E402
from gpucheck.plan import PARTS, Row, order_violations, plan, tiny_shape  # noqa: E402,F401
from gpucheck.table import Table, ratios  # noqa: E402,F401


def run_plan(rows: list[Row], table: Table, device: str) -> None:
    """Measure ``rows`` in order; inputs are built once per unit and dropped when the unit is done."""
    current, inputs = None, None
    for row in rows:
        if row.unit != current:
            current, inputs = row.unit, None
            if device == "cuda":
                torch.cuda.empty_cache()
            print(f"-- {row.kernel} {row.shape} {row.dtype} ({row.dims})", flush=True)
        base = row.base()
        if row.kernel == "sra_attention":
            if inputs is None:
                inputs = attn_inputs(row.attn, DTYPES[row.dtype], device)
            fl, by = attn_work(row.attn, row.mode, torch.tensor([], dtype=DTYPES[row.dtype]).element_size())
            table.run(base, lambda r=row, x=inputs: attn_call(r.provider, r.mode, r.attn, x, device), fl, by,
                      compiled=row.provider == "flex_compiled")
        elif row.kernel == "rectified_cfg":
            if inputs is None:
                inputs = cfg_inputs(row.extra, device)
            table.run(base, lambda r=row, x=inputs: cfg_call(r.provider, x), 0.0, cfg_bytes(row.provider, inputs))
        elif row.kernel == "diffusers_layer":
            from gpucheck.diffusers_rows import LayerCall, layer_work

            table.run(base, lambda r=row: LayerCall(r.provider, r.mode, r.extra, device), layer_work(row.extra), 0.0)
        else:
            raise ValueError(f"unknown kernel {row.kernel!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=PARTS, default="all", help="which rows: 1, 2 or all (see above)")
    ap.add_argument("--out", type=Path, required=True,
                    help="folder of bench_rows.jsonl, bench.json, bench_ratios.csv, bench.csv, bench.md")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget-s", type=float, default=120.0, help="rows that would start later are skipped")
    ap.add_argument("--tiny", action="store_true", help="interpreter-sized stand-ins of the shapes (rehearsal)")
    ap.add_argument("--rows-per-provider", type=int, default=None,
                    help="measure at most this many rows per provider and part (the rehearsal: 4 runs each mode once, "
                         "as a unit's rows come mode by mode)")
    ap.add_argument("--list", action="store_true", help="print the rows of the part in the order they run, and exit")
    args = ap.parse_args(argv)
    if args.list:
        for r in plan(args.part, args.tiny):
            print(f"{r.part} {r.kernel:<15} {r.shape:<22} {r.dtype:<9} {r.mode:<12} {r.role:<9} {r.provider}")
        return 0
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before dare_kernels imports Triton
    args.out.mkdir(parents=True, exist_ok=True)
    rows = plan(args.part, args.tiny)
    bad = order_violations(rows)
    if bad:  # never spend GPU time on a table whose peers come too late
        print("gpu_check_bench: the plan breaks the bench order:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 2
    if args.device == "cuda":
        allow_recompiles()
    table = Table(args.out, args.device, args.budget_s, args.rows_per_provider)
    print(f"gpu_check_bench: part {args.part}, {len(rows)} rows, {table.device_name}, torch {torch.__version__}, "
          f"budget {args.budget_s:.0f} s", flush=True)
    run_plan(rows, table, args.device)
    table.write()
    ok = sum(r["status"] == "ok" for r in table.rows)
    print(f"gpu_check_bench: {ok}/{len(table.rows)} rows measured, {len(ratios(table.rows))} ratios, "
          f"{table.dare_errors} dare errors; {args.out / 'bench.md'}", flush=True)
    return 1 if table.dare_errors else 0


if __name__ == "__main__":
    sys.exit(main())
