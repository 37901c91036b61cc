"""The tokens artifact's layout (tokenizer/, train/, val/) is defined once, in llmctl.data.shards: no
other module spells those folder names, so a writer and its readers cannot drift apart."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llmctl"
HOME = PACKAGE / "data" / "shards.py"
NAMES = {"tokenizer", "train", "val"}


def _layout_literals(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in NAMES
    return isinstance(node, ast.Tuple) and any(_layout_literals(e) for e in node.elts)


def test_the_tokens_layout_is_spelled_only_in_the_data_layer():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == HOME:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            joined = (
                isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and _layout_literals(node.right)
            )
            named = (
                isinstance(node, ast.Assign)
                and any(
                    isinstance(t, ast.Name | ast.Tuple) and "_DIR" in ast.unparse(t) for t in node.targets
                )
                and _layout_literals(node.value)
            )
            if joined or named:
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, "use llmctl.data.shards' layout names:\n" + "\n".join(offenders)
