"""The package's import graph has no cycle, and the kernels never import the public wrappers."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "dare_kernels"


def _module_name(path: Path) -> str:
    parts = ["dare_kernels", *path.relative_to(PKG).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Package modules ``path`` imports anywhere in the file (module level and inside functions alike)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # "from . import x": the submodule x where there is one, else a name defined by the package itself
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        for t in targets:
            # the deepest package module the import names (importing a.b.c also runs a and a.b)
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    files = [p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts]
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, modules) for p in files}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            # a package __init__ imported by its own submodule is not a cycle of ours: Python runs the
            # package first anyway; edges into a package's __init__ from inside it are skipped
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return cycles


def test_the_graph_sees_known_edges():
    g = _graph()
    assert "dare_kernels.backends" in g["dare_kernels.sra"]
    assert "dare_kernels.ops.sra_attention" in g["dare_kernels.triton.sra_attention"]
    assert "dare_kernels.triton.rectified_cfg" in g["dare_kernels.backends"]  # an import inside a function


def test_no_import_cycle_in_the_package():
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_kernels_and_registry_never_import_the_public_wrappers():
    g = _graph()
    wrappers = {"dare_kernels.sra", "dare_kernels.cfg", "dare_kernels"}
    below = [m for m in g if m.startswith(("dare_kernels.triton", "dare_kernels.ops")) or m in (
        "dare_kernels.backends", "dare_kernels._ext", "dare_kernels.switches", "dare_kernels.sra_fallback")]
    for m in below:
        assert not (g[m] & wrappers), (m, g[m] & wrappers)
