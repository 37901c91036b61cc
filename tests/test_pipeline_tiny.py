"""The README's main command on the tiny template: init, then `llmctl run` through every stage."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import REPO, XDIST_WORKER, cli_env, run_cli


def _eval_results(project: Path, artifact: str) -> dict:
    shown = run_cli("artifacts", "show", artifact, "--json", cwd=project)
    assert shown.code == 0, shown.stderr
    return json.loads((Path(shown.json()["path"]) / "results.json").read_text())


def _pretrained_scores(project: Path, ckpt: str) -> dict:
    res = run_cli("eval", "perplexity", "world_mc", "--ckpt", ckpt, "--json", cwd=project, timeout=300)
    assert res.code == 0, res.stderr[-3000:]
    tasks = res.json()["tasks"]
    return {f"{task}/{m}": v for task in tasks for m, v in tasks[task]["metrics"].items()}


@pytest.mark.slow
def test_tiny_template_runs_end_to_end_and_learns(tmp_path):
    assert run_cli("init", "demo", cwd=tmp_path).code == 0
    project = tmp_path / "demo"
    # The template as users get it, the biggest test by far: on both of CI's cores (conftest gives
    # every other CLI call one thread), as the README's main command runs it; on one when the suite
    # runs on several workers (pytest-xdist), which share the cores.
    threads = "1" if XDIST_WORKER else "2"
    result = run_cli("run", "--json", cwd=project, timeout=1800, env=cli_env(OMP_NUM_THREADS=threads))
    assert result.code == 0, result.stderr[-3000:]
    stages = {row["stage"]: row for row in result.json()["stages"]}
    assert list(stages) == [
        "dedup",
        "filter",
        "tokenize",
        "pretrain",
        "sft",
        "dpo",
        "grpo",
        "eval",
        "quantize",
    ]
    assert all(row["artifact"].endswith(":v0001") and not row["reused"] for row in stages.values())
    # the summary says what each stage consumed: what the stage before it in this run produced
    assert stages["filter"]["inputs"] == {"corpus": "dedup:v0001"}
    assert stages["tokenize"]["inputs"] == {"corpus": "filter:v0001"}
    assert stages["pretrain"]["inputs"] == {"data": "tokenize:v0001"}
    assert stages["sft"]["inputs"] == {"model": "pretrain:v0001", "chat": "sft.data"}
    assert stages["dpo"]["inputs"] == {"model": "sft:v0001", "preferences": "dpo.data"}
    assert stages["grpo"]["inputs"] == {"model": "dpo:v0001", "prompts": "grpo.data"}
    assert stages["eval"]["inputs"] == {"model": "grpo:v0001", "data": "tokenize:v0001"}
    assert stages["quantize"]["inputs"] == {"model": "grpo:v0001", "data": "tokenize:v0001"}
    quantized = stages["quantize"]["metrics"]
    assert quantized["method"] == "rtn int8 per-channel sym"
    assert abs(quantized["ppl_increase_pct"]) < 1.0, quantized
    assert quantized["bytes_on_disk/quantized"] < 0.5 * quantized["bytes_on_disk/source"], quantized

    dedup = stages["dedup"]["metrics"]
    assert dedup["exact_duplicates"] > 0 and dedup["near_duplicates"] > 0
    assert stages["filter"]["metrics"]["documents_excluded"] > 0
    assert stages["tokenize"]["metrics"]["encoder"] == "tiktoken"
    pretrain = stages["pretrain"]["metrics"]
    assert pretrain["steps"] == 500 and pretrain["val_loss"] < 3.0

    # sft: the chat model answers questions about facts no training conversation mentions (the
    # pretraining corpus states them) better than the pretrained model asked the same way, by a
    # margin of several paired standard errors, and ends its answers with its end-of-turn token.
    sft_eval = run_cli("eval", "world_chat", "--ckpt", "sft:v0001", "--json", cwd=project, timeout=300)
    assert sft_eval.code == 0, sft_eval.stderr[-3000:]
    chat = sft_eval.json()["tasks"]["world_chat"]
    assert chat["n"] >= 60 and chat["metrics"]["stopped"] > 0.9, chat
    margin = chat["vs_base"]["contains"]
    assert margin["delta"] > 3 * margin["stderr"] > 0, chat
    assert chat["metrics"]["contains"] > 0.2 and chat["metrics"]["base_contains"] < 0.1, chat

    # dpo: held-out pairs (other questions) prefer the true answer, and the generative world-facts
    # score, beside the sft model it started from, does not fall by more than its standard error.
    dpo = stages["dpo"]["metrics"]
    assert dpo["val_rewards/accuracies"] > 0.75 and dpo["val_rewards/margins"] > 0, dpo
    dpo_eval = run_cli("eval", "world_chat", "--ckpt", "dpo:v0001", "--json", cwd=project, timeout=300)
    assert dpo_eval.code == 0, dpo_eval.stderr[-3000:]
    after_dpo = dpo_eval.json()["tasks"]["world_chat"]
    assert after_dpo["vs_base"]["contains"]["delta"] >= -after_dpo["stderr"]["contains"], after_dpo

    # grpo: the greedy reward on held-out phrasings of its facts rises by more than two paired
    # standard errors over the dpo model it started from; the eval after it scores the grpo model
    # beside that dpo model, and the world-facts score asked in chat does not fall by more than its
    # standard error.
    grpo = stages["grpo"]["metrics"]
    assert grpo["val_reward_gain"] > 2 * grpo["val_reward_gain_stderr"] > 0, grpo
    assert grpo["val_reward"] == pytest.approx(grpo["start_val_reward"] + grpo["val_reward_gain"]), grpo
    results = _eval_results(project, stages["eval"]["artifact"])
    assert results["base_model"] == "dpo:v0001"
    after_grpo = results["tasks"]["world_chat"]
    assert after_grpo["vs_base"]["contains"]["delta"] >= -after_grpo["stderr"]["contains"], after_grpo
    scores = stages["eval"]["metrics"]
    assert scores["world_chat/stopped"] > 0.9, scores
    assert scores["world_mc/acc"] > 0.35, scores  # chance is 0.25 with 4 choices

    again = run_cli("run", "--json", cwd=project, timeout=300)
    assert again.code == 0 and all(row["reused"] for row in again.json()["stages"])
    lineage = run_cli("artifacts", "lineage", "eval:v0001", "--json", cwd=project).json()
    chain = []
    node = lineage
    while node.get("inputs"):
        node = node["inputs"][0]
        chain.append(node["id"])
    assert chain[:5] == ["grpo:v0001", "dpo:v0001", "sft:v0001", "pretrain:v0001", "tokenize:v0001"]
    lineage = run_cli("artifacts", "lineage", "quantize:latest", "--json", cwd=project).json()
    assert lineage["id"] == "quantize:v0001"
    assert [node["id"] for node in lineage["inputs"]] == ["grpo:v0001", "tokenize:v0001"]

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

    # The pretrained model against the same model at step 0: same seed, shape and data, one step at
    # an lr that leaves the init weights as they were (updates of ~1e-12). Training, not the eval's
    # scoring, made the difference.
    step0 = ["--set", "pretrain.max_steps=1", "--set", "pretrain.optimizer.lr=1e-12"]
    init = run_cli(
        "run", "--until", "pretrain", "--json", *step0, "--set", "pretrain.eval_every=0", cwd=project
    )
    assert init.code == 0, init.stderr[-3000:]
    [init_pretrain] = [row for row in init.json()["stages"] if row["stage"] == "pretrain"]
    assert init_pretrain["artifact"] == "pretrain:v0002"
    trained, untrained = (
        _pretrained_scores(project, "pretrain:v0001"),
        _pretrained_scores(project, "pretrain:v0002"),
    )
    assert untrained["world_mc/acc"] < trained["world_mc/acc"] - 0.1, (untrained, trained)
    assert untrained["perplexity/loss"] > trained["perplexity/loss"] + 1.0, (untrained, trained)
    assert init_pretrain["metrics"]["val_loss"] > pretrain["val_loss"] + 1.0
