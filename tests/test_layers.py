"""The dependency rule: flows -> tasks -> pipeline -> modalities -> smoothpurify, never upward, no circles.

Checked twice: statically (every import statement of every module, function-level ones included)
and at run time (importing a layer in a fresh interpreter pulls in no higher layer).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["smoothpurify", "modalities", "pipeline", "tasks", "flows"]  # lowest first
RANK = {name: i for i, name in enumerate(LAYERS)}
# The library's only third-party imports (plus the standard library).
LIBRARY_DEPS = {"torch", "pydantic", "safetensors", "numpy", "tqdm"}
SHARED_MODALITY_MODULES = {"contract", "kit", "testing"}


def _modules() -> dict[str, Path]:
    out = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path, module: str, top_level_only: bool = False) -> list[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level + (1 if path.name == "__init__.py" else 0) or None]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module
            # `from pkg import submodule` depends on pkg.submodule when that is a module of ours
            found += [f"{name}.{a.name}" if f"{name}.{a.name}" in MODULES else name for a in node.names]
    return found


def _violations() -> list[str]:
    bad = []
    for module, path in MODULES.items():
        layer = module.split(".")[0]
        for target in _imports(path, module):
            top = target.split(".")[0]
            if top in RANK and RANK[top] > RANK[layer]:
                bad.append(f"{module} imports {target} (a higher layer)")
            if layer == "smoothpurify" and top not in RANK and top not in LIBRARY_DEPS \
                    and top not in sys.stdlib_module_names and top != "__future__":
                bad.append(f"{module} imports {target} (the library imports only {sorted(LIBRARY_DEPS)})")
            if top == "prefect" and layer not in ("tasks", "flows"):
                bad.append(f"{module} imports prefect (only tasks and flows may)")
            parts = target.split(".")
            concrete = top == "modalities" and len(parts) > 1 and parts[1] not in SHARED_MODALITY_MODULES
            if concrete and layer in ("pipeline", "tasks", "flows", "smoothpurify"):
                bad.append(f"{module} imports the concrete modality {target} (use the registry)")
            if concrete and layer == "modalities":
                own = module.split(".")[1] if len(module.split(".")) > 1 else None
                if own in SHARED_MODALITY_MODULES or own is None or parts[1] != own:
                    bad.append(f"{module} imports another modality's {target}")
    return bad


def test_no_upward_or_sideways_import():
    assert _violations() == []


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every back edge found by a depth-first search, as the circle it closes."""
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def test_no_import_circle():
    graph = {m: {t for t in _imports(p, m, top_level_only=True) if t in MODULES} for m, p in MODULES.items()}
    assert _cycles(graph) == []
    graph["smoothpurify.methods"].add("smoothpurify.purify")  # the circle this layout removed
    cycles = _cycles(graph)
    assert "smoothpurify.methods -> smoothpurify.purify -> smoothpurify.methods" in cycles
    assert all(c.startswith("smoothpurify.methods -> smoothpurify.purify") for c in cycles)


def test_checker_catches_an_upward_import(tmp_path, monkeypatch):
    fake = tmp_path / "upward.py"
    fake.write_text("from pipeline.run import Run\nimport prefect\n")
    monkeypatch.setitem(MODULES, "smoothpurify.upward", fake)
    found = _violations()
    assert any("smoothpurify.upward imports pipeline.run" in v for v in found)
    assert any("smoothpurify.upward imports prefect" in v for v in found)


@pytest.mark.parametrize("layer, forbidden", [
    ("smoothpurify", ["modalities", "pipeline", "tasks", "flows", "prefect", "matplotlib", "typer"]),
    ("modalities.image", ["pipeline", "tasks", "flows", "prefect"]),
    ("pipeline", ["modalities.image", "tasks", "flows", "prefect"]),
])
def test_importing_a_layer_pulls_in_no_higher_one(layer, forbidden):
    mods = [m for m in MODULES if m == layer or m.startswith(layer + ".")]
    code = ("import importlib, sys\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            f"print(sorted({{k.split('.')[0] if k.split('.')[0] != 'modalities' else '.'.join(k.split('.')[:2]) "
            f"for k in sys.modules}} & set({forbidden!r})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
