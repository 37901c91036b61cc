"""The README's main command on the tiny template: init, then `llmctl run` through every stage."""

from __future__ import annotations

import re

import pytest
from conftest import REPO, run_cli


@pytest.mark.slow
def test_tiny_template_runs_end_to_end_and_learns(tmp_path):
    assert run_cli("init", "demo", cwd=tmp_path).code == 0
    project = tmp_path / "demo"
    # A shorter horizon than the template's 200 steps keeps CI fast; the facts are learnt by then.
    short = ["--set", "pretrain.max_steps=120", "--set", "pretrain.eval_every=60"]
    result = run_cli("run", "--json", *short, cwd=project, timeout=900)
    assert result.code == 0, result.stderr[-3000:]
    stages = {row["stage"]: row for row in result.json()["stages"]}
    assert list(stages) == ["dedup", "filter", "tokenize", "pretrain", "eval"]
    assert all(row["artifact"].endswith(":v0001") and not row["reused"] for row in stages.values())
    # the summary says what each stage consumed: what the stage before it in this run produced
    assert stages["filter"]["inputs"] == {"corpus": "dedup:v0001"}
    assert stages["tokenize"]["inputs"] == {"corpus": "filter:v0001"}
    assert stages["pretrain"]["inputs"] == {"data": "tokenize:v0001"}
    assert stages["eval"]["inputs"] == {"model": "pretrain:v0001", "data": "tokenize:v0001"}

    dedup = stages["dedup"]["metrics"]
    assert dedup["exact_duplicates"] > 0 and dedup["near_duplicates"] > 0
    assert stages["filter"]["metrics"]["documents_excluded"] > 0
    assert stages["tokenize"]["metrics"]["encoder"] == "tiktoken"
    pretrain = stages["pretrain"]["metrics"]
    assert pretrain["steps"] == 120 and pretrain["val_loss"] < 3.0
    scores = stages["eval"]["metrics"]
    assert scores["world_mc/acc"] > 0.35, scores  # chance is 0.25 with 4 choices

    again = run_cli("run", "--json", *short, cwd=project, timeout=300)
    assert again.code == 0 and all(row["reused"] for row in again.json()["stages"])
    lineage = run_cli("artifacts", "lineage", "eval:latest", "--json", cwd=project).json()
    assert lineage["inputs"][0]["id"] == "pretrain:v0001"
    assert lineage["inputs"][0]["inputs"][0]["inputs"][0]["id"] == "filter:v0001"

    # The README's and `generate --help`'s prompts for this model ask for a fact the corpus states:
    # the model completes it (the answer is read from the corpus the template generated).
    corpus = (project / "data" / "docs.jsonl").read_text()
    documented = [
        *re.findall(r'llmctl generate "([^"]+)" --ckpt pretrain:latest', (REPO / "README.md").read_text()),
        *re.findall(
            r'llmctl generate "([^"]+)" --ckpt pretrain:latest', run_cli("generate", "--help").stdout
        ),
    ]
    assert documented
    for prompt in documented:
        answers = set(re.findall(re.escape(prompt) + r" (\w+)\.", corpus))
        assert len(answers) == 1, f"{prompt!r}: the corpus states {answers or 'no answer'}"
        gen = run_cli("generate", prompt, "--ckpt", "pretrain:latest", "-n", "8", "--json", cwd=project)
        assert gen.code == 0, gen.stderr
        assert answers.pop() in gen.json()["text"], (prompt, gen.json()["text"])

    # The same model at step 0: same seed, shape and data, one step at an lr that leaves the init
    # weights as they were (updates of ~1e-12). Training, not the eval's scoring, made the difference.
    step0 = ["--set", "pretrain.max_steps=1", "--set", "pretrain.optimizer.lr=1e-12"]
    init = run_cli("run", "--json", *step0, "--set", "pretrain.eval_every=0", cwd=project, timeout=300)
    assert init.code == 0, init.stderr[-3000:]
    init_stages = {row["stage"]: row for row in init.json()["stages"]}
    assert init_stages["pretrain"]["artifact"] == "pretrain:v0002"
    untrained = init_stages["eval"]["metrics"]
    assert untrained["world_mc/acc"] < scores["world_mc/acc"] - 0.1, (untrained, scores)
    assert untrained["perplexity/loss"] > scores["perplexity/loss"] + 1.0, (untrained, scores)
    assert init_stages["pretrain"]["metrics"]["val_loss"] > pretrain["val_loss"] + 1.0
