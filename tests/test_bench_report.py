"""The benchmark infrastructure: result CSV append semantics, the report's table and plots, the
bench conftest's rows (one real pytest run on a tiny benchmark). No timing is asserted."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dare_kernels.benchmarking import report, results
from dare_kernels.benchmarking.timing import make_input_sets, quantiles, rotating

REPO = Path(__file__).resolve().parents[1]
ENV = dict(device="Test CPU 9000", device_type="cpu", threads="2", torch="2.x", triton="3.x", commit="abc123")


def _row(run, provider, p50, kernel="sra_attention", mode="fwd", shape="wan-1.3b", dtype="float32", **kw):
    return dict(ENV, run_id=run, timestamp=f"2026-01-01T00:00:{run[-2:]}", kernel=kernel, provider=provider,
                mode=mode, metric="time", unit="s", shape=shape, dtype=dtype, status="ok", p50=p50,
                p20=p50 * 0.9, p80=p50 * 1.1, **kw)


def _synthetic(path: Path, run="run-01"):
    rows = [
        dict(ENV, run_id=run, kernel="floor", provider="matmul", mode="floor", metric="throughput",
             unit="GFLOP/s", dtype="float32", status="ok", p50=190.0, p20=180.0, p80=200.0, flops=1e9),
        dict(ENV, run_id=run, kernel="floor", provider="copy", mode="floor", metric="throughput",
             unit="GB/s", dtype="float32", status="ok", p50=19.0, p20=18.0, p80=20.0, bytes=1e9),
        _row(run, "dare_cpu", 0.005, flops=1e9, bytes=5e7),
        _row(run, "sdpa_bias", 0.010, flops=1e9, bytes=5e7),
        _row(run, "eager_maps", 0.030, flops=1e9, bytes=5e7, peak_mem_bytes=3 * 2**20),
        _row(run, "dare_cpu", 0.002, kernel="rectified_cfg", mode="cfg", shape="wan-81f", bytes=2e7),
        _row(run, "diffusers_guider", 0.007, kernel="rectified_cfg", mode="cfg", shape="wan-81f", bytes=2e7),
        dict(ENV, run_id=run, kernel="sra_attention", provider="flash_attn", mode="fwd", shape="wan-1.3b",
             status="skipped", reason="flash_attn not installed"),
    ]
    results.append_rows(path, rows)
    return rows


def test_append_never_overwrites_and_migrates_columns(tmp_path):
    path = tmp_path / "cpu-x.csv"
    assert results.append_rows(path, [_row("r1", "a", 1.0)]) == 1
    assert results.append_rows(path, [_row("r2", "b", 2.0)]) == 1
    # a row with a column the file does not have yet: the file gains it, old rows stay
    results.append_rows(path, [dict(_row("r3", "c", 3.0), extra_note="hello")])
    rows = results.read_rows(path)
    assert [r["provider"] for r in rows] == ["a", "b", "c"]
    assert [r["p50"] for r in rows] == [1.0, 2.0, 3.0]
    assert rows[0]["extra_note"] == "" and rows[2]["extra_note"] == "hello"
    with path.open() as f:
        header = next(csv.reader(f))
    assert header[: len(results.COLUMNS)] == list(results.COLUMNS)
    assert results.read_rows(path)[0]["flops"] is None  # empty numeric -> None
    assert results.append_rows(path, []) == 0


def test_slugs_and_quantiles():
    assert results.slugify("AMD EPYC 7B13 64-Core Processor") == "amd-epyc-7b13-64-core-processor"
    assert results.slug_for("cuda", "NVIDIA H100 80GB HBM3") == "cuda-nvidia-h100-80gb-hbm3"
    assert results.slug_for("cpu", "cpu") == "cpu"
    assert quantiles([5.0, 1.0, 3.0, 2.0, 4.0]) == (1.8, 3.0, 4.2)
    assert quantiles([7.0]) == (7.0, 7.0, 7.0)
    with pytest.raises(ValueError):
        quantiles([])


def test_rotating_cycles_through_input_sets():
    seen = []
    call = rotating(lambda *a, **k: seen.append((a, k)), [(1, 2), {"x": 3}, 4])
    for _ in range(4):
        call()
    assert seen == [((1, 2), {}), ((), {"x": 3}), ((4,), {}), ((1, 2), {})]
    sets = make_input_sets(lambda g: float(__import__("torch").rand(1, generator=g)), n=3)
    assert len(set(sets)) == 3  # different seeds, different inputs
    with pytest.raises(ValueError):
        rotating(print, [])


def test_select_run_and_comparisons(tmp_path):
    path = tmp_path / "r.csv"
    _synthetic(path, "run-01")
    results.append_rows(path, [_row("run-02", "sdpa_bias", 0.5)])
    rows = results.read_rows(path)
    latest = report.select_run(rows, "latest")
    assert {r["run_id"] for r in latest} == {"run-02"}
    assert len(report.select_run(rows, "run-01")) == 8
    one = report.select_run(rows, "run-01")
    assert report.floors(one) == {"matmul/float32": 200.0, "copy": 20.0}
    comps = {c["key"]: c for c in report.comparisons(one)}
    sra = comps[("sra_attention", "fwd", "wan-1.3b", "float32")]
    assert sra["best_dare"] == "dare_cpu"
    assert sra["speedup"] == pytest.approx({"sdpa_bias": 2.0, "eager_maps": 6.0})
    cfg = comps[("rectified_cfg", "cfg", "wan-81f", "float32")]
    assert cfg["speedup"]["diffusers_guider"] == pytest.approx(3.5)


def test_markdown_table(tmp_path):
    path = tmp_path / "r.csv"
    _synthetic(path)
    rows = report.select_run(results.read_rows(path), "latest")
    md = report.render_markdown(rows, title="T")
    assert "| matmul/float32 | 200.0 GFLOP/s |" in md and "| copy | 20.0 GB/s |" in md
    # sdpa_bias: 1e9 FLOP in 10 ms = 100 GFLOP/s = 50% of the 200 GFLOP/s peak; 2× slower than dare
    line = next(ln for ln in md.splitlines() if "| sdpa_bias |" in ln)
    assert "10 ms [9 ms–11 ms]" in line and "| 100 | 50% |" in line and "2.00×" in line
    # dare: 5e7 bytes in 5 ms = 10 GB/s = 50% of the copy bandwidth
    dare = next(ln for ln in md.splitlines() if "**dare_cpu**" in ln and "wan-1.3b" in ln)
    assert "| 10 | 50% | - | **best dare** |" in dare
    assert "| 3 MiB | 6.00× |" in next(ln for ln in md.splitlines() if "| eager_maps |" in ln)
    assert "| skipped | sra_attention | flash_attn | flash_attn not installed | 1 |" in md
    assert "3.50×" in md


def test_plots_and_report_files(tmp_path):
    path = tmp_path / "cpu-test.csv"
    _synthetic(path)
    out = tmp_path / "out"
    written = report.write_report([path], out)
    assert [p.name for p in written["md"]] == ["REPORT-cpu-test-cpu-9000.md"]
    names = sorted(p.name for p in written["png"])
    assert names == ["floor-cpu-test-cpu-9000.png", "speedup-cpu-test-cpu-9000.png"]
    for p in written["png"]:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "![speedup-cpu-test-cpu-9000](speedup-cpu-test-cpu-9000.png)" in written["md"][0].read_text()
    # no dare rows: the table still renders, the speed-up plot is left out instead of drawn empty
    peers_only = [r for r in results.read_rows(path) if not r["provider"].startswith("dare")]
    assert report.plot_speedups(peers_only, out / "none.png") is None
    assert "no dare row" in report.render_markdown(peers_only)


def test_report_cli(tmp_path, capsys):
    from dare_kernels.cli import main

    path = tmp_path / "cpu-test.csv"
    _synthetic(path)
    assert main(["report", "--csv", str(path), "--out", str(tmp_path / "o"), "--no-plots", "--print"]) == 0
    out = capsys.readouterr().out
    assert "## sra_attention" in out and (tmp_path / "o" / "REPORT-cpu-test-cpu-9000.md").is_file()


def test_bench_conftest_writes_rows_and_skips(tmp_path):
    """One real pytest-benchmark session through bench/conftest.py: floors, a timed row, a skip row."""
    pytest.importorskip("pytest_benchmark")
    d = tmp_path / "bench"
    d.mkdir()
    shutil.copy(REPO / "bench" / "conftest.py", d / "conftest.py")
    (d / "test_bench_toy_cpu.py").write_text(
        "import pytest\n"
        "def test_toy(benchmark):\n"
        "    benchmark.extra_info.update(kernel='toy', provider='dare_cpu', mode='fwd', shape='s', dtype='float32')\n"
        "    benchmark.pedantic(lambda: sum(range(100)), rounds=5)\n"
        "def test_fed(benchmark):\n"
        "    from dare_kernels.benchmarking.timing import feed_benchmark\n"
        "    benchmark.extra_info.update(kernel='toy', provider='events', mode='fwd', shape='s', dtype='float32')\n"
        "    feed_benchmark(benchmark, [3e-3, 1e-3, 2e-3], timer='test_events')\n"
        "def test_device_median(benchmark):\n"
        "    benchmark.extra_info.update(kernel='toy', provider='do_bench', mode='fwd', shape='s', dtype='bf16',\n"
        "                                median_ms=2.5, B=1, H=2, N=3, M=4, D=5)\n"
        "    benchmark.pedantic(lambda: None, rounds=3)\n"
        "def test_missing_peer(benchmark):\n"
        "    benchmark.extra_info.update(kernel='toy', provider='nope', mode='fwd', shape='s', dtype='float32')\n"
        "    pytest.skip('nope not installed')\n"
    )
    res = tmp_path / "results"
    # a clean child pytest: not an xdist worker (pytest-benchmark disables itself under xdist)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    env["DARE_BENCH_FLOORS"] = "tiny"
    proc = subprocess.run([sys.executable, "-m", "pytest", str(d), "--benchmark-only", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "--bench-quick", "--bench-csv-dir", str(res), "--bench-run-id", "RUN1",
                           f"--rootdir={tmp_path}"], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    csvs = list(res.glob("cpu-*.csv"))
    assert len(csvs) == 1
    rows = results.read_rows(csvs[0])
    assert {r["run_id"] for r in rows} == {"RUN1"}
    floors = [r for r in rows if r["kernel"] == "floor"]
    assert len(floors) == 6
    assert {(r["provider"], r["dtype"]) for r in floors} == {("matmul", "float32"), ("matmul", "bfloat16"),
                                                              ("copy", "float32")}
    assert all(r["p50"] > 0 for r in floors)
    assert {r["test"] for r in floors} == {"floors-start", "floors-end"}  # measured before and after
    toy = {r["provider"]: r for r in rows if r["kernel"] == "toy"}
    assert toy["dare_cpu"]["status"] == "ok" and toy["dare_cpu"]["rounds"] == 5
    assert toy["dare_cpu"]["p20"] <= toy["dare_cpu"]["p50"] <= toy["dare_cpu"]["p80"]
    assert toy["nope"]["status"] == "skipped" and toy["nope"]["reason"] == "nope not installed"
    assert toy["dare_cpu"]["torch"] and toy["dare_cpu"]["device"]
    # a device-side median given by the bench file wins over host timing; dtype aliases normalised
    dev = toy["do_bench"]
    assert dev["p50"] == pytest.approx(2.5e-3) and dev["timer"] == "device_median_ms"
    assert dev["dtype"] == "bfloat16" and dev["dims"] == "B=1 H=2 N=3 M=4 D=5"
    # externally timed samples (the CUDA-event path) land in the row as given
    assert toy["events"]["p50"] == pytest.approx(2e-3) and toy["events"]["timer"] == "test_events"
    assert "not used at all" not in proc.stdout
    # a time budget already spent: every case becomes a skip row with that reason, none is timed
    proc = subprocess.run([sys.executable, "-m", "pytest", str(d), "--benchmark-only", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "--bench-quick", "--bench-csv-dir", str(res), "--bench-run-id", "RUN2",
                           "--bench-budget-s", "1e-9", f"--rootdir={tmp_path}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run2 = [r for r in results.read_rows(csvs[0]) if r["run_id"] == "RUN2" and r["kernel"] == "toy"]
    assert len(run2) == 4 and all(r["status"] == "skipped" and "time budget" in r["reason"] for r in run2)
