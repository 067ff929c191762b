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

from dare_kernels.benchmarking import budget as budget_mod
from dare_kernels.benchmarking import report, results, settings
from dare_kernels.benchmarking.progress import eta_s
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
    md = report.render_markdown(peers_only)
    assert "no dare row" not in md and "| sdpa_bias |" not in md  # peers-only cases: one line, not a table
    assert "2 case(s) timed without a dare row" in md


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
    env["DARE_KERNELS_BENCH_FLOORS"] = "tiny"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])  # this checkout's dare_kernels
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


def _floor(run, provider, dtype, p80, unit="GFLOP/s"):
    return dict(ENV, run_id=run, kernel="floor", provider=provider, mode="floor", metric="throughput", unit=unit,
                dtype=dtype, status="ok", p50=p80, p20=p80, p80=p80)


def test_no_percent_of_an_emulated_bf16_floor_and_cache_resident_bandwidth_says_so():
    # an AVX2-only CPU: bf16 matmul 0.8 GFLOP/s against 70 in fp32 (emulated bf16)
    rows = [_floor("r", "matmul", "float32", 70.0), _floor("r", "matmul", "bfloat16", 0.8),
            _floor("r", "copy", "float32", 10.0, "GB/s"),
            _row("r", "dare_cpu", 0.01, dtype="bfloat16", flops=1e9, bytes=1e6),
            _row("r", "eager_maps", 0.5, dtype="bfloat16", flops=1e9, bytes=1e6),
            _row("r", "dare_cpu", 0.001, kernel="rectified_cfg", mode="cfg", shape="s", bytes=3e7),  # 30 GB/s
            _row("r", "copy", 0.002, kernel="rectified_cfg", mode="cfg", shape="s", bytes=2e7)]
    md = report.render_markdown(rows)
    assert report.native_lowp(report.floors(rows)) is False
    assert "not native here" in md and "bf16 rows show no % peak" in md
    dare = next(ln for ln in md.splitlines() if "**dare_cpu**" in ln and "bfloat16" in ln)
    assert "| 100 | - |" in dare  # 100 GFLOP/s measured, no fraction of the 0.8 GFLOP/s floor
    cfg = next(ln for ln in md.splitlines() if "**dare_cpu**" in ln and "rectified_cfg" not in ln and "| cfg |" in ln)
    assert "300% (in cache)" in cfg
    assert "| 100% |" in next(ln for ln in md.splitlines() if "| copy |" in ln and "| cfg |" in ln)
    # a native bf16 floor (AVX512-BF16 / AMX): the fraction is shown
    native = [_floor("r", "matmul", "float32", 70.0), _floor("r", "matmul", "bfloat16", 400.0)] + rows[3:5]
    assert report.native_lowp(report.floors(native)) is True
    assert "| 100 | 25% |" in next(ln for ln in report.render_markdown(native).splitlines() if "**dare_cpu**" in ln)


