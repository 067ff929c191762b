"""Markdown table and PNG plots from the result CSVs (``dare-kernels report``).

For every (kernel, mode, shape, dtype) the report lists each provider's median time, its
throughput as a fraction of the device's physical floors measured in the same run (FLOPs over the
matmul peak of the dtype, bytes over the copy bandwidth), and the speed-up of the fastest dare_*
provider over every peer of the same run (peer time / dare time: > 1 means dare is faster; a case whose
run measured no peer says so). Skipped and failed providers are listed with their reasons.

Result CSVs and the device check's bench.csv (committed under bench/results/<run>/) are both read. A run is
rendered only once complete: ``dare-kernels bench`` appends an end-of-run row when its run ends on its own,
and the default selection takes each device's newest run with that row; runs without it (cut off, or recorded
before runs were marked) are listed as partial.

A fraction is shown only where its floor means something: no "% peak" of a bf16 / fp16 matmul floor
that is not native here (below half the fp32 one: the CPU emulates it), and a "% BW" over 100 % says
that the data were cache-resident (the copy floor streams 2 x 256 MiB through memory).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Sequence

from .results import complete_runs, is_run_end, normalize_dtype, read_results, slug_for

KEY = ("kernel", "mode", "shape", "dtype")


def is_dare(provider: str) -> bool:
    return str(provider).startswith("dare")


def _canon(rows: list[dict]) -> list[dict]:
    for r in rows:
        r["dtype"] = normalize_dtype(r.get("dtype"))
    return rows


def load(paths: Iterable[str | Path]) -> list[dict]:
    """Rows of every CSV in ``paths`` (result CSVs or device-check bench.csv files; numeric columns as floats)."""
    rows = []
    for p in paths:
        rows += read_results(p)
    return _canon(rows)


def select_run(rows: list[dict], run: str | None = "latest") -> list[dict]:
    """Rows of one run: ``"latest"`` (per device the newest COMPLETE run, i.e. with its end-of-run row; the
    newest run where a device has none marked, as files written before runs were marked), ``"all"`` (newest
    row per provider and key across runs) or an explicit run id."""
    if run in (None, "all"):
        newest: dict[tuple, dict] = {}
        for r in rows:
            k = (r.get("device"), r.get("provider"), r.get("test")) + tuple(r.get(c) for c in KEY)
            if k not in newest or (r.get("timestamp") or "") >= (newest[k].get("timestamp") or ""):
                newest[k] = r
        return list(newest.values())
    if run == "latest":
        done = complete_runs(rows)
        last: dict[str, str] = {}
        marked: dict[str, str] = {}
        for r in rows:
            d, rid = r.get("device") or "", r.get("run_id") or ""
            last[d] = max(last.get(d, ""), rid)
            if rid in done:
                marked[d] = max(marked.get(d, ""), rid)
        pick = {d: marked.get(d, last[d]) for d in last}
        return [r for r in rows if r.get("run_id") == pick.get(r.get("device") or "")]
    return [r for r in rows if r.get("run_id") == run]


def partial_runs(rows: list[dict]) -> list[tuple[str, int]]:
    """(run id, rows) of every run in ``rows`` without its end-of-run row: cut off (Ctrl-C, a time limit, a
    crash) or recorded before runs were marked; oldest first."""
    done = complete_runs(rows)
    count: dict[str, int] = defaultdict(int)
    for r in rows:
        rid = r.get("run_id") or ""
        if rid not in done:
            count[rid] += 1
    return sorted(count.items())


def floors(rows: list[dict]) -> dict[str, float]:
    """Measured floors: {"matmul/<dtype>": GFLOP/s, "copy": GB/s}.

    A floor is what the device can reach, and noise only ever slows it down: the report takes the
    p80 of the throughput samples, and the highest over the measurements selected (conftest
    measures at the start and at the end of a run, so load drift during a run does not push
    kernels above 100%)."""
    vals: dict[str, float] = {}
    for r in rows:
        if r.get("kernel") == "floor" and r.get("status") == "ok" and (r.get("p80") or r.get("p50")):
            name = "copy" if r.get("provider") == "copy" else f"matmul/{r.get('dtype')}"
            vals[name] = max(vals.get(name, 0.0), r.get("p80") or r["p50"])
    return vals


NATIVE_LOWP = 0.5  # a bf16 matmul floor below this fraction of the fp32 one is emulated, not a peak


def native_lowp(fl: dict[str, float]) -> bool | None:
    """Whether the measured bf16 matmul floor is a native one (None: not both floors measured)."""
    bf, f32 = fl.get("matmul/bfloat16"), fl.get("matmul/float32")
    if not bf or not f32:
        return None
    return bf >= NATIVE_LOWP * f32


def matmul_peak_for(fl: dict[str, float], dtype: str) -> float | None:
    """GFLOP/s peak matching ``dtype`` (fp16 uses the bf16 peak; float64 the float32 one); None for bf16 /
    fp16 where the bf16 floor is not native (a fraction of an emulated rate says nothing)."""
    if dtype in ("bfloat16", "float16"):
        if native_lowp(fl) is False:
            return None
        return fl.get("matmul/bfloat16") or fl.get("matmul/float32")
    return fl.get("matmul/float32")


def fmt_time(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def comparisons(rows: list[dict]) -> list[dict]:
    """One entry per (kernel, mode, shape, dtype) and run with ok timings:
    {key, run, dims, times {provider: p50}, spread {provider: (p20, p80)}, row {provider: row},
    best_dare (provider or None), speedup {peer: peer_p50 / best_dare_p50}}.

    Rows of different runs never share an entry: a ratio is always between rows of one run (one machine, one
    load, one build)."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        if r.get("kernel") == "floor" or r.get("status") != "ok" or not r.get("p50"):
            continue
        k = tuple(r.get(c) or "" for c in KEY)
        run = r.get("run_id") or ""
        g = groups.setdefault((k, run), {"key": k, "run": run, "dims": r.get("dims") or "", "times": {}, "spread": {},
                                         "row": {}})
        prov = r.get("provider") or "?"
        g["times"][prov] = r["p50"]
        g["spread"][prov] = (r.get("p20"), r.get("p80"))
        g["row"][prov] = r
    out = []
    for k in sorted(groups):
        g = groups[k]
        dare = {p: t for p, t in g["times"].items() if is_dare(p)}
        g["best_dare"] = min(dare, key=dare.get) if dare else None
        g["speedup"] = ({p: t / dare[g["best_dare"]] for p, t in g["times"].items() if not is_dare(p)}
                        if dare else {})
        out.append(g)
    return out


