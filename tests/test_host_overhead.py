"""tools/host_overhead.py rehearsed on CPU: every layer of the call path is timed (or skipped with the reason),
the derived costs are differences of what was measured, the files come out, and the Triton launch stub
really stands in for the kernels (so what is timed is the wrapper, not an interpreted kernel).

No time is asserted: the numbers depend on the machine; only that they exist and are positive.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _triton_interp  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import host_overhead  # noqa: E402

SRA_LAYERS = {"python_call", "check_inputs", "choose_auto", "choose_cpu", "choose_triton", "ops_for", "expand_weight",
              "alloc_outputs", "python_custom_op", "op_cpu", "op_cpu_below_autograd", "op_cpu_autograd",
              "sra_attention_cpu", "sra_attention_cpu_grad", "op_triton_stubbed", "op_triton_stubbed_map",
              "sra_attention_triton_stubbed"}
CFG_LAYERS = {"check_inputs", "choose_cpu", "op_cpu", "op_cpu_below_autograd", "rectified_cfg_cpu",
              "op_triton_stubbed", "rectified_cfg_triton_stubbed"}


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """The CLI as the device check calls it, in a fresh process (TRITON_INTERPRET is set by the tool)."""
    out = tmp_path_factory.mktemp("host_overhead")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "host_overhead.py"), "--out", str(out), "--device",
                           "cpu", "--calls", "30", "--repeats", "2"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    return out, proc


def test_cpu_run_times_every_layer_and_writes_its_files(cpu_run):
    out, proc = cpu_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "host_overhead.json").read_text())
    by_op = {}
    for r in report["layers"]:
        by_op.setdefault(r["op"], {})[r["layer"]] = r
    assert set(by_op["sra_attention"]) == SRA_LAYERS and set(by_op["rectified_cfg"]) == CFG_LAYERS
    has_ext = "op_cpu" in by_op["sra_attention"] and by_op["sra_attention"]["op_cpu"]["status"] == "ok"
    for op, layers in by_op.items():
        for name, r in layers.items():
            assert r["status"] in ("ok", "skipped"), (op, name, r)
            if r["status"] == "ok":
                assert 0 < r["min_us"] <= r["median_us"], (op, name, r)
            else:
                assert r["reason"], (op, name)
    if has_ext:  # the derived costs are differences of measured rows
        derived = {(d["op"], d["cost"]): d for d in report["derived"]}
        whole = derived[("sra_attention", "whole call, no grad")]
        assert whole["us"] == by_op["sra_attention"]["sra_attention_cpu"]["min_us"]
        wrapper = derived[("sra_attention", "public wrapper (checks, choice, expansion, packing)")]
        assert wrapper["us"] == pytest.approx(by_op["sra_attention"]["sra_attention_cpu"]["min_us"]
                                              - by_op["sra_attention"]["op_cpu"]["min_us"])
    assert by_op["sra_attention"]["op_triton_stubbed"]["status"] == "ok"  # the interpreter set-up, stubbed launch
    assert report["graphs"][0]["capture"].startswith("skipped: needs a CUDA device")
    md = (out / "host_overhead.md").read_text()
    assert "| sra_attention | check_inputs |" in md and "eager - replay" in md


def test_the_stub_replaces_every_triton_launch_and_is_undone(monkeypatch):
    module, why = _triton_interp.load_sra_triton()
    if module is None:
        pytest.skip(why)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from dare_kernels.triton import rectified_cfg as tcfg

    from dare_kernels import sra_attention

    q, k, v = torch.randn(1, 2, 16, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    kernels = (module._kernel, tcfg._stats_kernel, tcfg._coeff_kernel, tcfg._combine_kernel)
    with host_overhead.stubbed_triton_launches() as why_not:
        assert why_not is None
        assert isinstance(module._kernel("sra_fwd_kernel"), host_overhead._StubLaunch)
        out = sra_attention(q, k, v, backend="triton")  # nothing runs: the output is left as allocated
        assert out.shape == (1, 2, 16, 16)
        assert all(isinstance(getattr(tcfg, n), host_overhead._StubLaunch)
                   for n in ("_stats_kernel", "_coeff_kernel", "_combine_kernel"))
    assert (module._kernel, tcfg._stats_kernel, tcfg._coeff_kernel, tcfg._combine_kernel) == kernels
    ref = sra_attention(q, k, v, backend="reference")
    torch.testing.assert_close(sra_attention(q, k, v, backend="triton"), ref, atol=1e-5, rtol=1e-5)


def test_derived_costs_need_both_rows():
    rows = [dict(op="sra_attention", layer="sra_attention_cpu", status="ok", min_us=30.0, median_us=31.0),
            dict(op="sra_attention", layer="op_cpu", status="skipped", reason="no extension")]
    got = {d["cost"]: d["us"] for d in host_overhead.derived(rows)}
    assert got == {"whole call, no grad": 30.0}
