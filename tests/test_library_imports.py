"""The library knows no study: no sdn module imports ``baselines`` or ``pipelines``, module-level
imports inside sdn form no cycle, and every sdn module imports on its own in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("baselines", "pipelines")


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / "sdn").rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, top_level_only: bool) -> set[str]:
    """Absolute names of the modules ``name`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # also look inside module-level if/try blocks (not functions or classes)
        stack, nodes = list(tree.body), []
        while stack:
            node = stack.pop()
            nodes.append(node)
            if isinstance(node, (ast.If, ast.Try)):
                stack += [n for field in ("body", "orelse", "finalbody") for n in getattr(node, field, [])]
                stack += [n for h in getattr(node, "handlers", []) for n in h.body]
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{alias.name}" for alias in node.names}
    return out


def test_no_sdn_module_imports_baselines_or_pipelines():
    offenders = {
        name: sorted(m for m in _imports(name, path, top_level_only=False) if m.split(".")[0] in FORBIDDEN)
        for name, path in _modules().items()
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_module_level_imports_inside_sdn_have_no_cycle():
    modules = _modules()
    graph = {name: {m for m in _imports(name, path, top_level_only=True) if m in modules and m != name}
             for name, path in modules.items()}
    # a package imported by its own submodule is fine (Python runs the package __init__ first)
    graph = {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(trail[trail.index(dep):] + [dep] if dep in trail else [node, dep])
            elif dep not in state:
                visit(dep, trail + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles
    assert "sdn.models.hvae" not in graph["sdn.models.blocks"] and "sdn.models.hvae" not in graph["sdn.models"]


SCRIPT = r"""
import os, sys, importlib, traceback
import numpy, torch, pydantic  # heavy third-party imports once; each sdn module starts from none
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        assert not [m for m in sys.modules if m == "sdn" or m.startswith(("sdn.", "baselines", "pipelines"))]
        try:
            importlib.import_module(name)
            leaked = sorted(m for m in sys.modules if m.startswith(("baselines", "pipelines")))
            if leaked:
                print(f"{name} imported {leaked}", flush=True)
                os._exit(2)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(name)
print("FAILED", failed)
sys.exit(1 if failed else 0)
"""


def test_every_sdn_module_imports_alone_in_a_fresh_interpreter():
    """One interpreter per module (forked after the third-party imports, before any sdn import)."""
    names = list(_modules())
    result = subprocess.run([sys.executable, "-c", SCRIPT, *names], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
