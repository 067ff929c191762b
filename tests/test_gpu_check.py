"""The device check (tools/gpu_check.sh) rehearsed the way a GPU machine runs it, and its bookkeeping.

A GPU machine gets a copy of the tree (no git, the package built in place, never installed) and runs
`bash tools/gpu_check.sh --part 1`, then `--part 2 --reuse FILE`. Here both parts run the same way from a copy
of the tracked files, with an interpreter in which ``dare_kernels`` is not importable from site-packages:

- the CPU rehearsal of both parts (every stage's command path, Triton in its interpreter, tiny bench rows);
- the GPU path without a GPU (GPU_CHECK_MODE=device): every stage's device command runs and fails fast or
  skips, and each one's log shows that it got past its imports (the first GPU run lost five stages to a
  ModuleNotFoundError that a rehearsal from the developer's own tree, where the package is installed in
  editable mode, could not see).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import gpu_check_bench  # noqa: E402
import gpu_check_report  # noqa: E402
import gpu_warmup  # noqa: E402

# one xdist worker for the module: the runs below share fixtures and would compete for the 2 CI cores
pytestmark = pytest.mark.xdist_group("gpu_check")

PART1 = ["env", "build", "warmup", "pack", "bench", "host_overhead", "smoke", "racecheck", "memcheck", "synccheck",
         "initcheck", "pytest_core", "selftest_core", "cache", "repack"]
PART2_REUSED = ["env", "reuse", "build", "warmup", "wheels", "bench2", "pytest_gpu", "selftest_models", "sweep",
                "cache"]
SANITIZERS = ("racecheck", "memcheck", "synccheck", "initcheck")
IMPORT_OK = "sra_cuda_smoke: imports ok"  # tools/sra_cuda_smoke.py, also run first by each sanitizer
OUT_FILES = {"gpu_check.md", "gpu_check.json", "stages.csv", "env.json", "bench.csv", "bench.json", "logs.tar.gz"}


# ---------------------------------------------------------------------------------------------
# a copy of the tree and an interpreter without the package
# ---------------------------------------------------------------------------------------------

def _tracked_files() -> list[str]:
    """The tracked files (what a GPU machine's copy holds), or, without git, the tree minus ignored folders."""
    try:
        top = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, check=True).stdout.strip()
        if Path(top).resolve() == ROOT:
            out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True).stdout
            return [f for f in out.decode().split("\0") if f and (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        pass
    skip = {".git", ".venv", "build", "dist", ".gpu_reuse", ".gpu_wheels", "gpu_check_out", "__pycache__"}
    return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
            if p.is_file() and not skip & set(p.relative_to(ROOT).parts) and p.suffix != ".so"]


def _copy_tree(dest: Path) -> Path:
    for rel in _tracked_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    for so in (ROOT / "dare_kernels").glob("_C*.so"):  # the build's output, as the build stage leaves it
        shutil.copy2(so, dest / "dare_kernels" / so.name)
    return dest


def _clean_python(env_dir: Path) -> Path:
    """A fresh virtual environment of this interpreter's base Python that sees the test environment's
    packages (torch, triton, pytest, ...) but not dare_kernels.

    Its only link to them is a .pth file that names their site-packages folders: a folder named by a line of
    a .pth file is added to sys.path without its own .pth files being processed, so the editable install's
    finder hook (``__editable__...pth``) never runs. A site folder that holds the package itself (a regular,
    non-editable install) is replaced by a folder of links to everything else in it. Robust where ``-S`` is
    not: child processes (spawned workers, pytest's subprocesses) inherit the environment as it is."""
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip",
                    str(env_dir)], check=True, capture_output=True)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    dirs = []
    for i, sp in enumerate(site.getsitepackages() + [site.getusersitepackages()]):
        sp = Path(sp)
        if not sp.is_dir():
            continue
        if any(p.name.startswith("dare_kernels") for p in sp.iterdir()):
            farm = env_dir / f"site-{i}"
            farm.mkdir()
            for p in sp.iterdir():
                if not (p.name.startswith(("dare_kernels", "__editable__")) or p.suffix == ".pth"):
                    (farm / p.name).symlink_to(p)
            sp = farm
        dirs.append(str(sp))
    (Path(purelib) / "test-env-packages.pth").write_text("\n".join(dirs) + "\n")
    return py


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "TRITON_INTERPRET", "VIRTUAL_ENV", "GPU_CHECK_COMMIT", "TRITON_CACHE_DIR",
                        "TORCHINDUCTOR_CACHE_DIR", "GPU_CHECK_PYTEST_FILES", "GPU_CHECK_BUDGET_S")}
    env.update(extra)
    return env


