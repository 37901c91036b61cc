"""The grpo stage on real files: a tiny random base model, synthetic world-fact prompts, the real runner.

Covered here: a run publishes a model and logs the rollout metrics users know from TRL (reward and
its std per verifier, pass@1/pass@G, KL, clip fractions, entropy, completion lengths, truncation,
zero-variance groups, rollout time and tokens/s) with sampled completions in the run folder and the
held-out reward before and after; a run interrupted mid-training resumes from its checkpoint and ends
bit-identical to an uninterrupted run (rollout sampling included, also with several passes per
rollout); a verifier that raises is reported and the step goes on; configs that cannot work fail
before training. Loss parity with TRL: tests/test_grpo_parity.py; rollouts: tests/test_engine_samples.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_random_model_folder

from llmctl.data.synthetic_rl import RL_EVAL_FILE, RL_PROMPTS_FILE, generate_rl_prompts
from llmctl.errors import ConfigError, Interrupted
from llmctl.model.checkpoint import load_safetensors, weight_files
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
def prompts_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prompts")
    generate_rl_prompts(folder, seed=3)
    return folder


class Lines(Reporter):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def grpo_project(tmp_path: Path, prompts_dir: Path, **grpo: object):
    section = {
        "data": {
            "sources": [{"path": str(prompts_dir / RL_PROMPTS_FILE)}],
            "val_sources": [{"path": str(prompts_dir / RL_EVAL_FILE), "limit": 8}],
        },
        "rewards": [{"type": "contains", "field": "answer"}],
        "num_generations": 4,
        "prompts_per_step": 2,
        "micro_batch_size": 4,
        "max_steps": 4,
        "eval_every": 2,
        "checkpoint_every": 2,
        "samples_every": 2,
        "rollout": {"max_new_tokens": 8},
        "optimizer": {"lr": 1e-3, "warmup_steps": 1},
        **grpo,
    }
    folder = tmp_path / "proj"
    folder.mkdir(parents=True, exist_ok=True)
    project = project_model().model_validate({"name": "t", "workspace": str(folder / "ws"), "grpo": section})
    return project, folder


def run_grpo(project, folder, base: Path, **kwargs):
    from llmctl.stages.runner import run_stage

    imported = run_stage("import", project, folder, options={"source": str(base)}).artifact
    return run_stage("grpo", project, folder, refs={"model": imported.id}, **kwargs)


def metric_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_grpo_publishes_a_model_and_logs_rollout_metrics(tmp_path, base_model, prompts_dir):
    project, folder = grpo_project(tmp_path, prompts_dir, beta=0.04)
    art = run_grpo(project, folder, base_model).artifact
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png"):
        assert (art.path / name).is_file(), name
    rows = [r for r in metric_rows(art.path) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in (
        "reward", "reward_std", "rewards/contains", "pass@1", "pass@4", "kl", "clip_ratio/low",
        "clip_ratio/high", "entropy", "completion_len", "completion_len_max", "truncated",
        "zero_std_groups", "rollout_s", "rollout_tok_s",
    ):  # fmt: skip
        assert key in rows[0], key
    assert rows[0]["completion_len_max"] <= 8 and 0 <= rows[0]["truncated"] <= 1
    assert rows[0]["rollout_tok_s"] > 0 and rows[0]["entropy"] > 0
    m = art.manifest.metrics
    assert m["rollouts"] == 4 and m["val_prompts"] == 8 and m["start_val_reward"] is not None
    assert m["val_reward_gain_stderr"] is not None and m["beta"] == 0.04
    (samples,) = (folder / "ws" / "runs" / "grpo").glob("*/samples.jsonl")
    written = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(written) == 2 * 4 and {"prompt", "completion", "reward", "parts"} <= set(written[0])


@pytest.mark.parametrize("passes", [1, 2])
def test_an_interrupted_run_resumes_bit_exactly(tmp_path, base_model, prompts_dir, monkeypatch, passes):
    import llmctl.rl.rollout as rollout

    steps = {"max_steps": 6, "num_iterations": passes, "eval_every": 0}
    whole_project, whole_dir = grpo_project(tmp_path / "whole", prompts_dir, **steps)
    whole = run_grpo(whole_project, whole_dir, base_model).artifact

    project, folder = grpo_project(tmp_path / "cut", prompts_dir, **steps)
    calls = {"n": 0}
    real_next = rollout.RolloutSource.next_batch

    def next_batch(self):
        calls["n"] += 1
        if (
            calls["n"] == 2 * 3 + 1
        ):  # grad_accum 2: the first micro-batch of step 4, after the step-2 checkpoint
            raise KeyboardInterrupt
        return real_next(self)

    monkeypatch.setattr(rollout.RolloutSource, "next_batch", next_batch)
    with pytest.raises(Interrupted):
        run_grpo(project, folder, base_model)
    monkeypatch.setattr(rollout.RolloutSource, "next_batch", real_next)
    lines = Lines()
    resumed = run_grpo(project, folder, base_model, resume=True, reporter=lines).artifact
    assert "grpo: resumed from step_000003 (" in " ".join(lines.lines), lines.lines
    key = lambda r: (r["step"], r["loss"], r.get("reward"))  # noqa: E731
    assert [key(r) for r in metric_rows(resumed.path) if "loss" in r] == [
        key(r) for r in metric_rows(whole.path) if "loss" in r
    ]
    ours, theirs = load_safetensors(weight_files(resumed.path)), load_safetensors(weight_files(whole.path))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_raising_verifier_is_reported_and_training_goes_on(tmp_path, base_model, prompts_dir):
    rewards = [
        {"type": "contains", "field": "answer"},
        {"type": "function", "function": "my_reward:score", "weight": 0.5},
    ]
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "my_reward.py").write_text(
        "def score(record, completion):\n    raise ValueError('no luck for ' + record['id'])\n"
    )
    project, folder = grpo_project(tmp_path, prompts_dir, max_steps=2, eval_every=0, rewards=rewards)
    art = run_grpo(project, folder, base_model).artifact
    rows = [r for r in metric_rows(art.path) if "loss" in r]
    assert len(rows) == 2 and rows[0]["verifier_errors"] == 8 and rows[0]["rewards/function"] == 0.0
    (samples,) = (folder / "ws" / "runs" / "grpo").glob("*/samples.jsonl")
    first = json.loads(samples.read_text().splitlines()[0])
    assert "function on record" in first["errors"][0] and "no luck for" in first["errors"][0]


def test_configs_that_cannot_work_fail_before_training(tmp_path, base_model, prompts_dir):
    from llmctl.stages.grpo import preflight

    project, _ = grpo_project(tmp_path, prompts_dir, prompts_per_step=3)
    with pytest.raises(ConfigError, match="prompts_per_step"):
        preflight(project.grpo, 2)
    project, _ = grpo_project(tmp_path, prompts_dir, micro_batch_size=3)
    with pytest.raises(ConfigError, match="micro_batch_size"):
        preflight(project.grpo, 1)
    project, _ = grpo_project(tmp_path, prompts_dir, rollout={"engine": "vllm"})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="vllm needs a CUDA machine"):
            preflight(project.grpo, 1)
    with pytest.raises(Exception, match="rewards"):
        grpo_project(tmp_path, prompts_dir, rewards=[])
    plain = project_model().model_validate({"name": "t"})
    from llmctl.stages.registry import STAGES

    assert STAGES["grpo"].skip_reason(plain) == "no grpo.data in llmctl.yaml"


@pytest.mark.parametrize("lora", [False, True])
def test_rollouts_sample_from_the_policy_as_updated(base_model, lora):
    """A long-lived engine must decode with the weights the optimizer just wrote: fused AdamW (the CPU
    default) updates parameters without bumping their version counters, and LoRA lives in hooks."""
    from llmctl.model.checkpoint import load_model_folder
    from llmctl.model.engine import Engine, SamplingParams
    from llmctl.model.lora import add_lora
    from llmctl.rl.rollout import collate_rollout, completion_tokens

    model, _ = load_model_folder(base_model, dtype=torch.float32)
    if lora:
        add_lora(model, rank=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"])
    engine = Engine(model)
    prompts = [[1, 5, 9, 13], [2, 6]]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3, logprobs=True)
    engine.generate(prompts, params, n=2)  # the engine now holds whatever it decodes with
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, fused=True)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    optimizer.step()
    outs = engine.generate(prompts, params, n=2)
    batch = collate_rollout(
        [prompts[i // 2] for i in range(4)], [completion_tokens(o) for o in outs], torch.zeros(4), 0
    )
    with torch.no_grad():
        logps = -model(batch.input_ids, batch.targets, reduction="none")
    assert ((logps - batch.old_logps) * batch.mask).abs().max() < 1e-4


def test_a_completion_that_stopped_keeps_its_stop_token_for_training(base_model):
    """The end-of-turn token is part of what RL trains (a policy must learn to stop): the engine says
    which stop id ended a completion and its log-probability, and the rollout row ends with it."""
    from dataclasses import replace

    from llmctl.model.checkpoint import load_model_folder
    from llmctl.model.engine import Engine, SamplingParams
    from llmctl.rl.rollout import collate_rollout, completion_tokens

    model, _ = load_model_folder(base_model, dtype=torch.float32)
    engine, prompt = Engine(model), [3, 8, 12, 7]
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, seed=4, logprobs=True)
    free = engine.generate([prompt], sampled)[0]
    k = next(i for i in range(1, len(free.tokens)) if free.tokens[i] not in free.tokens[:i])
    stop = free.tokens[k]  # the first token not seen before it: the same run stops right there
    (out,) = engine.generate([prompt], replace(sampled, stop_token_ids=(stop,)))
    assert out.finish_reason == "stop" and out.stop_token == stop and out.tokens == free.tokens[:k]
    assert out.stop_logprob == pytest.approx(free.logprobs[k], abs=1e-6)
    tokens, logps = completion_tokens(out)
    assert tokens == free.tokens[: k + 1] and logps == pytest.approx(free.logprobs[: k + 1], abs=1e-6)
    batch = collate_rollout([prompt], [(tokens, logps)], torch.zeros(1), 0)
    assert batch.targets[0, len(prompt) - 1 + k].item() == stop and int(batch.mask.sum()) == k + 1


def test_rl_moves_a_reward_the_policy_can_reach(tmp_path, base_model, prompts_dir):
    """A reward a random model can improve on at once (the share of vowels in its answer): a few steps
    of GRPO raise it. The spike test of other stages is off for grpo: a policy-gradient loss centres
    on 0 and changes sign, and with it on, steps were skipped as "spikes" and nothing was learned."""
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "toy_reward.py").write_text(
        "def score(record, completion):\n    return sum(c in 'aeiou' for c in completion) / max(1, len(completion))\n"
    )
    project, folder = grpo_project(
        tmp_path,
        prompts_dir,
        rewards=[{"type": "function", "function": "toy_reward:score"}],
        num_generations=8,
        prompts_per_step=4,
        micro_batch_size=16,
        max_steps=12,
        eval_every=0,
        optimizer={"lr": 1e-2, "warmup_steps": 0},
    )
    art = run_grpo(project, folder, base_model).artifact
    rewards = [r["reward"] for r in metric_rows(art.path) if "loss" in r]
    assert len(rewards) == 12 and sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_a_group_sharing_one_copy_of_its_prompt_gives_the_loss_and_gradients_of_separate_rows(
    base_model, loss_type
):
    """Rollout rows hold a prompt once and its G samples after it, each sample seeing only the prompt
    and itself: the loss, and the gradient it sends to every weight, equal those of one row per
    sample (what TRL computes), while the prompt's forward and backward run once per group."""
    from llmctl.model.checkpoint import load_model_folder
    from llmctl.rl.grpo_loss import policy_loss
    from llmctl.rl.rollout import collate_rollout

    model, _ = load_model_folder(base_model, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    prompts = [[1, 5, 9, 13, 4, 2], [2, 6, 3]]
    lengths = [[3, 1, 5], [2, 4, 0]]  # ragged, and a sample with no token (counts for nothing)
    samples = [
        (torch.randint(4, 60, (n,), generator=gen).tolist(), (-torch.rand(n, generator=gen)).tolist())
        for group in lengths
        for n in group
    ]
    owners = [j for j, group in enumerate(lengths) for _ in group]
    advantages = torch.randn(len(samples), generator=gen, dtype=torch.float64)

    def loss_and_grads(batch):
        model.zero_grad()
        logps = -model(batch.input_ids, batch.targets, reduction="none", **batch.model_inputs())
        terms = policy_loss(
            logps, batch.old_logps.double(), None, advantages, batch.mask, loss_type=loss_type,
            epsilon_low=0.2, epsilon_high=0.28, beta=0.0, max_completion_length=8,
            completion_of=batch.completion_of,
        )  # fmt: skip
        (terms.loss_sum / terms.units).backward()
        return terms.loss_sum / terms.units, [p.grad.clone() for p in model.parameters()]

    one_each = collate_rollout([prompts[j] for j in owners], samples, advantages, 0)
    shared = collate_rollout([prompts[j] for j in owners], samples, advantages, 0, groups=owners)
    assert one_each.input_ids.shape[0] == 6 and shared.input_ids.shape[0] == 2
    assert shared.n_real < one_each.n_real  # the prompts once per group
    loss, grads = loss_and_grads(one_each)
    loss_shared, grads_shared = loss_and_grads(shared)
    assert loss.item() != 0 and loss_shared.item() == pytest.approx(loss.item(), rel=1e-10)
    for g, g_shared in zip(grads, grads_shared, strict=True):
        torch.testing.assert_close(g_shared, g, rtol=1e-9, atol=1e-12)