def test_bench_switches_one_reader(monkeypatch):
    for name in settings.NAMES:
        monkeypatch.delenv(settings.PREFIX + name, raising=False)
        monkeypatch.delenv(settings._OLD_PREFIX + name, raising=False)
    assert settings.quick() is False and settings.budget_s() is None
    monkeypatch.setenv("DARE_KERNELS_BENCH_QUICK", "1")
    monkeypatch.setenv("DARE_KERNELS_BENCH_BUDGET_S", "120")
    assert settings.quick() is True and settings.budget_s() == 120.0
    monkeypatch.setenv("DARE_KERNELS_BENCH_QUICK", "no")
    assert settings.quick() is False
    monkeypatch.delenv("DARE_KERNELS_BENCH_QUICK")
    monkeypatch.setenv("DARE_BENCH_QUICK", "1")  # the old name still works, with a warning
    settings._warned.discard("QUICK")
    with pytest.warns(DeprecationWarning, match="DARE_KERNELS_BENCH_QUICK"):
        assert settings.quick() is True
    monkeypatch.setenv("DARE_KERNELS_BENCH_BUDGET_S", "soon")
    with pytest.raises(ValueError, match="BUDGET_S"):
        settings.budget_s()
    with pytest.raises(ValueError, match="unknown bench switch"):
        settings.bench_switch("QUIK")


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_budget_shares_rounds_and_reasons():
    clock = _Clock()
    b = budget_mod.Budget(120.0, files={"a.py": 10, "b.py": 10}, clock=clock)
    assert b.admit("a.py", "k") is None          # file a: 60 s for 10 cases: 6 s fair, 18 s a case
    assert b.allowance == pytest.approx(18.0)
    assert b.plan(0.5, 10, 0.0, "one call takes") == (10, None)   # 10 rounds fit
    assert b.plan(2.0, 15, 0.0, "one call takes") == (9, None)    # cut to what fits in 18 s
    rounds, why = b.plan(7.0, 15, 0.0, "one call takes")          # 3 rounds = 21 s > 18 s
    assert rounds is None and "one call takes 7.0 s here: 3 rounds would take 21.0 s" in why
    b.record_overhead("compile", 30.0)
    clock.t = 10.0
    why = b.admit("a.py", "compile")
    assert why and "set-up of the previous case of this kind" in why and "30.0 s" in why
    clock.t = 61.0                               # file a's share is spent: the rest of a is skipped ...
    assert "share" in b.admit("a.py", "k")
    assert b.admit("b.py", "k") is None          # ... and b starts with what is left (59 s)
    assert b.file_left() == pytest.approx(59.0)
    clock.t = 121.0
    assert "time budget of 120 s" in b.admit("b.py", "k")
    # a compiling kind never measured: its torch.compile prior decides when the allowance is small
    b2 = budget_mod.Budget(20.0, files={"c.py": 10}, clock=_Clock())
    assert "torch.compile takes about 30.0 s" in b2.admit("c.py", "t.py::test[diffusers_guider_compiled]")
    assert b2.admit("c.py", "t.py::test[diffusers_guider]") is None
    assert budget_mod.matmul_dtype("eager_maps", "bfloat16") == "bfloat16"
    assert budget_mod.matmul_dtype("eager_maps_fp32", "bfloat16") == "float32"
    assert budget_mod.matmul_dtype("sdpa_bias", "bfloat16") is None


def test_progress_eta():
    assert eta_s(0, 10, 5.0) is None
    assert eta_s(2, 10, 10.0) == pytest.approx(40.0)
    assert eta_s(2, 10, 10.0, budget_left=15.0) == pytest.approx(15.0)
    assert eta_s(10, 10, 10.0) == 0.0


