"""The command line meets a missing optional dependency with one line saying what to install, not a traceback.

The dependency is hidden in a fresh interpreter (``sys.modules[name] = None`` makes ``import name`` raise
ModuleNotFoundError, as on a machine without it).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from dare_kernels.cli import main, missing_dependency_message


def _run_without(module: str, argv: list[str]) -> subprocess.CompletedProcess:
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from dare_kernels.cli import main\n"
            f"sys.exit(main({argv!r}))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module,extra", [("diffusers", "diffusers"), ("matplotlib", "diffusers")])
def test_maps_without_an_optional_dependency_says_what_to_install(module, extra):
    res = _run_without(module, ["maps", "--steps", "1"])
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"dare-kernels maps: needs {module}" in res.stderr
    assert f"pip install {module}" in res.stderr and f".[{extra}]" in res.stderr


def test_bench_without_pytest_benchmark_says_what_to_install():
    res = _run_without("pytest_benchmark", ["bench"])
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "pytest-benchmark" in res.stderr


def test_a_missing_module_that_is_not_optional_still_raises(monkeypatch):
    assert missing_dependency_message("maps", ModuleNotFoundError("x", name="no_such_dependency")) is None
    assert "needs wordfreq" in missing_dependency_message("x", ModuleNotFoundError("x", name="wordfreq.sub"))
    import dare_kernels.maps_cli as maps_cli

    def broken(args):
        raise ModuleNotFoundError("No module named 'no_such_dependency'", name="no_such_dependency")

    monkeypatch.setattr(maps_cli, "_cmd_maps", broken)
    with pytest.raises(ModuleNotFoundError):
        main(["maps"])


def test_maps_runs_wan_with_a_short_prompt(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("matplotlib")
    out = tmp_path / "wan.png"
    assert main(["maps", "--model", "wan", "--text-len", "16", "--tokens", "0,5", "--weights", "5:3.0",
                 "--frames", "5", "--height", "32", "--width", "32", "--steps", "1", "--layers", "1",
                 "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