def _efficiency(row: dict, fl: dict[str, float]) -> tuple[float | None, float | None, float | None, float | None]:
    """(GFLOP/s, fraction of matmul peak, GB/s, fraction of copy bandwidth) of a timing row."""
    t = row.get("p50")
    gflops = row["flops"] / t / 1e9 if row.get("flops") and t else None
    gbs = row["bytes"] / t / 1e9 if row.get("bytes") and t else None
    peak = matmul_peak_for(fl, row.get("dtype") or "")
    bw = fl.get("copy")
    return (gflops, gflops / peak if gflops and peak else None, gbs, gbs / bw if gbs and bw else None)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%" if x >= 0.1 else f"{100 * x:.1f}%"


def _pct_bw(x: float | None) -> str:
    """% of the copy bandwidth; above 100 % the data were in cache, and the cell says so."""
    return f"{_pct(x)} (in cache)" if x is not None and x > 1.0 else _pct(x)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _run_state(rows: list[dict], partial: Sequence[tuple[str, int]] | None) -> list[str]:
    """Lines saying whether the rendered run(s) completed, and which runs were left out as partial."""
    done = complete_runs(rows)
    runs = sorted({r.get("run_id") or "?" for r in rows})
    open_runs = [rid for rid in runs if rid not in done]
    lines = []
    if open_runs:
        lines.append(f"- **partial**: run(s) {', '.join(open_runs)} have no end-of-run mark (cut off, or recorded "
                     "before runs were marked): what is missing was not measured, not skipped")
    others = [(rid, n) for rid, n in (partial or []) if rid not in runs]
    if others:
        lines.append(f"- partial runs not rendered (no end-of-run mark): "
                     + ", ".join(f"{rid} ({n} rows)" for rid, n in others))
    return lines