def test_budgeted_run_skips_what_would_not_fit(tmp_path):
    """A budgeted pytest-benchmark session through bench/conftest.py: a fast case runs, a slow one is skipped
    after one probe call, an eager bf16 case with a huge FLOP count is skipped before any call."""
    pytest.importorskip("pytest_benchmark")
    d = tmp_path / "bench"
    d.mkdir()
    shutil.copy(REPO / "bench" / "conftest.py", d / "conftest.py")
    calls = tmp_path / "calls.txt"
    (d / "test_bench_budget_cpu.py").write_text(
        "import time\n"
        f"CALLS = {str(calls)!r}\n"
        "def _note(name):\n"
        "    with open(CALLS, 'a') as f:\n"
        "        f.write(name + '\\n')\n"
        "def test_fast(benchmark):\n"
        "    benchmark.extra_info.update(kernel='toy', provider='dare_cpu', mode='fwd', shape='s', dtype='float32')\n"
        "    benchmark.pedantic(lambda: _note('fast'), rounds=5)\n"
        "def test_slow(benchmark):\n"
        "    benchmark.extra_info.update(kernel='toy', provider='slow_peer', mode='fwd', shape='s', dtype='float32')\n"
        "    benchmark.pedantic(lambda: (_note('slow'), time.sleep(1.5)), rounds=5)\n"
        "def test_eager_bf16(benchmark):\n"
        "    benchmark.extra_info.update(kernel='toy', provider='eager_maps', mode='fwd', shape='s',\n"
        "                                dtype='bfloat16', flops=1e16)\n"
        "    benchmark.pedantic(lambda: _note('eager'), rounds=5)\n"
    )
    res = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT", "DARE_"))}
    env["DARE_KERNELS_BENCH_FLOORS"] = "tiny"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])  # this checkout's dare_kernels
    # 3 s of cases: a case may take MIN_CASE_S (3 s) at most, and 3 rounds of 1.5 s do not fit
    proc = subprocess.run([sys.executable, "-m", "pytest", str(d), "--benchmark-only", "-q", "-p", "no:cacheprovider",
                           "-p", "no:xdist", "--bench-csv-dir", str(res), "--bench-run-id", "B1",
                           "--bench-budget-s", "3", f"--rootdir={tmp_path}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["provider"]: r for r in results.read_rows(next(res.glob("cpu-*.csv"))) if r["kernel"] == "toy"}
    assert rows["dare_cpu"]["status"] == "ok" and rows["dare_cpu"]["rounds"] == 5
    assert rows["slow_peer"]["status"] == "skipped" and "one call takes 1.5" in rows["slow_peer"]["reason"]
    assert rows["eager_maps"]["status"] == "skipped" and "bfloat16 matmul rate" in rows["eager_maps"]["reason"]
    seen = calls.read_text().split()
    assert seen.count("slow") == 1 and "eager" not in seen  # one probe call; the eager case never ran


# ---------------------------------------------------------------------------------------------
# committed GPU results, complete and partial runs, same-run ratios
# ---------------------------------------------------------------------------------------------

GPU_RUN = REPO / "bench" / "results" / "gpu-h100-2026-12-06"


def test_the_first_gpu_run_renders_next_to_the_cpu_report(tmp_path):
    from dare_kernels.benchmarking.cli import committed_csvs

    csvs = committed_csvs(REPO / "bench" / "results")
    assert str(GPU_RUN / "bench.csv") in csvs and any(p.endswith("cpu-amd-epyc.csv") for p in csvs)
    rows = results.read_results(GPU_RUN / "bench.csv")
    assert results.complete_runs(rows) == {"20261206T105802Z-device-check"}
    timed = [r for r in rows if r["status"] == "ok"]
    assert len(timed) == 12 and {r["device"] for r in timed} == {"NVIDIA H100 80GB HBM3"}
    assert {r["commit"] for r in rows} == {"2a89074"}  # the corrected commit, not the recorded one
    written = report.write_report(csvs, tmp_path)
    names = sorted(p.name for p in written["md"] + written["png"])
    assert "REPORT-cuda-nvidia-h100-80gb-hbm3.md" in names and "REPORT-cpu-amd-epyc.md" in names
    assert "speedup-cuda-nvidia-h100-80gb-hbm3.png" in names
    md = (tmp_path / "REPORT-cuda-nvidia-h100-80gb-hbm3.md").read_text()
    assert "NVIDIA H100 80GB HBM3 [cuda]" in md and "triton 3.6.0, commit 2a89074, 2026-12-06" in md
    eager = next(ln for ln in md.splitlines() if "| torch_eager |" in ln)
    assert "198 µs" in eager and "9.57×" in eager  # 0.198 ms / 0.0207 ms of the CUDA kernel, same run
    assert "**best dare**" in next(ln for ln in md.splitlines() if "**dare_cuda**" in ln)
    sra = [ln for ln in md.splitlines() if "**dare_triton**" in ln and "wan-1.3b" in ln]
    assert len(sra) == 4 and all("no peer measured in this run" in ln for ln in sra)
    assert "sdpa_flash" in sra[0] and "time budget: 0 s left" in md


def test_ratios_only_between_rows_of_one_run(tmp_path):
    path = tmp_path / "r.csv"
    results.append_rows(path, [_row("run-01", "dare_cpu", 0.005), _row("run-02", "sdpa_bias", 0.010)])
    comps = report.comparisons(report.select_run(results.read_rows(path), "all"))
    assert len(comps) == 2 and all(not c["speedup"] for c in comps)
    md = report.render_markdown(report.select_run(results.read_rows(path), "all"))
    assert "2.00×" not in md and "no peer measured in this run" in md


def test_report_renders_the_last_complete_run_and_lists_partial_ones(tmp_path):
    path = tmp_path / "cpu-x.csv"
    _synthetic(path, "run-01")
    assert results.mark_run_complete(path, "run-01", note="pytest exit status 0")
    results.append_rows(path, [_row("run-02", "dare_cpu", 0.5)])  # cut off after its first row
    rows = results.read_rows(path)
    assert results.complete_runs(rows) == {"run-01"}
    assert {r["run_id"] for r in report.select_run(rows, "latest")} == {"run-01"}
    written = report.write_report([path], tmp_path / "out", plots=False)
    md = written["md"][0].read_text()
    assert "- run(s): run-01" in md and "0.5 s" not in md
    assert "partial runs not rendered (no end-of-run mark): run-02 (1 rows)" in md
    # asked for explicitly, a partial run is rendered and marked partial
    assert "**partial**: run(s) run-02" in report.render_markdown(report.select_run(rows, "run-02"))
    assert not results.mark_run_complete(path, "run-99")  # no rows of that run: nothing appended


@pytest.mark.parametrize("cut", ["ctrl-c", "crash"])
def test_bench_marks_a_run_complete_only_at_its_end(tmp_path, monkeypatch, capsys, cut):
    """`dare-kernels bench` around a stand-in pytest: a run that ends gets its end row, one cut off does not,
    and `report` then renders the complete one."""
    import importlib.util

    from dare_kernels import cli as top
    from dare_kernels.benchmarking import cli as bench_cli

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "pytest_benchmark" else real_find_spec(name, *a))
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "conftest.py").write_text("")
    (bench / "test_bench_x_cpu.py").write_text("")
    monkeypatch.setattr(results, "device_name", lambda device_type: "Test CPU 9000")
    plan = iter([(0.005, 0), (0.5, cut)])
    ids = iter(["20260101T000001Z-1", "20260101T000002Z-1"])
    monkeypatch.setattr(results, "new_run_id", lambda: next(ids))

    def fake_pytest(cmd, cwd=None, env=None):
        p50, end = next(plan)
        run = cmd[cmd.index("--bench-run-id") + 1]
        csv_dir = Path(cmd[cmd.index("--bench-csv-dir") + 1])
        results.append_rows(csv_dir / "cpu-test-cpu-9000.csv", [_row(run, "dare_cpu", p50), _row(run, "sdpa_bias", 0.01)])
        if end == "ctrl-c":
            raise KeyboardInterrupt
        return 3 if end == "crash" else end

    monkeypatch.setattr(bench_cli.subprocess, "call", fake_pytest)
    out = tmp_path / "out"
    args = ["bench", "--device", "cpu", "--bench-dir", str(bench), "--out", str(out), "--no-plots"]
    assert top.main(args) == 0
    if cut == "ctrl-c":
        with pytest.raises(KeyboardInterrupt):
            top.main(args)
    else:
        assert top.main(args) == 3
    rows = results.read_rows(out / "cpu-test-cpu-9000.csv")
    runs = sorted({r["run_id"] for r in rows})
    assert len(runs) == 2 and results.complete_runs(rows) == {runs[0]}
    capsys.readouterr()
    assert top.main(["report", "--csv", str(out / "cpu-test-cpu-9000.csv"), "--out", str(out), "--no-plots",
                     "--print"]) == 0
    md = capsys.readouterr().out
    assert f"- run(s): {runs[0]}" in md and "2.00×" in md
    assert f"partial runs not rendered (no end-of-run mark): {runs[1]} (2 rows)" in md


def test_the_report_names_the_cpu_path_each_run_took(tmp_path):
    """A CPU run records which SRA path (ISA / product kernel per dtype) ran, and the report says it."""
    env = results.environment("cpu")
    from dare_kernels import _ext
    expected = results.cpu_path()
    assert env["cpu_path"] == expected
    if _ext.EXT is not None:  # with the extension: every dtype of the CPU kernels is named
        assert all(f"{d}: " in expected for d in ("float32", "bfloat16", "float16")), expected
    path = tmp_path / "r.csv"
    rows = _synthetic(path)
    results.append_rows(path, [dict(r, run_id="run-02", cpu_path="bfloat16: amx / test kernel") for r in rows])
    md = report.render_markdown(report.select_run(results.read_rows(path), "latest"), title="T")
    assert "- CPU SRA path (ISA / product kernel per dtype): bfloat16: amx / test kernel" in md
    older = report.render_markdown(report.select_run(results.read_rows(path), "run-01"), title="T")
    assert "CPU SRA path" not in older  # a run that did not record it claims nothing
