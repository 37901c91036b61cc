"""`llmctl pretrain` through the real CLI: torchrun relaunch on CPU (gloo), reuse, resume, bad input."""

from __future__ import annotations

import pytest
from conftest import run_cli

SMALL = [
    "--set", "tokenize.vocab_size=512",
    "--set", "pretrain.model.preset=test-1m",
    "--set", "pretrain.seq_len=64",
    "--set", "pretrain.micro_batch_size=4",
    "--set", "pretrain.batch_tokens=512",
    "--set", "pretrain.max_steps=4",
    "--set", "pretrain.eval_every=2",
    "--set", "pretrain.checkpoint_every=2",
]  # fmt: skip


@pytest.mark.slow
def test_pretrain_two_processes_through_torchrun(corpus_project):
    assert run_cli("tokenize", *SMALL, cwd=corpus_project).code == 0
    result = run_cli("pretrain", "--gpus", "2", "--json", *SMALL, cwd=corpus_project, timeout=600)
    assert result.code == 0, result.stderr[-3000:]
    doc = result.json()
    assert doc["artifact"] == "pretrain:v0001"
    assert doc["metrics"]["world_size"] == 2 and doc["metrics"]["steps"] == 4
    # Up to date: reused in the parent, no processes started.
    again = run_cli("pretrain", "--gpus", "2", "--json", *SMALL, cwd=corpus_project)
    assert again.code == 0 and again.json()["reused"] is True

    bad = run_cli("pretrain", "--gpus", "3", "--force", *SMALL, cwd=corpus_project)
    assert bad.code == 2 and "not a multiple" in bad.stderr and "Traceback" not in bad.stderr


def test_pretrain_without_tokens_says_what_to_run(tmp_path):
    from conftest import write_project

    project = write_project(tmp_path / "p")
    result = run_cli("pretrain", cwd=project)
    assert result.code == 2 and "llmctl tokenize" in result.stderr
