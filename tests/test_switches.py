"""The one table of switches: every switch the tree reads is in it and in the README table; parsing is cached."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dare_kernels import switches

ROOT = Path(__file__).resolve().parents[1]
SOURCE_SUFFIXES = {".py", ".cpp", ".h", ".cu", ".cuh", ".inc", ".sh"}
SKIP_DIRS = {".git", ".venv", "build", "node_modules", "__pycache__"}

# reads of a variable by name: getenv("X") (C++ and Python), os.environ.get("X") / ["X"] / setdefault,
# monkeypatch.setenv / delenv, env_is("X", ...), switches.get("X"), ${X} / $X in shell scripts
_READ_PATTERNS = [
    re.compile(r"""getenv\(\s*["']([A-Z][A-Z0-9_]+)["']"""),
    re.compile(r"""environ(?:\.get|\.setdefault|\.pop)?\(\s*["']([A-Z][A-Z0-9_]+)["']"""),
    re.compile(r"""environ\[\s*["']([A-Z][A-Z0-9_]+)["']\s*\]"""),
    re.compile(r"""(?:setenv|delenv)\(\s*["']([A-Z][A-Z0-9_]+)["']"""),
    re.compile(r"""env_is\(\s*["']([A-Z][A-Z0-9_]+)["']"""),
    re.compile(r"""switches\.get\(\s*["']([A-Z][A-Z0-9_]+)["']"""),
    re.compile(r"""\$\{?(DARE_[A-Z0-9_]+)"""),
]
# C++ string literals naming one of our variables (tables of switches, error messages)
_CPP_LITERAL = re.compile(r'"(DARE_KERNELS_[A-Z0-9_]+)')

# Old names the benchmark harness still accepts, with a deprecation warning (bench_switch).
PENDING_RENAME = {
    "DARE_BENCH_QUICK": "DARE_KERNELS_BENCH_QUICK",
    "DARE_BENCH_FLOORS": "DARE_KERNELS_BENCH_FLOORS",
    "DARE_BENCH_CSV_DIR": "DARE_KERNELS_BENCH_CSV_DIR",
    "DARE_BENCH_RUN_ID": "DARE_KERNELS_BENCH_RUN_ID",
    "DARE_BENCH_BUDGET_S": "DARE_KERNELS_BENCH_BUDGET_S",
}


def _source_files():
    for path in ROOT.rglob("*"):
        if path.suffix in SOURCE_SUFFIXES and path.is_file() and not SKIP_DIRS & set(path.relative_to(ROOT).parts):
            yield path


def _names_read() -> dict[str, set[str]]:
    """{variable name: files reading it} for every DARE_* name the tree reads or sets."""
    found: dict[str, set[str]] = {}
    for path in _source_files():
        text = path.read_text(errors="replace")
        names = set()
        for pat in _READ_PATTERNS:
            names.update(pat.findall(text))
        if path.suffix in {".cpp", ".h", ".cu", ".cuh", ".inc"}:
            names.update(_CPP_LITERAL.findall(text))
        for name in names:
            if name.startswith("DARE_"):
                found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def test_the_scan_finds_known_reads():
    # the scan itself must work: these reads exist in C++, Python and shell code
    found = _names_read()
    for name in ("DARE_KERNELS_CPU_ISA", "DARE_KERNELS_DISABLE_EXT", "DARE_KERNELS_OFFLINE"):
        assert name in found, name


def test_every_switch_read_is_in_the_table():
    table = {s.name for s in switches.TABLE}
    missing = {name: sorted(files) for name, files in _names_read().items()
               if name not in table and name not in PENDING_RENAME}
    assert not missing, f"switches read but not in dare_kernels/switches.py: {missing}"
    for old, new in PENDING_RENAME.items():
        assert new in table, (old, new)


def test_every_switch_has_our_prefix_and_a_valid_entry():
    assert len({s.name for s in switches.TABLE}) == len(switches.TABLE)
    for s in switches.TABLE:
        assert s.name.startswith(switches.PREFIX), s.name
        assert s.scope in switches.SCOPES, s
        assert s.audience in ("user", "measurement"), s
        assert s.doc and "|" not in s.doc + s.default, s  # the README table has no escaped pipes
        if isinstance(s.allowed, tuple):
            assert s.default in s.allowed, s


def test_readme_has_one_table_with_every_switch_and_its_default():
    readme = (ROOT / "README.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(DARE_KERNELS_[A-Z0-9_]+)` \| `([^`]*)` \|", readme,
                                                        re.M)}
    for s in switches.TABLE:
        assert s.name in rows, f"{s.name} is missing from the README's switch table"
        assert rows[s.name] == s.default, (s.name, rows[s.name], s.default)
    assert set(rows) == {s.name for s in switches.TABLE}
    assert readme.count("| switch | default |") == 1
    # user-facing rows first, then the labelled measurement-only group
    names = list(rows)
    label = readme.index("**measurement only**")
    for s in switches.TABLE:
        before = readme.index(f"| `{s.name}`") < label
        assert before == (s.audience == "user"), s.name
    assert names  # the regex matched


