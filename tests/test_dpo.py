"""The dpo stage on real files: a tiny random base model, synthetic preference pairs, the real runner.

Covered here: the published folder is a model with the tokenizer and template it trained with; the
first step's rewards are 0 (the reference is the starting model, in the same precision and layout)
and held-out reward accuracy rises; TRL's metrics reach metrics.jsonl, the manifest and the plot;
the reference log-probs are computed once and a resumed run reads them back and ends bit-identical
to an uninterrupted run; LoRA's reference is the base without the adapter; a reference-free loss
(SimPO) computes none; two processes compute the reference by shares and agree with one; bad input
fails once with a readable error. Loss parity with TRL: tests/test_dpo_parity.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_random_model_folder

from llmctl.data.synthetic_preferences import generate_preferences
from llmctl.errors import ConfigError, InputError, Interrupted
from llmctl.model.checkpoint import load_safetensors, weight_files
from llmctl.model.hf_tokenizer import load_folder_tokenizer
from llmctl.reporting import Reporter
from llmctl.stages.registry import project_model


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    return write_random_model_folder(tmp_path_factory.mktemp("base") / "model")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pairs")
    generate_preferences(folder, n_pairs=120, seed=3)
    return folder / "preferences.jsonl"


class Lines(Reporter):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def dpo_project(tmp_path: Path, pairs_file: Path, **dpo: object):
    section = {
        "data": {"sources": [{"path": str(pairs_file)}], "val_fraction": 0.15},
        "seq_len": 128,
        "micro_batch_size": 4,
        "batch_size": 8,
        "max_steps": 6,
        "eval_every": 3,
        "checkpoint_every": 3,
        "log_every": 1,
        "optimizer": {"lr": 3e-3, "warmup_steps": 1},
        **dpo,
    }
    folder = tmp_path / "proj"
    folder.mkdir(parents=True, exist_ok=True)
    return project_model().model_validate(
        {"name": "t", "workspace": str(folder / "ws"), "dpo": section}
    ), folder


def run_dpo(project, folder, base: Path, **kwargs):
    """Import the base folder into the project's workspace (once), then optimise it."""
    from llmctl.stages.runner import run_stage

    imported = run_stage("import", project, folder, options={"source": str(base)}).artifact
    return run_stage("dpo", project, folder, refs={"model": imported.id}, **kwargs)


def metric_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_dpo_publishes_a_model_whose_held_out_reward_accuracy_rose(tmp_path, base_model, pairs_file):
    project, folder = dpo_project(tmp_path, pairs_file, max_steps=10, eval_every=5)
    art = run_dpo(project, folder, base_model).artifact
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png"):
        assert (art.path / name).is_file(), name
    assert load_folder_tokenizer(art.path).chat_template == load_folder_tokenizer(base_model).chat_template
    rows = metric_rows(art.path)
    first = next(r for r in rows if "loss" in r)
    # step 1 runs the starting model: its log-probs are the reference's, to float rounding
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/margins"]) < 1e-5, first
    assert abs(first["loss"] - 0.693147) < 1e-4
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
    ):
        assert key in first and f"val_{key}" in rows[-1], key
    m = art.manifest.metrics
    # held-out pairs ask other questions (the split hashes the prompt); a random model still learns
    # that the true short answer beats a false or evasive one
    assert m["val_rewards/accuracies"] > 0.55 and m["val_rewards/margins"] > 0 and m["val_loss"] < 0.69, m
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses
    assert m["pairs"] + m["val_pairs"] == 120 and m["loss_type"] == "sigmoid" and m["beta"] == 0.1
    assert art.manifest.inputs[0].slot == "model"


