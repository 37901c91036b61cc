"""Config values that become processes or memory are checked against the machine before work starts."""

from __future__ import annotations

import time

import pytest
from conftest import write_project

from llmctl.config.loading import load_config
from llmctl.config.project import ProjectConfig
from llmctl.errors import ConfigError
from llmctl.stages.limits import Machine, check_limits, dedup_signature_bytes, pretrain_memory

GB = 1024**3
SMALL = Machine(cores=4, memory_bytes=8 * GB)


def _project(tmp_path, *sets: str) -> ProjectConfig:
    return load_config(ProjectConfig, write_project(tmp_path) / "llmctl.yaml", list(sets))


def _errors(project: ProjectConfig, stages: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        check_limits(stages, project, machine=SMALL)
    assert err.value.exit_code == 2
    assert "beyond this machine (4 cores, 8.0 GB memory available)" in err.value.message
    return err.value.errors


def test_the_defaults_and_the_templates_fit_a_small_machine(tmp_path):
    check_limits(["dedup", "filter", "tokenize", "pretrain"], _project(tmp_path), machine=SMALL)


@pytest.mark.parametrize("stage", ["dedup", "filter", "tokenize"])
def test_worker_processes_are_bounded_by_the_cores(tmp_path, stage):
    check_limits([stage], _project(tmp_path, f"{stage}.workers=4"), machine=SMALL)
    errors = _errors(_project(tmp_path, f"{stage}.workers=100000"), [stage])
    assert errors == [
        f"{stage}.workers: 100,000 worker processes, but this process may use 4 cores; "
        "at most 4 (or 0/empty: one per core)"
    ]


def test_dedup_workers_on_a_cluster_are_not_local_processes(tmp_path):
    project = _project(
        tmp_path, "dedup.engine=datatrove", "dedup.executor=ray", "dedup.workers=512", "dedup.ray.workers=512"
    )
    check_limits(["dedup"], project, machine=SMALL)


def test_minhash_hashes_per_document_are_bounded_by_memory(tmp_path):
    errors = _errors(
        _project(tmp_path, "dedup.bands=10000", "dedup.rows=10000", "dedup.workers=2"), ["dedup"]
    )
    (line,) = errors
    assert line.startswith("dedup.bands x dedup.rows: 10,000 x 10,000 = 100,000,000 hashes per document")
    fit = 8 * GB // (2 * dedup_signature_bytes(1, 1))
    assert f"at most {fit:,} hashes per document fit" in line
    check_limits(
        ["dedup"], _project(tmp_path, f"dedup.bands={fit}", "dedup.rows=1", "dedup.workers=2"), machine=SMALL
    )


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("pretrain.model.max_seq_len=1073741824", "pretrain.model.max_seq_len:"),
        ("pretrain.model.n_embd=1000000", "pretrain.model (n_layer, n_embd, intermediate_size, vocabulary):"),
        ("pretrain.micro_batch_size=100000", "pretrain.micro_batch_size x pretrain.seq_len:"),
    ],
)
def test_pretrain_memory_names_the_key_that_does_not_fit(tmp_path, override, key):
    project = _project(tmp_path, override, "pretrain.batch_tokens=25600000")
    (line,) = _errors(project, ["pretrain"])
    assert line.startswith(key) and line.endswith("and this machine has 8.0 GB available"), line


def test_pretrain_estimate_counts_optimizer_state_and_activations(tmp_path):
    from llmctl.model.config import num_params
    from llmctl.stages.pretrain import model_config_for

    cfg = _project(tmp_path).pretrain
    mc, _ = model_config_for(cfg, 4096, None)
    parts = pretrain_memory(mc, cfg)
    assert parts["pretrain.model (n_layer, n_embd, intermediate_size, vocabulary)"] == 16 * num_params(mc)
    checkpointed = pretrain_memory(mc, cfg.model_copy(update={"activation_checkpointing": True}))
    key = "pretrain.micro_batch_size x pretrain.seq_len"
    assert checkpointed[key] < parts[key]


def test_config_validate_stays_machine_independent(tmp_path, cli):
    write_project(tmp_path)
    assert cli("config", "validate", "--set", "dedup.workers=100000", cwd=tmp_path).code == 0


def test_a_stage_refuses_before_any_work_starts(corpus_project, cli):
    t0 = time.monotonic()
    result = cli("dedup", "--set", "dedup.workers=100000", cwd=corpus_project, timeout=60)
    assert result.code == 2, result.stderr
    assert "  dedup.workers: 100,000 worker processes, but this process may use" in result.stderr
    assert time.monotonic() - t0 < 30
    assert not (corpus_project / "workspace" / "runs" / "dedup").exists()  # not even a failed run