def test_parse_is_cached_until_reload():
    # a plain MonkeyPatch: the suite's monkeypatch fixture reloads the switches after every change
    with pytest.MonkeyPatch.context() as monkeypatch:
        _check_cached_until_reload(monkeypatch)
    switches.reload()


def _check_cached_until_reload(monkeypatch):
    name = "DARE_KERNELS_TRITON_AUTOTUNE"
    monkeypatch.setenv(name, "0")
    switches.reload()
    assert switches.get(name) is False
    monkeypatch.setenv(name, "1")
    assert switches.get(name) is False  # cached
    switches.reload()
    assert switches.get(name) is True
    monkeypatch.setenv(name, "")  # set but empty reads as the default (0)
    switches.reload()
    assert switches.get(name) is False
    monkeypatch.delenv(name)
    switches.reload()


@pytest.mark.parametrize("name,value,words", [
    ("DARE_KERNELS_TRITON_AUTOTUNE", "maybe", "0 or 1"),
    ("DARE_KERNELS_BENCH_BUDGET_S", "soon", "number"),
    ("DARE_KERNELS_BENCH_FLOORS", "huge", "measured, tiny"),
])
def test_bad_values_raise_naming_the_switch(monkeypatch, name, value, words):
    monkeypatch.setenv(name, value)
    switches.reload()
    try:
        with pytest.raises(ValueError, match=name) as e:
            switches.get(name)
        assert words in str(e.value)
    finally:
        monkeypatch.delenv(name)
        switches.reload()


def test_a_default_computed_by_the_reader_reads_as_none(monkeypatch):
    monkeypatch.delenv("DARE_KERNELS_BENCH_RUN_ID", raising=False)
    switches.reload()
    assert switches.get("DARE_KERNELS_BENCH_RUN_ID") is None
    monkeypatch.setenv("DARE_KERNELS_BENCH_RUN_ID", "run-7")
    switches.reload()
    assert switches.get("DARE_KERNELS_BENCH_RUN_ID") == "run-7"
    monkeypatch.delenv("DARE_KERNELS_BENCH_RUN_ID")
    switches.reload()


def test_unknown_switch_name_raises():
    name = switches.PREFIX + "NOPE"  # built here: the scan above must not find it
    with pytest.raises(KeyError, match=name):
        switches.get(name)


def test_resolved_lists_every_switch_and_info_prints_them():
    res = switches.resolved()
    for s in switches.TABLE:
        assert s.name in res and res[s.name]["value"] != "", s.name
    for name, _ in switches.FOREIGN:
        assert name in res
    out = subprocess.run([sys.executable, "-m", "dare_kernels", "info"], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "DARE_KERNELS_CPU_ROWS": "avx512f"})
    for s in switches.TABLE:
        assert s.name in out.stdout, s.name
    assert re.search(r"DARE_KERNELS_CPU_ROWS\s+avx512f", out.stdout), out.stdout
