"""Dependencies point one way: model <- data <- train/evals <- stages <- cli.

Checked on the import statements of every module, so a stray import fails here, not in review.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llmctl"
LEAVES = {"llmctl", "llmctl.errors", "llmctl.reporting", "llmctl.threads", "llmctl.faults"}

# For each area, the llmctl areas it may import (besides the leaves).
ALLOWED = {
    "model": set(),
    "config": {"config"},
    "data": {"data", "config"},
    "workspace": {"workspace"},
    "train": {"train", "model", "data", "config"},
    "evals": {"evals", "model", "data", "config"},
    "rl": {"rl", "model", "data", "train", "config"},
    "stages": {"stages", "workspace", "model", "data", "train", "evals", "rl", "config"},
    "serve": {"serve", "model"},  # the server runs models through the engine, nothing else
    "report": {"report", "workspace", "train"},  # manifests and metrics.jsonl (train.metrics), never weights
    "cli": None,  # the top: may import anything
}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _area(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "llmctl" else None


def test_dependencies_point_one_way():
    violations = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        area = rel.parts[0] if len(rel.parts) > 1 else None
        if area is None or ALLOWED.get(area) is None:
            continue
        for name in _imports(path):
            if not name.startswith("llmctl") or name in LEAVES:
                continue
            target = _area(name)
            if target not in ALLOWED[area] and target != area:
                violations.append(f"{rel}: imports {name}")
    assert not violations, "\n".join(violations)


def test_only_the_cli_imports_typer_or_rich():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "cli":
            continue
        for name in _imports(path):
            if name.split(".")[0] in ("typer", "rich", "click"):
                offenders.append(f"{rel}: imports {name}")
    assert not offenders, "\n".join(offenders)