def render_markdown(rows: list[dict], title: str | None = None,
                    partial: Sequence[tuple[str, int]] | None = None) -> str:
    """The report as Markdown: run facts, floors, one table per kernel, skipped/failed providers.

    ``partial``: (run id, rows) of the partial runs of the same device (listed, not rendered)."""
    fl = floors(rows)
    devices = sorted({r.get("device") or "?" for r in rows})
    runs = sorted({r.get("run_id") or "?" for r in rows})
    first = next((r for r in rows if not is_run_end(r)), rows[0] if rows else {})
    dates = sorted({str(r.get("timestamp") or "")[:10] for r in rows if r.get("timestamp") and not is_run_end(r)})
    lines = [f"# {title or 'dare_kernels benchmarks'}", ""]
    lines += [f"- device: {', '.join(devices)}" + (f" ({int(first['threads'])} threads)" if first.get("threads") else "")
              + (f" [{first['device_type']}]" if first.get("device_type") else ""),
              f"- torch {first.get('torch', '?')}, triton {first.get('triton') or 'n/a'}, commit {first.get('commit') or '?'}"
              + (f", {' to '.join(dict.fromkeys([dates[0], dates[-1]]))}" if dates else ""),
              f"- run(s): {', '.join(runs)}",
              *([f"- CPU SRA path (ISA / product kernel per dtype): {first['cpu_path']}"] if first.get("cpu_path") else []),
              *_run_state(rows, partial),
              "- times are medians (p50) per call, p20–p80 in brackets; speed-up = peer time / fastest dare_* time "
              "(> 1: dare is faster); % peak = achieved FLOP/s over the measured matmul peak of the dtype; "
              "% BW = achieved bytes/s over the measured copy bandwidth (floors: p80 of the throughput, "
              "best of the measurements at the start and end of the run, same device); % BW over 100% = "
              "the data were cache-resident.", ""]
    native = native_lowp(fl)
    if not fl:
        lines[-1:] = ["- no floor rows in this run: the % peak and % BW columns are empty; a `copy` row of a kernel "
                  "is the copy of its bytes, timed in the same run.", ""]
    if fl:
        lines += ["## Physical floors (same device, same run)", "", "| floor | value |", "| --- | --- |"]
        for k in sorted(fl):
            note = " (not native here: no % peak of it is shown)" if k == "matmul/bfloat16" and native is False else ""
            lines.append(f"| {k} | {fl[k]:.1f} {'GB/s' if k == 'copy' else 'GFLOP/s'}{note} |")
        lines.append("")
    if native is False:
        lines += [f"- bf16 matmul here: {fl['matmul/bfloat16']:.3g} GFLOP/s against {fl['matmul/float32']:.3g} in fp32 "
                  "(emulated, no native bf16 products): bf16 rows show no % peak.", ""]
    comps = comparisons(rows)
    peers_only = [c for c in comps if not c["best_dare"]]
    comps = [c for c in comps if c["best_dare"]]
    by_kernel: dict[str, list[dict]] = defaultdict(list)
    for c in comps:
        by_kernel[c["key"][0]].append(c)
    for kernel in sorted(by_kernel):
        lines += [f"## {kernel}", "",
                  "| mode | shape | dtype | provider | p50 [p20–p80] | GFLOP/s | % peak | GB/s | % BW | peak mem | speed-up of dare |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in by_kernel[kernel]:
            _, mode, shape, dtype = c["key"]
            for prov in sorted(c["times"], key=c["times"].get):
                row = c["row"][prov]
                p20, p80 = c["spread"][prov]
                gf, fpk, gb, fbw = _efficiency(row, fl)
                if is_dare(prov) and not c["speedup"] and prov == c["best_dare"]:
                    sp = _no_peer(c["key"], rows)
                elif is_dare(prov):
                    sp = "**best dare**" if prov == c["best_dare"] else f"{c['times'][c['best_dare']] / c['times'][prov]:.2f}× of best"
                else:
                    sp = f"{c['speedup'][prov]:.2f}×"
                spread = f"{fmt_time(c['times'][prov])} [{fmt_time(p20)}–{fmt_time(p80)}]"
                name = f"**{prov}**" if is_dare(prov) else prov
                mem = f"{row['peak_mem_bytes'] / 2**20:.3g} MiB" if row.get("peak_mem_bytes") else "-"
                lines.append(f"| {mode} | {shape} | {dtype} | {name} | {spread} | {_num(gf)} | {_pct(fpk)} | "
                             f"{_num(gb)} | {_pct_bw(fbw)} | {mem} | {sp} |")
        lines.append("")
    if peers_only:
        n_rows = sum(len(c["times"]) for c in peers_only)
        lines += [f"_{len(peers_only)} case(s) timed without a dare row to compare with ({n_rows} peer rows, e.g. "
                  f"{' '.join(str(x) for x in peers_only[0]['key'])}) are left out of these tables; the CSV has them._", ""]
    not_run = [r for r in rows if r.get("status") in ("skipped", "error")]
    if not_run:
        agg: dict[tuple, int] = defaultdict(int)
        for r in not_run:
            agg[(r.get("status"), r.get("kernel") or "", r.get("provider") or "", r.get("reason") or "")] += 1
        lines += ["## Not measured (skipped or failed)", "", "| status | kernel | provider | reason | cases |",
                  "| --- | --- | --- | --- | --- |"]
        for (st, kern, prov, why), n in sorted(agg.items()):
            lines.append(f"| {st} | {kern} | {prov} | {why.replace('|', '/')} | {n} |")
        lines.append("")
    if not comps and not peers_only:
        lines += ["_No timing rows in this selection._", ""]
    return "\n".join(lines)


def _no_peer(key: tuple, rows: list[dict]) -> str:
    """The speed-up cell of a case whose run measured no peer: says so, and what became of the peer rows."""
    missed = sorted({r.get("provider") or "?" for r in rows if not is_dare(r.get("provider") or "")
                     and r.get("status") in ("skipped", "error") and tuple(r.get(c) or "" for c in KEY) == key})
    return ("no peer measured in this run" + (f" ({', '.join(missed)} not run: see below)" if missed else ""))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _minor_label(v: float, _pos=None) -> str:
    """Label the 2× and 5× minor ticks of a log axis (0.2, 0.5, 2, 5, 20, ...)."""
    if v <= 0:
        return ""
    mantissa = v / 10 ** math.floor(math.log10(v))
    return f"{v:g}×" if round(mantissa, 6) in (2.0, 5.0) else ""


def plot_speedups(rows: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Grouped bars, one panel per kernel: speed-up of the fastest dare_* over each peer for each
    (mode, shape, dtype); log scale, 1× line. Returns the path, or None when no case has a dare row."""
    comps = [c for c in comparisons(rows) if c["speedup"]]
    if not comps:
        return None
    plt = _plt()
    from matplotlib.ticker import FuncFormatter

    panels = []
    for k in sorted({c["key"][0] for c in comps}):
        cs = [c for c in comps if c["key"][0] == k]
        panels.append((k, cs, sorted({p for c in cs for p in c["speedup"]})))
    # one bar per (case, peer present in that case); a gap between cases
    sizes = [sum(len(c["speedup"]) for c in cs) + 0.6 * len(cs) for _, cs, _ in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, max(3.5, 1.3 * len(panels) + 0.2 * sum(sizes))),
                             squeeze=False, gridspec_kw={"height_ratios": sizes})
    cmap = plt.get_cmap("tab10")
    for ax, (k, cs, peers) in zip(axes[:, 0], panels):
        color = {p: cmap(i % 10) for i, p in enumerate(peers)}
        y = 0.0
        ticks, labels, done = [], [], set()
        for c in cs:
            ys = []
            for p in sorted(c["speedup"]):
                v = c["speedup"][p]
                ax.barh(y, v, height=0.85, color=color[p], label=None if p in done else f"vs {p}")
                done.add(p)
                ax.text(v, y, f" {v:.2f}×", va="center", fontsize=7)
                ys.append(y)
                y += 1
            ticks.append(sum(ys) / len(ys))
            labels.append(f"{c['key'][1]} {c['key'][2]} {c['key'][3]}")
            y += 0.6
        ax.axvline(1.0, color="black", lw=1)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.xaxis.set_minor_formatter(FuncFormatter(_minor_label))
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_yticks(ticks)
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_ylim(y - 0.3, -0.7)
        ax.set_xlabel("speed-up of the fastest dare_* provider (peer time / dare time; > 1: dare is faster)")
        ax.set_title(f"{k}{' - ' + title if title else ''}", fontsize=10)
        vals = [v for c in cs for v in c["speedup"].values()]
        ax.set_xlim(min(0.8, min(vals) / 1.25), max(1.25, max(vals) * 1.35))
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(axis="x", which="both", alpha=0.3)
    return _save(fig, path)


def floor_fraction(row: dict, fl: dict[str, float]) -> tuple[float | None, str]:
    """Roofline fraction of a timing row: max(FLOPs / matmul peak, bytes / copy bandwidth) / time,
    and which floor binds ("compute" or "memory"); (None, "") without floors or work counts."""
    t = row.get("p50")
    peak = matmul_peak_for(fl, row.get("dtype") or "")
    bw = fl.get("copy")
    t_compute = row["flops"] / (peak * 1e9) if row.get("flops") and peak else None
    t_memory = row["bytes"] / (bw * 1e9) if row.get("bytes") and bw else None
    if not t or (t_compute is None and t_memory is None):
        return None, ""
    if t_memory is None or (t_compute is not None and t_compute >= t_memory):
        return t_compute / t, "compute"
    return t_memory / t, "memory"


def _pct_label(x: float) -> str:
    return f"{100 * x:.0f}%" if x >= 0.1 else f"{100 * x:.2g}%"


def plot_floor_fractions(rows: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Bars per (case, provider), one panel per kernel: the fraction of the physical floor reached,
    max(FLOPs / matmul peak, bytes / copy bandwidth) / time, labelled with the binding floor.
    None when no floor rows or no rows with flops / bytes."""
    fl = floors(rows)
    by_kernel: dict[str, list[tuple[str, str, float, str]]] = defaultdict(list)
    for c in comparisons(rows):
        for prov in sorted(c["row"], key=c["times"].get):
            frac, bound = floor_fraction(c["row"][prov], fl)
            if frac is not None:
                by_kernel[c["key"][0]].append((f"{c['key'][1]} {c['key'][2]} {c['key'][3]} | {prov}", prov, frac, bound))
    if not by_kernel:
        return None
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    provs = sorted({x[1] for v in by_kernel.values() for x in v})
    color = {p: cmap(i % 10) for i, p in enumerate(provs)}
    kernels = sorted(by_kernel)
    sizes = [len(by_kernel[k]) + 2 for k in kernels]
    fig, axes = plt.subplots(len(kernels), 1, figsize=(11, max(3.5, 0.9 * len(kernels) + 0.2 * sum(sizes))),
                             squeeze=False, gridspec_kw={"height_ratios": sizes})
    for ax, k in zip(axes[:, 0], kernels):
        sel = by_kernel[k]
        clip = 2.0  # above 2x the floor (cache-resident data) a bar is clipped, so the others stay readable
        ax.barh(range(len(sel)), [min(x[2], clip) for x in sel], color=[color[x[1]] for x in sel])
        for y, x in enumerate(sel):
            extra = ", in cache" if x[3] == "memory" and x[2] > 1 else ""
            ax.text(min(x[2], clip), y, f" {_pct_label(x[2])} ({x[3]}{extra})", va="center", fontsize=7)
        ax.set_yticks(range(len(sel)))
        ax.set_yticklabels([x[0] for x in sel], fontsize=7)
        ax.set_ylim(len(sel) - 0.4, -0.6)
        ax.axvline(1.0, color="black", lw=1)
        ax.set_xlim(0, max(1.05, min(clip, max(x[2] for x in sel)) * 1.3))
        ax.set_title(k, fontsize=10)
        ax.set_xlabel("fraction of the physical floor: max(FLOPs / matmul peak, bytes / copy bandwidth) / time")
        ax.grid(axis="x", alpha=0.3)
    fl_txt = ", ".join(f"{k} {v:.0f} {'GB/s' if k == 'copy' else 'GFLOP/s'}" for k, v in sorted(fl.items()))
    fig.suptitle(f"{title + chr(10) if title else ''}floors measured in the same run: {fl_txt}", fontsize=9)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure; returns its path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def write_report(csv_paths: Sequence[str | Path], out_dir: str | Path, run: str | None = "latest",
                 plots: bool = True) -> dict[str, list[Path]]:
    """Render REPORT-<device>.md and the PNGs for each device in the CSVs; returns {"md": [...], "png": [...]}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {"md": [], "png": []}
    by_device: dict[str, list[dict]] = defaultdict(list)
    for p in csv_paths:
        for r in _canon(read_results(p)):
            by_device[slug_for(r.get("device_type") or "cpu", r.get("device") or Path(p).stem)].append(r)
    for slug, every in sorted(by_device.items()):
        rows = select_run(every, run)
        if not rows:
            continue
        name = rows[0].get("device") or slug
        md = out_dir / f"REPORT-{slug}.md"
        text = render_markdown(rows, title=f"dare_kernels benchmarks on {name}", partial=partial_runs(every))
        if plots:
            imgs = [plot_speedups(rows, out_dir / f"speedup-{slug}.png", name),
                    plot_floor_fractions(rows, out_dir / f"floor-{slug}.png", name)]
            imgs = [i for i in imgs if i is not None]
            if imgs:
                text += "\n## Plots\n\n" + "\n".join(f"![{i.stem}]({i.name})" for i in imgs) + "\n"
            written["png"] += imgs
        md.write_text(text)
        written["md"].append(md)
    return written
