"""The contract lives in the repo: every "SPEC §N" citation in the tree names a section of docs/SPEC.md, and
nothing cites a specification or build notes outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("dare_kernels", "csrc", "python", "tests", "bench", "tools", "docs", "examples")
SUFFIXES = {".py", ".cpp", ".h", ".cu", ".cuh", ".inc", ".md", ".txt", ".sh", ".toml"}


def _source_files():
    files = [ROOT / "README.md", ROOT / "CMakeLists.txt", ROOT / "setup.py", ROOT / "pyproject.toml"]
    for d in SOURCE_DIRS:
        files += [p for p in (ROOT / d).rglob("*") if p.is_file() and p.suffix in SUFFIXES]
    return [f for f in files if f.exists() and "results" not in f.parts]


def _spec_sections() -> set[str]:
    text = (ROOT / "docs" / "SPEC.md").read_text()
    return set(re.findall(r"^## (\d+)\.", text, flags=re.M)) | set(re.findall(r"^### (\d+\.\d+)", text, flags=re.M))


def test_spec_has_the_four_sections_the_code_cites():
    assert {"1", "2", "3", "4"} <= _spec_sections()


def test_every_spec_citation_names_an_existing_section():
    sections = _spec_sections()
    bad = []
    for f in _source_files():
        for m in re.finditer(r"SPEC(?:\.md)? §(\d+(?:\.\d+)?)", f.read_text(errors="ignore")):
            if m.group(1) not in sections:
                bad.append(f"{f.relative_to(ROOT)}: §{m.group(1)}")
    assert not bad, bad


def test_nothing_cites_documents_outside_the_repository():
    bad = [str(f.relative_to(ROOT)) for f in _source_files()
           if re.search(r"\.\./shared|BUILD_NOTES|shared folder", f.read_text(errors="ignore"))
           and f.name != "test_docs.py"]
    assert not bad, bad
    assert (ROOT / "docs" / "BUILD.md").is_file()
