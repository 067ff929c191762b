"""Every ```python block of README.md runs as pasted, each in a fresh namespace.

A block that cannot run here (it needs a GPU, a download) is skipped only when the line before it says
why: ``<!-- readme-test: skip (the reason) -->``; the skip then shows in the test report with that reason.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line of the opening fence, code, skip reason or None) for every ```python block of ``text``."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            if j == len(lines):
                raise AssertionError(f"README.md:{start + 1}: a ```python block is never closed")
            prev = lines[start - 1] if start > 0 else ""
            m = SKIP.search(prev)
            blocks.append((start + 1, "\n".join(lines[start + 1:j]) + "\n", m.group("reason").strip() if m else None))
            i = j + 1
        else:
            i += 1
    return blocks


BLOCKS = python_blocks(README.read_text())


def test_the_readme_has_the_blocks_it_documents():
    # the SRA attention and rectified-CFG examples at least; a parser that finds nothing would pass vacuously
    assert len(BLOCKS) >= 2
    assert any("sra_attention(" in code for _, code, _ in BLOCKS)
    assert any("rectified_cfg(" in code for _, code, _ in BLOCKS)


def test_the_parser_reads_fences_and_skip_reasons():
    text = "x\n```python\na = 1\n```\n<!-- readme-test: skip (needs a GPU) -->\n```python\nb = 2\n```\n"
    assert python_blocks(text) == [(2, "a = 1\n", None), (6, "b = 2\n", "needs a GPU")]


@pytest.mark.parametrize("line,code,skip", BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_block_runs_as_pasted(line, code, skip):
    if skip:
        pytest.skip(f"README.md:{line}: {skip}")
    namespace = {"__name__": f"readme_block_{line}"}
    with warnings.catch_warnings():
        # a fallback's one-time RuntimeWarning is documented behaviour, not a failure of the example
        warnings.simplefilter("ignore", RuntimeWarning)
        exec(compile(code, f"README.md:{line}", "exec"), namespace)


def test_the_layout_table_lists_every_top_level_folder():
    import subprocess

    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=30,
                                 check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("needs a git checkout to know the tracked folders")
    folders = {f.split("/", 1)[0] for f in tracked if "/" in f}
    text = README.read_text()
    table = text[text.index("## Layout"):]
    table = table[:table.index("\n## ")]
    listed = set(re.findall(r"^\| `([^`/]+)/` \|", table, re.M))
    assert folders - listed == set(), f"folders missing from the README's layout table: {sorted(folders - listed)}"
    assert listed - folders == set(), f"the layout table names folders the repository lacks: {sorted(listed - folders)}"