def test_a_resumed_run_reads_the_reference_back_and_ends_bit_exact(
    tmp_path, base_model, pairs_file, monkeypatch
):
    import llmctl.stages.dpo as dpo

    whole_project, whole_dir = dpo_project(tmp_path / "whole", pairs_file)
    whole = run_dpo(whole_project, whole_dir, base_model).artifact

    project, folder = dpo_project(tmp_path / "cut", pairs_file)
    calls = {"n": 0}
    real_next = dpo.ShuffledRows.next_batch

    def next_batch(self):
        calls["n"] += 1
        if calls["n"] == 2 * 4 + 1:  # grad_accum 2: the first micro-batch of step 5
            raise KeyboardInterrupt
        return real_next(self)

    monkeypatch.setattr(dpo.ShuffledRows, "next_batch", next_batch)
    with pytest.raises(Interrupted):
        run_dpo(project, folder, base_model)
    monkeypatch.setattr(dpo.ShuffledRows, "next_batch", real_next)
    (reference,) = (folder / "ws" / "runs" / "dpo").glob(f"*/{dpo.REFERENCE_FILE}")
    before = reference.read_bytes()

    computed = {"n": 0}
    real_reference = dpo.reference_logps

    def counting_reference(*args, **kwargs):
        computed["n"] += 1
        return real_reference(*args, **kwargs)

    monkeypatch.setattr(dpo, "reference_logps", counting_reference)
    lines = Lines()
    resumed = run_dpo(project, folder, base_model, resume=True, reporter=lines).artifact
    said = " ".join(lines.lines)
    assert "dpo: resumed from step_000004 (" in said and "reference log-probs read from" in said, said
    assert computed["n"] == 0 and reference.read_bytes() == before
    assert [r["loss"] for r in metric_rows(resumed.path) if "loss" in r] == [
        r["loss"] for r in metric_rows(whole.path) if "loss" in r
    ]
    ours, theirs = load_safetensors(weight_files(resumed.path)), load_safetensors(weight_files(whole.path))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_lora_reference_is_the_base_and_simpo_needs_none(tmp_path, base_model, pairs_file, monkeypatch):
    lora = {"enabled": True, "rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}
    project, folder = dpo_project(tmp_path, pairs_file, lora=lora, max_steps=3, eval_every=0)
    art = run_dpo(project, folder, base_model).artifact
    first = metric_rows(art.path)[0]
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5, first
    assert (art.path / "adapter" / "adapter_model.safetensors").is_file()
    assert art.manifest.metrics["trainable_params"] < art.manifest.metrics["params"] / 10

    import llmctl.stages.dpo as dpo

    def no_reference(*args, **kwargs):
        raise AssertionError("SimPO is reference-free")

    monkeypatch.setattr(dpo, "reference_logps", no_reference)
    project, folder = dpo_project(tmp_path / "simpo", pairs_file, loss="simpo", max_steps=2, eval_every=0)
    art = run_dpo(project, folder, base_model).artifact
    first = metric_rows(art.path)[0]
    # SimPO's rewards are beta x the mean log-prob per completion token
    assert first["rewards/chosen"] == pytest.approx(2.0 * first["logps/chosen"], rel=1e-6)
    assert art.manifest.metrics["beta"] == 2.0 and not list(
        folder.glob(f"ws/runs/dpo/*/{dpo.REFERENCE_FILE}")
    )


def test_bad_input_fails_once_with_a_readable_error(tmp_path, base_model, pairs_file):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "a"}\n')
    project, folder = dpo_project(tmp_path, pairs_file, data={"sources": [{"path": str(bad)}]})
    with pytest.raises(InputError, match=r"bad.jsonl:1"):
        run_dpo(project, folder, base_model)
    project, folder = dpo_project(tmp_path / "b", pairs_file, batch_size=6)
    with pytest.raises(ConfigError, match="dpo.batch_size"):
        run_dpo(project, folder, base_model)
    with pytest.raises(Exception, match="label_smoothing"):
        dpo_project(tmp_path / "c", pairs_file, loss="ipo", label_smoothing=0.1)
    plain = project_model().model_validate({"name": "t"})
    from llmctl.stages.registry import STAGES

    assert STAGES["dpo"].skip_reason(plain) == "no dpo.data in llmctl.yaml"


