"""Artifacts never lie about their code: a change to llmctl's source reruns a stage instead of reusing
what the old code made, and the manifest records which code made it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import REPO, cli_env, run_cli, write_project

from llmctl import __version__
from llmctl.workspace.code import source_fingerprint


def _docs(path: Path) -> Path:
    lines = [
        json.dumps({"id": str(i), "text": f"document number {i} says something different {i * 7}"})
        for i in range(30)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _dedup(project: Path, site: Path) -> dict:
    result = run_cli("--json", "dedup", cwd=project, env=cli_env(PYTHONPATH=str(site)))
    assert result.code == 0, result.stderr
    return result.json()


def _manifest(project: Path, row: dict) -> dict:
    return json.loads((Path(row["path"]) / "manifest.json").read_text())


def test_a_source_change_reruns_the_stage(tmp_path: Path) -> None:
    site = tmp_path / "site"
    shutil.copytree(REPO / "llmctl", site / "llmctl", ignore=shutil.ignore_patterns("__pycache__"))
    project = write_project(
        tmp_path / "proj", f"data:\n  sources:\n    - path: {_docs(tmp_path / 'docs.jsonl')}\n"
    )

    first = _dedup(project, site)
    assert not first["reused"]
    code = _manifest(project, first)["code"]
    assert code == {"llmctl_version": __version__, "source_sha256": source_fingerprint(site / "llmctl")}
    assert _dedup(project, site)["reused"]  # same code, config and inputs: reused

    # A fix anywhere in the package (here: the dedup stage's module) is a different program.
    module = site / "llmctl" / "stages" / "dedup.py"
    module.write_text(module.read_text() + "\n# a code fix\n")
    third = _dedup(project, site)
    assert not third["reused"], "a source change must not reuse the artifact the old code made"
    assert third["artifact"] == "dedup:v0002"
    new_code = _manifest(project, third)["code"]
    assert new_code["source_sha256"] == source_fingerprint(site / "llmctl") != code["source_sha256"]
    assert _dedup(project, site)["artifact"] == "dedup:v0002"  # and the new code's artifact is reused


def test_the_fingerprint_follows_edits_in_process(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    root.mkdir()
    (root / "a.py").write_text("x = 1\n")
    before = source_fingerprint(root)
    assert source_fingerprint(root) == before
    (root / "a.py").write_text("x = 2\n")
    assert source_fingerprint(root) != before
    (root / "sub").mkdir()
    (root / "sub" / "b.py").write_text("")
    assert source_fingerprint(root) != before
