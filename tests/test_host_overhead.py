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
    cfg_kernels = sorted(n for n in vars(tcfg) if n.startswith("_") and n.endswith("_kernel"))
    assert "_stats_kernel" in cfg_kernels and "_combine_kernel" in cfg_kernels
    kernels = (module._kernel, *(getattr(tcfg, n) for n in cfg_kernels))
    with host_overhead.stubbed_triton_launches() as why_not:
        assert why_not is None
        assert isinstance(module._kernel("sra_fwd_kernel"), host_overhead._StubLaunch)
        out = sra_attention(q, k, v, backend="triton")  # nothing runs: the output is left as allocated
        assert out.shape == (1, 2, 16, 16)
        assert all(isinstance(getattr(tcfg, n), host_overhead._StubLaunch) for n in cfg_kernels)
    assert (module._kernel, *(getattr(tcfg, n) for n in cfg_kernels)) == kernels
    ref = sra_attention(q, k, v, backend="reference")
    torch.testing.assert_close(sra_attention(q, k, v, backend="triton"), ref, atol=1e-5, rtol=1e-5)


def test_derived_costs_need_both_rows():
    rows = [dict(op="sra_attention", layer="sra_attention_cpu", status="ok", min_us=30.0, median_us=31.0),
            dict(op="sra_attention", layer="op_cpu", status="skipped", reason="no extension")]
    got = {d["cost"]: d["us"] for d in host_overhead.derived(rows)}
    assert got == {"whole call, no grad": 30.0}


# ---------------------------------------------------------------------------------------------
# host-overhead fixes the tool's measurements led to
# ---------------------------------------------------------------------------------------------

def test_a_call_with_nothing_to_differentiate_skips_the_autograd_wrapper(monkeypatch):
    from dare_kernels import backends, sra

    why = backends.unsupported_reason("sra_attention", "cpu", torch.device("cpu"), torch.float32)
    if why:
        pytest.skip(why)
    entered = []
    real = sra._BelowAutograd

    class Counting:
        def __enter__(self):
            entered.append(1)
            self.guard = real()
            return self.guard.__enter__()

        def __exit__(self, *exc):
            return self.guard.__exit__(*exc)

    monkeypatch.setattr(sra, "_BelowAutograd", Counting)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (11, 7, 7))
    w = torch.rand(2, 7, generator=g) + 0.1
    plain, amap = sra.sra_attention(q, k, v, w, return_attn_map=True, backend="cpu")
    assert len(entered) == 1 and plain.grad_fn is None
    qg, wg = q.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.no_grad():  # grad mode off: nothing to record, whatever requires grad
        off = sra.sra_attention(qg, k, v, wg, backend="cpu")
    assert len(entered) == 2 and off.grad_fn is None
    graded, amap_g = sra.sra_attention(qg, k, v, wg, return_attn_map=True, backend="cpu")
    assert len(entered) == 2 and graded.grad_fn is not None  # the autograd path, untouched
    assert torch.equal(plain, graded.detach()) and torch.equal(plain, off) and torch.equal(amap, amap_g.detach())
    graded.sum().backward()
    assert qg.grad is not None and wg.grad is not None and torch.isfinite(wg.grad).all()
    ref = sra.sra_attention(q.double(), k.double(), v.double(), w.double(), backend="reference")
    torch.testing.assert_close(plain.double(), ref, atol=1e-5, rtol=1e-5)


def test_the_backend_choice_for_cuda_inputs_is_resolved_once(monkeypatch):
    from dare_kernels import backends

    calls = []

    def reason(op, backend, device, dtype, head_dim=None, head_dim_v=None):
        calls.append((backend, head_dim))
        return "not built here" if backend == "cuda" else None

    monkeypatch.setattr(backends, "unsupported_reason", reason)
    monkeypatch.setattr(backends, "_CUDA_CHOICE", {})
    pick = lambda b, d=64: backends.choose("sra_attention", b, "cuda", torch.bfloat16, head_dim=d, head_dim_v=d)  # noqa: E731
    assert pick("triton") == "triton" and pick("triton") == "triton"
    assert calls == [("triton", 64)]
    assert pick("triton", 128) == "triton" and len(calls) == 2  # another head dim is another key
    for _ in range(2):  # an unusable backend is never cached: its error comes every time
        with pytest.raises(RuntimeError, match="not built here"):
            pick("cuda")
    assert len(calls) == 4
    auto = pick("auto")
    n = len(calls)
    assert pick("auto") == auto and len(calls) == n
    # CPU tensors on Triton are never cached (TRITON_INTERPRET is read live)
    backends.choose("sra_attention", "triton", "cpu", torch.float32, head_dim=8, head_dim_v=8)
    backends.choose("sra_attention", "triton", "cpu", torch.float32, head_dim=8, head_dim_v=8)
    assert calls[-2:] == [("triton", 8), ("triton", 8)]