def test_run_checks_every_stage_before_the_first_one(corpus_project, cli):
    result = cli(
        "run", "--set", "filter.workers=100000", "--set", "pretrain.model.n_embd=1000000", cwd=corpus_project
    )
    assert result.code == 2, result.stderr
    assert "Error: 2 config values beyond this machine" in result.stderr
    assert "  filter.workers: 100,000" in result.stderr
    assert "  pretrain.model (n_layer, n_embd, intermediate_size, vocabulary): a " in result.stderr
    assert not (corpus_project / "workspace" / "runs").exists()


def test_token_shard_buffers_are_bounded_by_memory(tmp_path):
    check_limits(["tokenize"], _project(tmp_path, "tokenize.shard_tokens=100000000"), machine=SMALL)
    (line,) = _errors(_project(tmp_path, "tokenize.shard_tokens=10000000000"), ["tokenize"])
    assert line.startswith("tokenize.shard_tokens: 10,000,000,000 tokens per shard are buffered in memory")
    assert line.endswith(f"at most {8 * GB // 8:,} fit")


# ---- fine-tuning: the input model's config.json and the section's batch keys ----------------------


# the tiny template's grpo section (commented out there while it does not pay off on the tiny model)
GRPO = [
    "grpo.data={sources: [{path: data/rl_prompts.jsonl}]}",
    "grpo.rewards=[{type: contains, field: answer}]",
    "grpo.num_generations=8",
    "grpo.prompts_per_step=8",
    "grpo.micro_batch_size=16",
    "grpo.rollout.max_new_tokens=16",
]


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory):
    """The tiny template's project (its chat, preference and prompt data) with a small model imported."""
    from conftest import run_cli, write_random_model_folder

    from llmctl.project import init_project

    folder = tmp_path_factory.mktemp("tiny") / "proj"
    init_project(folder)
    model = write_random_model_folder(tmp_path_factory.mktemp("base") / "model")
    imported = run_cli("import", str(model), cwd=folder)
    assert imported.code == 0, imported.stderr
    return folder, model


def test_the_tiny_templates_fine_tuning_sections_fit_a_small_machine(tiny_project):
    from types import SimpleNamespace

    from llmctl.stages.registry import project_model

    folder, model = tiny_project
    project = load_config(project_model(), folder / "llmctl.yaml", GRPO)
    inputs = {"model": SimpleNamespace(path=model, manifest=None)}
    check_limits(["sft", "dpo", "grpo"], project, inputs, machine=SMALL)
    with_reference = load_config(
        project_model(), folder / "llmctl.yaml", [*GRPO, "grpo.beta=0.04", "sft.lora.enabled=true"]
    )
    check_limits(["sft", "grpo"], with_reference, inputs, machine=SMALL)


@pytest.mark.parametrize(
    ("stage", "sets", "key"),
    [
        (
            "sft",
            ["sft.micro_batch_size=100000000", "sft.batch_size=100000000"],
            "sft.micro_batch_size x sft.seq_len:",
        ),
        (
            "dpo",
            ["dpo.micro_batch_size=100000000", "dpo.batch_size=100000000"],
            "dpo.micro_batch_size x dpo.seq_len:",
        ),
        (
            "grpo",
            ["grpo.micro_batch_size=100000000", "grpo.prompts_per_step=100000000", "grpo.num_generations=2"],
            "grpo.micro_batch_size x (grpo.max_prompt_len + grpo.rollout.max_new_tokens):",
        ),
        (
            "grpo",
            ["grpo.prompts_per_step=1000000", "grpo.num_generations=1000"],
            "grpo.prompts_per_step x grpo.num_generations:",
        ),
    ],
)
def test_a_fine_tuning_batch_beyond_memory_is_refused_before_any_work_starts(
    tiny_project, cli, stage, sets, key
):
    folder, _ = tiny_project
    t0 = time.monotonic()
    sets = [*GRPO, *sets] if stage == "grpo" else sets
    result = cli(stage, *(a for s in sets for a in ("--set", s)), cwd=folder, timeout=60)
    assert result.code == 2, result.stderr
    assert "Error: 1 config value beyond this machine" in result.stderr
    assert f"  {key} a " in result.stderr and "-parameter model (n_layer 2" in result.stderr, result.stderr
    assert time.monotonic() - t0 < 30
    assert not (folder / "workspace" / "runs" / stage).exists()  # not even a failed run
