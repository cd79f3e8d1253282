"""The package's shape holds: imports point one way (kernels ← ops ← models/data ← encoder ← train ←
eval ← finetune ← hear/cli ← scripts), no import cycle, and no product file over 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 600

# Lower number = lower layer. A module may import its own layer's package or lower ones; the two leaves
# (configuration and atomic file writes) may be imported from anywhere and import no other asit module.
LAYERS = {
    "asit_kernels": 0,
    "asit.atomic_io": 0,
    "asit.config": 0,
    "asit.configs": 0,
    "asit.ops": 1,
    "asit.models": 2,
    "asit.data": 2,
    "asit.encoder": 3,
    "asit.train": 4,
    "asit.eval": 5,
    "asit.finetune": 6,  # uses the probe's folds and metrics
    "asit.hear": 7,
    "asit.cli": 7,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts[0] = "asit_kernels"
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _product_files() -> list[Path]:
    return sorted([*ROOT.glob("asit/**/*.py"), *ROOT.glob("kernels/**/*.py")])


def _top_level_imports(path: Path) -> set[str]:
    """asit modules imported at module level (function-level imports are deliberate lazy ones)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n == "asit" or n.startswith(("asit.", "asit_kernels")))
    return found


def _layer(name: str) -> tuple[str, int] | None:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            return prefix, LAYERS[prefix]
    return None


def _known_modules() -> set[str]:
    return {_module_name(p) for p in _product_files()}


LEAVES = {"asit.atomic_io", "asit.config", "asit.configs"}


def _breaks_layering(here: tuple[str, int], there: tuple[str, int]) -> bool:
    if here[0] == "asit_kernels":
        return True  # the kernels never import asit
    if here[0] in LEAVES:
        return there[0] not in LEAVES
    if there[0] in LEAVES:
        return False
    return there[1] >= here[1]  # strictly lower layers only (same package handled by the caller)


def test_imports_point_one_way():
    known = _known_modules()
    wrong = []
    for path in _product_files():
        if _module_name(path) == "asit":
            continue  # the root package only holds lazy imports
        here = _layer(_module_name(path))
        assert here is not None, f"{path.relative_to(ROOT)} belongs to no layer: add its package to LAYERS"
        for name in _top_level_imports(path):
            if name not in known and name.rpartition(".")[0] in known:
                name = name.rpartition(".")[0]  # `from pkg import function`
            there = _layer(name)
            if there is None or name == "asit":
                continue
            if there[0] == here[0]:
                continue
            if _breaks_layering(here, there):
                wrong.append(f"{_module_name(path)} imports {name}")
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    known = _known_modules()
    graph: dict[str, set[str]] = {}
    for path in _product_files():
        deps = set()
        for name in _top_level_imports(path):
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                deps.add(name)
        graph[_module_name(path)] = deps - {_module_name(path)}
    # a package's __init__ importing its own submodules is not a cycle through the submodules' parents
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in graph.get(node, ()):
            if node.startswith(dep + "."):
                continue  # a submodule importing through its parent package's __init__
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if state.get(dep) is None:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("folder", ["asit", "kernels", "scripts"])
def test_no_product_file_over_600_lines(folder):
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / folder).glob("**/*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"