@pytest.mark.slow
def test_two_processes_compute_the_reference_by_shares(tmp_path, base_model, pairs_file):
    from safetensors.torch import load_file

    import llmctl.stages.dpo as dpo
    from llmctl.config.preference import PreferenceDataConfig
    from llmctl.data.preference import load_preference_data
    from llmctl.model.checkpoint import load_model_folder
    from llmctl.train.chat_template import ensure_chat_template
    from llmctl.train.preference import fit_pairs, reference_logps

    folder = tmp_path / "two"
    folder.mkdir()
    (folder / "llmctl.yaml").write_text(
        "name: t\n"
        "dpo:\n"
        f"  data:\n    sources:\n      - path: {pairs_file}\n"
        "  seq_len: 128\n  micro_batch_size: 2\n  batch_size: 8\n  max_steps: 2\n  eval_every: 0\n"
    )
    assert run_cli("import", str(base_model), cwd=folder).code == 0
    result = run_cli("dpo", "--gpus", "2", "--device", "cpu", "--json", cwd=folder, timeout=600)
    assert result.code == 0, result.stderr[-3000:]
    assert result.json()["metrics"]["world_size"] == 2
    (path,) = folder.glob(f"workspace/runs/dpo/*/{dpo.REFERENCE_FILE}")
    shared = load_file(str(path))["train"]

    # the same pairs in one process, here
    model, _ = load_model_folder(base_model, dtype=torch.float32)
    tok, _ = ensure_chat_template(model, load_folder_tokenizer(base_model))
    data = load_preference_data(PreferenceDataConfig(sources=[{"path": str(pairs_file)}]), tmp_path)
    pairs, _, _ = fit_pairs(dpo.tokenize_pairs(tok, data.train), 128)
    alone = reference_logps(model, dpo.batches_of(pairs, 2, 0), len(pairs), "cpu")
    assert alone.abs().min() > 0  # every pair got its log-probs, none left at 0
    torch.testing.assert_close(shared, alone, rtol=0, atol=1e-5)


def test_edited_pairs_make_dpo_run_again(tmp_path, base_model, pairs_file):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(pairs_file.read_bytes())
    data = {"sources": [{"path": str(pairs)}], "val_fraction": 0.1}
    project, folder = dpo_project(tmp_path, pairs_file, data=data, max_steps=1, eval_every=0)
    first = run_dpo(project, folder, base_model)
    assert not first.reused and first.inputs["preferences"] == "dpo.data" and "sources" not in first.inputs
    assert run_dpo(project, folder, base_model).reused
    lines = pairs.read_text().splitlines()
    pairs.write_text("\n".join(lines[:-1]) + "\n")  # one pair fewer
    again = run_dpo(project, folder, base_model)
    assert not again.reused and again.artifact.id == "dpo:v0002"


def test_the_cli_runs_dpo_and_resume_with_nothing_to_resume_reuses(tmp_path, base_model, pairs_file):
    """`llmctl dpo` is the registry's generic command: --model, --resume, --json, launch flags."""
    folder = tmp_path / "cli"
    folder.mkdir()
    (folder / "llmctl.yaml").write_text(
        "name: t\n"
        "dpo:\n"
        f"  data:\n    sources:\n      - path: {pairs_file}\n"
        "  seq_len: 128\n  micro_batch_size: 4\n  batch_size: 8\n  max_steps: 1\n  eval_every: 0\n"
    )
    assert run_cli("import", str(base_model), cwd=folder).code == 0
    first = run_cli("dpo", "--model", "import:latest", "--json", cwd=folder, timeout=300)
    assert first.code == 0, first.stderr[-2000:]
    assert first.json()["artifact"] == "dpo:v0001" and first.json()["metrics"]["steps"] == 1
    again = run_cli("dpo", "--model", "import:latest", "--resume", "--json", cwd=folder, timeout=300)
    assert again.code == 0, again.stderr[-2000:]
    assert again.json()["artifact"] == "dpo:v0001" and "nothing to resume" in again.stderr
