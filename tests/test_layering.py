"""The package imports only downward: math and schedule at the bottom, the CLI at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "pdprune"

# A module may import pdprune modules of a strictly lower rank (or its own subpackage).
RANKS = {
    "_version": 0, "masks": 0, "schedule": 0, "layers": 0, "model_io": 0, "units": 0, "data": 0, "models": 0,
    "checkpoint": 1, "config": 1, "parametrizations": 1, "layer_surgery": 1,
    "report": 2, "attention": 2, "structure": 3, "attach": 4, "pruner": 5,
    "semi_structured": 1, "train": 6, "baselines": 7, "experiments": 8, "export": 8,
    "cli": 9, "integrations": 9,
}
NEVER_IMPORTED = {"cli", "integrations"}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts == ("__init__",):
            continue
        yield path, parts[0]


def _pdprune_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pdprune."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("pdprune.")}
    return found


@pytest.mark.parametrize("path,top", list(_modules()), ids=lambda v: str(v) if isinstance(v, str) else v.name)
def test_imports_point_downward(path, top):
    assert top in RANKS, f"{top} has no rank in tests/test_layering.py: place it in the architecture"
    for imported in _pdprune_imports(path) - {top}:
        assert imported not in NEVER_IMPORTED, f"{path.name} imports {imported}, which nothing may import"
        assert RANKS[imported] < RANKS[top], f"{path.name} ({top}) imports {imported}: upward import"


def test_the_math_imports_only_torch_and_the_standard_library():
    allowed = {"torch", "__future__", "math", "numbers", "collections", "dataclasses", "typing", "warnings", "importlib", "sys"}
    for name in ("masks.py", "schedule.py", "layers.py"):
        tree = ast.parse((PACKAGE / name).read_text())
        roots = {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        roots |= {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert roots <= allowed, f"{name} imports {roots - allowed}"
