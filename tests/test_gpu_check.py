"""The prepared device check (tools/gpu_check.sh) rehearsed end to end on CPU, and its pass/fail bookkeeping.

The rehearsal runs every stage of the GPU run (no CUDA build; Triton in its interpreter at tiny shapes; a
few tiny bench rows on a small budget), so a script error surfaces here and not in the minutes of a lent GPU.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import gpu_check_bench  # noqa: E402
import gpu_check_report  # noqa: E402

STAGES = ["env", "build", "pytest", "selftest", "smoke", "racecheck", "memcheck", "synccheck", "initcheck", "bench"]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_out")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)  # the stages set it where they need it, as on a fresh machine
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--rehearse"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    return out, proc


def test_rehearsal_passes_and_writes_its_files(rehearsal):
    out, proc = rehearsal
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    for name in ("gpu_check.log", "gpu_check.json", "gpu_check.md", "stages.csv", "stages.jsonl", "env.json", "bench.csv",
                 "bench.json", "bench_rows.jsonl", "selftest.json", "pytest.xml"):
        assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
    log = (out / "gpu_check.log").read_text()
    assert "gpu_check (rehearse) on cpu: PASSED" in log
    assert "selftest PASSED" in log  # the stage's own output reaches the main log


def test_rehearsal_records_every_stage_in_order(rehearsal):
    out, _ = rehearsal
    stages = [json.loads(x) for x in (out / "stages.jsonl").read_text().splitlines()]
    assert [s["name"] for s in stages] == STAGES
    by_name = {s["name"]: s for s in stages}
    for name in ("env", "pytest", "selftest", "bench"):
        assert by_name[name]["status"] == "passed", by_name[name]
    for name in ("build", "smoke", "racecheck", "memcheck", "synccheck", "initcheck"):
        assert by_name[name]["status"] == "skipped" and "rehearsal" in by_name[name]["reason"], by_name[name]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "rehearse" and report["passed"] is True
    assert report["env"]["torch"] and "missing_modules" in report["env"]
    selftest = json.loads((out / "selftest.json").read_text())
    assert selftest["checks"] and all(c["passed"] for c in selftest["checks"])


def test_rehearsal_bench_has_every_row_measured_or_skipped_with_a_reason(rehearsal):
    out, _ = rehearsal
    rows = list(csv.DictReader((out / "bench.csv").open()))
    providers = {r["provider"] for r in rows}
    assert {"dare_triton", "dare_cuda", "sdpa_flash", "sdpa_bias_efficient", "sdpa_bias_cudnn", "eager_maps",
            "flex_compiled", "diffusers_guider", "torch_eager", "copy"} <= providers
    assert {r["shape"] for r in rows} >= {"wan-1.3b-tiny", "ltx-video-tiny", "cogvideox-5b-tiny"}
    assert not [r for r in rows if r["status"] == "error"], "no row may fail in the rehearsal"
    for r in rows:
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] == "ok":
            assert float(r["ms"]) > 0
        else:
            assert r["reason"], r
    measured = {(r["kernel"], r["provider"]) for r in rows if r["status"] == "ok"}
    assert ("sra_attention", "dare_triton") in measured and ("rectified_cfg", "dare_triton") in measured
    assert ("sra_attention", "sdpa_flash") in measured
    assert any(r["provider"] == "dare_cuda" and "CUDA" in r["reason"] for r in rows)


def _write_stages(out: Path, stages: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "stages.jsonl").write_text("".join(json.dumps(s) + "\n" for s in stages))


@pytest.mark.parametrize("last, want_rc", [
    ({"name": "bench", "status": "passed", "rc": 0}, 0),
    ({"name": "bench", "status": "skipped", "rc": 0, "reason": "pytest is not installed here"}, 0),
    ({"name": "bench", "status": "skipped", "rc": 0, "reason": "time budget: 3 s of 465 s left"}, 1),
    ({"name": "bench", "status": "timeout", "rc": 124, "reason": "killed at its 60 s limit"}, 1),
    ({"name": "bench", "status": "failed", "rc": 1}, 1),
])
def test_summary_exit_code_says_whether_everything_passed(tmp_path, last, want_rc, capsys):
    _write_stages(tmp_path, [{"name": "env", "status": "passed", "rc": 0}, last])
    assert gpu_check_report.summary(tmp_path, "device") == want_rc
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["passed"] is (want_rc == 0)


def test_summary_of_no_stages_is_a_failure(tmp_path, capsys):
    _write_stages(tmp_path, [])
    assert gpu_check_report.summary(tmp_path, "device") == 1


@pytest.mark.slow
def test_gpu_path_dry_run_without_a_gpu_fails_fast_and_runs_every_stage(tmp_path):
    """GPU_CHECK_MODE=device on a machine without a GPU: the GPU path's commands all run (no typo waits for a
    lent GPU to show up), each failing or skipping on its own, later stages still running, exit status 1."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, GPU_CHECK_MODE="device",
               GPU_CHECK_PYTEST_FILES="tests/test_sra_cuda.py")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]
    stages = {s["name"]: s for s in map(json.loads, (tmp_path / "stages.jsonl").read_text().splitlines())}
    assert list(stages) == STAGES
    assert stages["env"]["status"] == "passed"
    for name in ("build", "selftest", "smoke", "bench"):  # each says why, none hangs to its time limit
        assert stages[name]["status"] == "failed", stages[name]
        assert stages[name]["note"], stages[name]
    assert "CUDA" in stages["build"]["note"] and "CUDA" in stages["selftest"]["note"]
    for name in ("racecheck", "memcheck", "synccheck", "initcheck"):
        assert stages[name]["status"] == "skipped" and "skipped" in stages[name]["reason"], stages[name]
    assert json.loads((tmp_path / "gpu_check.json").read_text())["passed"] is False


def test_bench_rows_past_the_budget_or_the_row_cap_are_skipped_with_the_reason(tmp_path, capsys):
    base = dict(kernel="sra_attention", shape="s", dims="", dtype="bfloat16", provider="dare_triton", mode="fwd")
    late = gpu_check_bench.Table(tmp_path, "cpu", budget_s=0.0)
    late.run(base, lambda: (lambda: None), 0.0, 0.0)
    capped = gpu_check_bench.Table(tmp_path, "cpu", budget_s=60.0, rows_per_provider=1)
    capped.run(base, lambda: (lambda: None), 1.0, 1.0)
    capped.run(dict(base, mode="fwd+bwd"), lambda: (lambda: None), 1.0, 1.0)

    def unavailable():
        raise RuntimeError("sra_attention: backend='cuda' is not available: no GPU")
    capped.run(dict(base, provider="dare_cuda"), unavailable, 1.0, 1.0)
    rows = [json.loads(x) for x in (tmp_path / "bench_rows.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["skipped", "ok", "skipped", "skipped"]
    assert rows[0]["reason"].startswith("time budget") and "at most 1 rows" in rows[2]["reason"]
    assert "not available" in rows[3]["reason"] and capped.dare_errors == 0
