"""The device check's bench table (tools/gpu_check_bench.py): peers before dare rows, ratios always.

The order is checked on the plan the script would run, without running it; a tiny CPU run of each part
(Triton in its interpreter, FlexAttention eager) checks that rows and ratios come out, and a run cut short
keeps the ratios of what it reached.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

import _triton_interp  # noqa: F401  (TRITON_INTERPRET before the kernels load, without CUDA)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import gpu_check_bench  # noqa: E402
from gpucheck import plan as P  # noqa: E402  (bench/ is on sys.path through gpu_check_bench)
from gpucheck import table as T  # noqa: E402

PLANS = [(part, tiny) for part in P.PARTS for tiny in (False, True)]


@pytest.mark.parametrize("part, tiny", PLANS)
def test_every_dare_row_runs_after_the_peers_it_is_judged_against(part, tiny):
    rows = P.plan(part, tiny)
    assert not P.order_violations(rows)
    first_dare: dict = {}
    for i, r in enumerate(rows):
        if r.role == "dare":
            first_dare.setdefault((r.unit, r.mode), i)
    assert first_dare, "the plan has no dare row"
    for (unit, mode), i in first_dare.items():
        refs = [j for j, r in enumerate(rows) if r.unit == unit and r.mode == mode and r.role == "reference"]
        assert refs and max(refs) < i, (unit, mode)
        # the other peers of the mode follow the dare rows (a cut keeps the references, not the extras)
        others = [j for j, r in enumerate(rows) if r.unit == unit and r.mode == mode and r.role == "peer"]
        assert all(j > i for j in others), (unit, mode)


@pytest.mark.parametrize("part", ["1", "all"])
def test_the_headline_unit_comes_first_and_its_reference_leads(part):
    rows = P.plan(part)
    head = rows[0]
    assert (head.kernel, head.shape, head.dtype, head.mode) == ("sra_attention", "wan-1.3b", "bfloat16", "fwd")
    assert head.attn.N == 32760 and head.attn.M == 512 and head.attn.D == 128 and head.attn.H == 12
    assert [r.provider for r in rows[:4]] == ["sdpa_flash", "sdpa_bias", "dare_triton", "dare_cuda"]
    units = list(dict.fromkeys(r.unit for r in rows))
    assert units[0] == ("sra_attention", "wan-1.3b", "bfloat16")
    # every mode of the headline unit, each with dare rows and its peers
    head_rows = [r for r in rows if r.unit == units[0]]
    assert {r.mode for r in head_rows} == set(P.ATTN_MODES)
    providers = {r.provider for r in head_rows}
    assert {"sdpa_flash", "sdpa_bias", "sdpa", "sdpa_bias_efficient", "sdpa_bias_cudnn", "flex_compiled",
            "eager_maps", "dare_triton", "dare_cuda"} <= providers


def test_parts_split_the_units_and_all_is_both():
    one, two, both = P.plan("1"), P.plan("2"), P.plan("all")
    units = lambda rows: list(dict.fromkeys(r.unit for r in rows))  # noqa: E731
    assert units(one) == [("sra_attention", "wan-1.3b", "bfloat16"), ("rectified_cfg", "wan-81f-480p", "bfloat16")]
    assert {r.provider for r in one if r.kernel == "rectified_cfg"} == {"dare_triton", "dare_cuda", "torch_eager",
                                                                         "diffusers_guider", "copy"}
    assert units(two) == [("sra_attention", s, "bfloat16") for s in P.PART2_SHAPES] + [
        ("sra_attention", "wan-1.3b", "float16"), ("diffusers_layer", "wan-1.3b-attn2", "bfloat16")]
    assert both == one + two
    layer = [r for r in two if r.kernel == "diffusers_layer"]
    assert {(r.provider, r.mode) for r in layer} >= {("stock", "fwd"), ("dare_triton", "fwd"),
                                                     ("eager_maps", "fwd+map"), ("dare_triton", "fwd+map")}
    assert "dim=1536 heads=12 N=32760 M=512" == layer[0].dims
    with pytest.raises(ValueError, match="part must be one of"):
        P.plan("3")


def test_the_order_check_fails_when_a_dare_row_runs_ahead_of_its_peers():
    rows = P.plan("1")
    # plant the bug: the headline's first dare row swapped ahead of its reference peers
    i = next(i for i, r in enumerate(rows) if r.role == "dare")
    bad = [rows[i]] + rows[:i] + rows[i + 1:]
    assert any("runs before its reference sdpa_flash fwd" in v for v in P.order_violations(bad))
    # a map mode's dare row judged against the mode without the map, reordered before it
    j = next(i for i, r in enumerate(rows) if r.role == "dare" and r.mode == "fwd+map")
    bad = [rows[j]] + rows[:j] + rows[j + 1:]
    assert any("fwd+map runs before its reference eager_maps" in v for v in P.order_violations(bad))
    assert any("sdpa_flash fwd" in v for v in P.order_violations(bad))
    # a unit split in two
    cfg_start = next(i for i, r in enumerate(rows) if r.kernel == "rectified_cfg")
    bad = rows[:2] + rows[cfg_start:] + rows[2:cfg_start]
    assert any("is split" in v for v in P.order_violations(bad))
    # a reference left out of the plan
    bad = [r for r in rows if r.provider != "eager_maps"]
    assert any("is not in the plan" in v for v in P.order_violations(bad))


def _row(provider, mode, ms, role, peak=None, shape="s"):
    return dict(kernel="sra_attention", shape=shape, dtype="bfloat16", provider=provider, mode=mode, role=role,
                status="ok", ms=ms, peak_mem_mb=peak)


def test_ratios_are_peer_over_dare_and_map_modes_also_meet_the_mode_without_the_map():
    rows = [_row("sdpa_flash", "fwd", 1.0, "reference"), _row("sdpa_bias", "fwd", 3.0, "reference"),
            _row("dare_triton", "fwd", 2.0, "dare"), _row("flex_compiled", "fwd", 5.0, "peer"),
            _row("eager_maps", "fwd+map", 8.0, "reference"), _row("dare_triton", "fwd+map", 2.5, "dare"),
            _row("sdpa_bias", "fwd+bwd", 9.0, "reference", peak=400.0),
            _row("dare_triton", "fwd+bwd", 6.0, "dare", peak=100.0),
            dict(_row("sdpa_flash", "fwd", 1.0, "reference", shape="other")),
            dict(_row("dare_cuda", "fwd", None, "dare"), status="skipped")]
    got = {(r["dare"], r["mode"], r["peer"], r["peer_mode"]): r for r in T.ratios(rows)}
    assert got[("dare_triton", "fwd", "sdpa_flash", "fwd")]["ratio"] == pytest.approx(0.5)
    assert got[("dare_triton", "fwd", "sdpa_bias", "fwd")]["ratio"] == pytest.approx(1.5)
    assert got[("dare_triton", "fwd", "flex_compiled", "fwd")]["ratio"] == pytest.approx(2.5)
    assert got[("dare_triton", "fwd+map", "eager_maps", "fwd+map")]["ratio"] == pytest.approx(3.2)
    assert got[("dare_triton", "fwd+map", "sdpa_flash", "fwd")]["ratio"] == pytest.approx(0.4)
    assert got[("dare_triton", "fwd+map", "dare_triton", "fwd")]["ratio"] == pytest.approx(0.8)  # the map's cost
    bwd = got[("dare_triton", "fwd+bwd", "sdpa_bias", "fwd+bwd")]
    assert bwd["ratio"] == pytest.approx(1.5) and bwd["mem_ratio"] == pytest.approx(0.25)
    assert not any(k[0] == "dare_cuda" for k in got)  # a skipped dare row has no ratio
    assert all(r["shape"] == "s" for r in got.values())  # never across shapes
    assert len(got) == 8


def test_a_run_cut_short_keeps_the_ratios_it_reached(tmp_path, capsys):
    table = gpu_check_bench.Table(tmp_path, "cpu", budget_s=60.0)
    rows = P.plan("1", tiny=True)
    calls = []
    for r in rows[:3]:  # sdpa_flash, sdpa_bias, dare_triton at fwd; then the budget runs out
        table.run(r.base(), lambda r=r: (lambda: calls.append(r.provider)), 1.0, 1.0)
    table.deadline = 0.0
    for r in rows[3:]:
        table.run(r.base(), lambda: pytest.fail("a row past the budget ran"), 1.0, 1.0)
    report = json.loads((tmp_path / "bench.json").read_text())
    assert list(report) == ["device", "ratios", "rows"]  # the ratios lead
    assert {(r["dare"], r["peer"]) for r in report["ratios"]} == {("dare_triton", "sdpa_flash"),
                                                                   ("dare_triton", "sdpa_bias")}
    assert [r["status"] for r in report["rows"]] == ["ok"] * 3 + ["skipped"] * (len(rows) - 3)
    assert all(r["reason"].startswith("time budget") for r in report["rows"][3:])
    md = (tmp_path / "bench.md").read_text()
    assert md.index("Bench ratios") < md.index("Bench rows") and "| dare_triton | sdpa_flash (fwd) |" in md
    assert len(list(csv.DictReader((tmp_path / "bench_ratios.csv").open()))) == 2
    assert len((tmp_path / "bench_rows.jsonl").read_text().splitlines()) == len(rows)


@pytest.fixture
def interpreted(monkeypatch):
    module, why = _triton_interp.load_sra_triton()
    if module is None and not torch.cuda.is_available():
        pytest.skip(why)
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # read live by the backend registry
    # one call per row: the rehearsal checks the bookkeeping, not the timing
    monkeypatch.setattr(T, "measure", lambda fn, device: [_timed_once(fn)])


def _timed_once(fn) -> float:
    import time

    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@pytest.mark.parametrize("part", ["1", "2"])
def test_tiny_cpu_run_of_each_part_writes_rows_with_ratios(tmp_path, part, interpreted, capsys):
    rc = gpu_check_bench.main(["--part", part, "--out", str(tmp_path), "--device", "cpu", "--tiny",
                               "--rows-per-provider", "4", "--budget-s", "300"])
    assert rc == 0, capsys.readouterr().out[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = report["rows"]
    assert [(r["kernel"], r["shape"], r["provider"], r["mode"]) for r in rows] == [
        (r.kernel, r.shape, r.provider, r.mode) for r in P.plan(part, tiny=True)]
    assert not [r for r in rows if r["status"] == "error"]
    assert all(r["reason"] for r in rows if r["status"] != "ok")
    measured = {(r["kernel"], r["provider"], r["mode"]) for r in rows if r["status"] == "ok"}
    ratios = {(r["kernel"], r["dare"], r["mode"], r["peer"]) for r in report["ratios"]}
    if part == "1":
        for mode in P.ATTN_MODES:  # every mode's dare row ran (backward with dw through the interpreter)
            assert ("sra_attention", "dare_triton", mode) in measured
        assert {("sra_attention", "dare_triton", "fwd", "sdpa_flash"), ("sra_attention", "dare_triton", "fwd", "sdpa_bias"),
                ("sra_attention", "dare_triton", "fwd+bwd", "sdpa_bias"),
                ("sra_attention", "dare_triton", "fwd+map+bwd", "eager_maps"),
                ("rectified_cfg", "dare_triton", "cfg+rescale", "torch_eager"),
                ("rectified_cfg", "dare_triton", "cfg+rescale", "copy")} <= ratios
        cuda = [r for r in rows if r["provider"] == "dare_cuda"]
        assert cuda and all(r["status"] == "skipped" and "cuda" in r["reason"].lower() for r in cuda)
    else:
        assert ("sra_attention", "dare_triton", "fwd", "sdpa_flash") in ratios
        assert {r["shape"] for r in rows} >= {"ltx-video-tiny", "cogvideox-5b-tiny", "animatediff-d40-tiny"}
        layer = [r for r in rows if r["kernel"] == "diffusers_layer"]
        if all("diffusers is not installed" in str(r.get("reason")) for r in layer):
            assert not any(r["status"] == "ok" for r in layer)
        else:
            assert ("diffusers_layer", "dare_triton", "fwd", "stock") in ratios
            assert ("diffusers_layer", "dare_triton", "fwd+map", "eager_maps") in ratios
    md = (tmp_path / "bench.md").read_text()
    assert md.startswith("## Bench ratios") and "| dare_triton |" in md