def _copied(tmp_path_factory) -> tuple[Path, Path]:
    """(tree, python): a copy of the tracked tree and an interpreter that cannot import dare_kernels (one per
    fixture, so that no run reads another's working files)."""
    base = tmp_path_factory.mktemp("gpu_check_copy")
    return _copy_tree(base / "tree"), _clean_python(base / "env")


@pytest.fixture(scope="module")
def copied(tmp_path_factory):
    return _copied(tmp_path_factory)


def _run(tree: Path, py: Path, args: list[str], out: Path, timeout: int, **extra):
    env = _clean_env(PYTHON=str(py), OUT=str(out), **extra)
    return subprocess.run(["bash", "tools/gpu_check.sh", *args], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _stages(tree: Path, part: str) -> list[dict]:
    lines = (tree / ".gpu_reuse" / f"work-part{part}" / "stages.jsonl").read_text().splitlines()
    return sorted(map(json.loads, lines), key=lambda s: s["seq"])


def _log(tree: Path, part: str, name: str) -> str:
    path = tree / ".gpu_reuse" / f"work-part{part}" / "logs" / f"{name}.log"
    return path.read_text() if path.exists() else ""


def _assert_out_dir(out: Path, want: set[str]) -> None:
    """What a GPU machine hands back: at most 8 plain files, each under 16 MiB, no folders."""
    entries = list(out.iterdir())
    assert all(p.is_file() for p in entries), entries
    assert len(entries) <= 8 and {p.name for p in entries} == want, sorted(p.name for p in entries)
    assert all(p.stat().st_size < 16 * 2**20 for p in entries)


def _assert_past_imports(tree: Path, part: str, stages: list[dict]) -> None:
    """No stage died on an import of the project, and the ones that import it say from where."""
    for s in stages:
        log = _log(tree, part, s["name"])
        assert "No module named 'dare_kernels'" not in log and "ModuleNotFoundError" not in log, (s, log[-3000:])
        assert "ImportError while loading conftest" not in log, (s, log[-3000:])
    names = {s["name"] for s in stages}
    for name in {"smoke", *SANITIZERS} & names:
        assert IMPORT_OK in _log(tree, part, name) and str(tree) in _log(tree, part, name), name
    if "warmup" in names and _log(tree, part, "warmup"):
        assert f"gpu_warmup: dare_kernels 0.1.0 from {tree}" in _log(tree, part, "warmup")
    env = json.loads((tree / ".gpu_reuse" / f"work-part{part}" / "env.json").read_text())
    assert env["dare_kernels_path"] == str((tree / "dare_kernels").resolve()), env


def test_the_clean_interpreter_cannot_import_the_package_but_has_torch(copied, tmp_path):
    """The premise of the runs below: outside the tree, dare_kernels is not importable."""
    _, py = copied
    env = _clean_env()
    fail = subprocess.run([str(py), "-c", "import dare_kernels"], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert fail.returncode != 0 and "No module named 'dare_kernels'" in fail.stderr, fail.stderr
    ok = subprocess.run([str(py), "-c", "import torch, pytest, triton"], cwd=tmp_path, env=env,
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


# ---------------------------------------------------------------------------------------------
# the CPU rehearsal of both parts, from the copy
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    tree, py = _copied(tmp_path_factory)
    out1, out2 = tmp_path_factory.mktemp("out1"), tmp_path_factory.mktemp("out2")
    p1 = _run(tree, py, ["--rehearse", "--part", "1"], out1, 900)
    p2 = _run(tree, py, ["--rehearse", "--part", "2", "--reuse", ".gpu_reuse/gpu_reuse.tar.gz"], out2, 900,
              GPU_CHECK_COMMIT="0123abcd")
    return tree, (p1, out1), (p2, out2)


def test_rehearsal_part1_passes_every_stage_in_order_past_its_imports(rehearsal):
    tree, (proc, out), _ = rehearsal
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    stages = _stages(tree, "1")
    assert [s["name"] for s in stages] == PART1
    by = {s["name"]: s for s in stages}
    for name in ("env", "warmup", "pack", "bench", "pytest_core", "selftest_core", "cache", "repack"):
        assert by[name]["status"] == "passed", by[name]
    assert by["build"]["status"] == "skipped" and "rehearsal" in by["build"]["reason"]
    assert by["smoke"]["status"] == "skipped" and "rehearsal" in by["smoke"]["reason"]
    _assert_past_imports(tree, "1", stages)
    _assert_out_dir(out, OUT_FILES | {"gpu_reuse.tar.gz"})
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["passed"] is True and report["part"] == "1" and report["mode"] == "rehearse"
    assert report["env"]["commit"] == "unknown", report["env"]  # a copy without git and no GPU_CHECK_COMMIT
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"./gpu_check.log", "./stages.jsonl", "./logs/smoke.log", "./warmup.json"} <= names, names
    warm = json.loads((tree / ".gpu_reuse" / "work-part1" / "warmup.json").read_text())
    assert warm["cases"] >= 2 and warm["failed"] == 0 and warm["device"] == "cpu"
    rows = list(csv.DictReader((out / "bench.csv").open()))
    assert rows and not [r for r in rows if r["status"] == "error"]
    assert ("sra_attention", "dare_triton") in {(r["kernel"], r["provider"]) for r in rows if r["status"] == "ok"}


def test_rehearsal_part2_reuses_the_archive_and_records_the_given_commit(rehearsal):
    tree, _, (proc, out) = rehearsal
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    stages = _stages(tree, "2")
    assert [s["name"] for s in stages] == PART2_REUSED
    by = {s["name"]: s for s in stages}
    assert by["reuse"]["status"] == "passed" and "gpu_warmup unpack" in _log(tree, "2", "reuse")
    assert by["build"]["status"] == by["warmup"]["status"] == "skipped"
    assert "reused" in by["build"]["reason"] and "reused" in by["warmup"]["reason"]
    for name in ("pytest_gpu", "selftest_models", "cache"):
        assert by[name]["status"] == "passed", by[name]
    _assert_past_imports(tree, "2", stages)
    bench_ran = by["bench2"]["status"] == "passed"  # a bench without --part ran every row in part 1
    _assert_out_dir(out, OUT_FILES if bench_ran else OUT_FILES - {"bench.csv", "bench.json"})
    assert json.loads((out / "env.json").read_text())["commit"] == "0123abcd"


# ---------------------------------------------------------------------------------------------
# the GPU path on a machine without a GPU, from the copy
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def device_dry_run(tmp_path_factory):
    tree, py = _copied(tmp_path_factory)
    runs = {}
    for part, args in (("1", []), ("2", ["--reuse", ".gpu_reuse/gpu_reuse.tar.gz"])):
        out = tmp_path_factory.mktemp(f"dry{part}")
        # the caps are the GPU machine's; a shared 2-core CI machine starting seven stages at once needs more
        runs[part] = (_run(tree, py, ["--part", part, *args], out, 900, GPU_CHECK_MODE="device",
                           GPU_CHECK_CAP_SCALE="4", GPU_CHECK_PYTEST_FILES="tests/test_sra_cuda.py"), out,
                      _stages(tree, part))
    return tree, runs


@pytest.mark.parametrize("part, order", [("1", PART1), ("2", PART2_REUSED)])
def test_gpu_path_without_a_gpu_runs_every_stage_past_its_imports_and_fails(device_dry_run, part, order):
    """GPU_CHECK_MODE=device without a GPU: every device command runs (no typo waits for a GPU to show up),
    gets past its imports, then fails or skips on its own; later stages still run; exit status 1."""
    tree, runs = device_dry_run
    proc, out, stages = runs[part]
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert [s["name"] for s in stages] == order
    by = {s["name"]: s for s in stages}
    assert by["env"]["status"] == "passed"
    if part == "1":
        assert by["build"]["status"] == "failed" and "CUDA" in by["build"]["note"]
        assert by["warmup"]["status"] == "failed" and "CUDA" in _log(tree, part, "warmup")
    else:  # the archive part 1 left (the extension as found, an empty cache) is this machine's
        assert by["reuse"]["status"] == "passed" and "reused" in by["build"]["reason"]
    for name in [n for n in ("smoke", "selftest_core", "selftest_models") if n in by]:
        assert by[name]["status"] == "failed" and "CUDA" in by[name]["note"], by[name]
    for name in [n for n in SANITIZERS if n in by]:  # on a GPU machine a missing sanitizer is a failure
        assert by[name]["status"] == "failed", by[name]
    _assert_past_imports(tree, part, stages)
    assert json.loads((out / "gpu_check.json").read_text())["passed"] is False


# ---------------------------------------------------------------------------------------------
# bookkeeping
# ---------------------------------------------------------------------------------------------

def _write_stages(work: Path, stages: list[dict]) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / "stages.jsonl").write_text("".join(json.dumps(dict(s, seq=i)) + "\n" for i, s in enumerate(stages)))


@pytest.mark.parametrize("last, want_rc", [
    ({"name": "bench", "status": "passed", "rc": 0}, 0),
    ({"name": "bench", "status": "skipped", "rc": 0, "reason": "pytest is not installed here"}, 0),
    ({"name": "bench", "status": "skipped", "rc": 0, "reason": "time budget: 3 s of 465 s left"}, 1),
    ({"name": "bench", "status": "timeout", "rc": 124, "reason": "killed at its 60 s limit"}, 1),
    ({"name": "bench", "status": "failed", "rc": 1}, 1),
])
def test_summary_exit_code_says_whether_everything_passed(tmp_path, last, want_rc, capsys):
    _write_stages(tmp_path / "work", [{"name": "env", "status": "passed", "rc": 0}, last])
    assert gpu_check_report.summary(tmp_path / "work", tmp_path / "out", "device", "1") == want_rc
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["passed"] is (want_rc == 0)


def test_summary_of_no_stages_is_a_failure(tmp_path, capsys):
    _write_stages(tmp_path / "work", [])
    assert gpu_check_report.summary(tmp_path / "work", tmp_path / "out", "device") == 1


def test_summary_builds_bench_files_from_the_rows_of_a_cut_run(tmp_path, capsys):
    work = tmp_path / "work"
    _write_stages(work, [{"name": "bench", "status": "timeout", "rc": 124}])
    rows = [dict(kernel="sra_attention", shape="s", provider="sdpa_flash", mode="fwd", status="ok", ms=2.0),
            dict(kernel="sra_attention", shape="s", provider="dare_triton", mode="fwd", status="ok", ms=3.0)]
    (work / "bench_rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    gpu_check_report.summary(work, tmp_path / "out", "device")
    assert [r["provider"] for r in csv.DictReader((tmp_path / "out" / "bench.csv").open())] == ["sdpa_flash",
                                                                                               "dare_triton"]
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| sra_attention | s | dare_triton | fwd | 3.000 | 1.50 | sdpa_flash | ok |" in md


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_commit_is_the_projects_own_or_unknown_never_an_enclosing_repositorys(tmp_path):
    outer = tmp_path / "outer"
    (outer / "copy").mkdir(parents=True)
    _git(outer, "init", "-q")
    (outer / "f").write_text("x")
    _git(outer, "add", "f")
    _git(outer, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "outer")
    commit, why = gpu_check_report.project_commit(outer / "copy", {})
    assert commit == "unknown" and str(outer) in why  # the tree is a folder inside another repository
    assert gpu_check_report.project_commit(outer / "copy", {"GPU_CHECK_COMMIT": "abc123"}) == ("abc123",
                                                                                             "GPU_CHECK_COMMIT")
    assert gpu_check_report.project_commit(outer, {})[0] == _git(outer, "rev-parse", "HEAD")
    assert gpu_check_report.project_commit(tmp_path / "outer" / "copy", {})[0] == "unknown"


def _fake_cache(cache: Path, kernels: dict[str, int]) -> None:
    """A Triton cache as Triton writes it: one folder per compile, the binary, its metadata, and a group file
    that names the files by absolute path."""
    for name, n in kernels.items():
        for i in range(n):
            d = cache / f"{name}{i:02d}hash"
            d.mkdir(parents=True)
            (d / f"{name}.cubin").write_bytes(b"\0cubin")
            (d / f"{name}.json").write_text(json.dumps({"name": name}))
            (d / f"{name}.ptx").write_text("ptx")
            children = {f"{name}.{s}": str(d / f"{name}.{s}") for s in ("cubin", "json", "ptx")}
            (d / f"__grp__{name}.json").write_text(json.dumps({"child_paths": children}))


def test_cache_count_pack_and_unpack_into_another_folder(tmp_path, monkeypatch, capsys):
    first, second = tmp_path / "a" / "triton", tmp_path / "b" / "triton"
    _fake_cache(first, {"sra_fwd_kernel": 2, "_combine_kernel": 1})
    assert gpu_warmup.count_binaries(first) == {"_combine_kernel": 1, "sra_fwd_kernel": 2}
    monkeypatch.setenv("TRITON_CACHE_DIR", str(first))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    archive = tmp_path / "reuse.tar.gz"
    assert gpu_warmup.pack(archive, max_mib=15.5) == 0
    monkeypatch.setenv("TRITON_CACHE_DIR", str(second))
    monkeypatch.setattr(gpu_warmup, "ROOT", tmp_path / "tree")  # the extension lands in the tree unpacked into
    assert gpu_warmup.unpack(archive) == 0
    assert gpu_warmup.count_binaries(second) == gpu_warmup.count_binaries(first)
    for grp in second.rglob("__grp__*.json"):  # Triton finds its files where the cache now lies
        paths = json.loads(grp.read_text())["child_paths"].values()
        assert paths and all(p.startswith(str(second)) and Path(p).exists() for p in paths)
    assert {p.name for p in (tmp_path / "tree" / "dare_kernels").iterdir()} == \
        {p.name for p in (ROOT / "dare_kernels").glob("_C*.so")}


def test_unpack_refuses_an_archive_from_another_torch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    archive = tmp_path / "reuse.tar.gz"
    real = gpu_warmup._fingerprint()
    monkeypatch.setattr(gpu_warmup, "_fingerprint", lambda: dict(real, torch="0.0-other"))
    monkeypatch.setattr(gpu_warmup, "ROOT", tmp_path / "tree")
    assert gpu_warmup.pack(archive, max_mib=15.5) == 0
    monkeypatch.setattr(gpu_warmup, "_fingerprint", lambda: real)
    assert gpu_warmup.unpack(archive) == 1
    assert "made elsewhere" in capsys.readouterr().out


def test_cache_report_names_what_the_stages_compiled(tmp_path, capsys):
    (tmp_path / "cache_after_warmup.json").write_text(json.dumps({"sra_fwd_kernel": 4, "sra_map_kernel": 1}))
    (tmp_path / "cache_after_stages.json").write_text(json.dumps({"sra_fwd_kernel": 6, "sra_map_kernel": 1}))
    assert gpu_check_report.cache_report(tmp_path)["added_by_stages"] == {"sra_fwd_kernel": 2}
    gpu_check_report.print_cache(tmp_path)
    out = capsys.readouterr().out
    assert "5 compiled kernels after the warm-up (or as unpacked), 7 after the stages" in out
    assert "(2 of dare_kernels' compiled by the stages" in out


def test_warmup_drives_every_dtype_head_dim_and_mode_the_stages_use():
    """The warm-up's case list covers the benchmark's model shapes (with and without a map, the headline
    shape first), the selftest's small cases and every rectified_cfg mode, branch count and dtype."""
    import torch

    from dare_kernels import selftest
    from dare_kernels.benchmarking.shapes import SELFTEST_SHAPES

    sra = gpu_warmup.sra_cases("cuda")
    assert sra[0]["name"].startswith("wan-1.3b")
    for shape in SELFTEST_SHAPES:
        assert {c["want_map"] for c in sra if c["name"].startswith(shape + " ")} == {True, False}
    small = {(c.dtype, c.D, c.Dv or c.D, c.want_map, c.w_shape, c.mask) for c in selftest.small_cases("cuda")}
    assert small <= {(c["dtype"], c["D"], c["Dv"], c["want_map"], c["w_shape"], c["mask"]) for c in sra}
    cfg = {(c["mode"], c["K"], c["dtype"]) for c in gpu_warmup.cfg_cases("cuda")}
    assert cfg == {(m, k, d) for m in ("cfg", "cfg_zero_star", "apg") for k in (2, 3)
                   for d in (torch.bfloat16, torch.float16, torch.float32)}


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


def test_readme_gpu_check_section_names_every_stage_with_its_cap_and_the_commands():
    """The README's table of stages and caps is the script's: every stage the script runs, with the cap it
    gives it, and the commands of both parts as the script takes them."""
    import re

    script = (ROOT / "tools" / "gpu_check.sh").read_text()
    caps = dict(re.findall(r"(?:^\s*|&& )stage (\w+) (\d+) \d+ ", script, re.M))
    caps.update(re.findall(r'"(\w+) (\d+) [^"]*"', script[script.index("part1() {"):]))
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### GPU check"):]
    section = section[:section.index("\n## ")]
    table = {}
    for row in re.findall(r"^\| (?:1|2|both) \| ([^|]+) \| ([^|]+) \|", section, re.M):
        for name, cap in zip(row[0].split(", "), row[1].split(", ")):
            table[name.strip()] = cap.strip()
    assert table == caps, (table, caps)
    for cmd in ("bash tools/gpu_check.sh --part 1",
                "bash tools/gpu_check.sh --part 2 --reuse .gpu_reuse/gpu_reuse.tar.gz",
                "GPU_CHECK_COMMIT=<sha>", "bash tools/gpu_wheels.sh fetch", ".gpu_wheels", "bench/results/gpu-"):
        assert cmd in section, cmd
