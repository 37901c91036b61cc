"""The grpo stage: reinforcement learning with verifiable rewards (GRPO, DAPO, Dr. GRPO).

A recipe on the training library (llmctl.train.loop): read the prompts (llmctl.rl.prompts), build
the verifiers (llmctl.rl.verifiers), and train with the GRPO objective (llmctl.rl.grpo_loss) on
rollouts the policy samples through our engine, G completions per prompt from one prefill
(llmctl.rl.rollout). The held-out prompts are scored greedily before training, every `eval_every`
steps and at the end; the manifest records the gain over the starting model with its paired
standard error. The published folder is a plain HF model (LoRA merged) with its tokenizer and
template; with LoRA also `adapter/`.

Inputs: `model` (default: the newest model made before grpo in pipeline order: dpo's, else sft's).
Distributed like sft: every rank runs `run(ctx)` on its share of the prompts; only rank 0 writes.
"""

from __future__ import annotations

import copy
import importlib.util
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from llmctl.config.grpo import GrpoConfig
from llmctl.errors import ConfigError, InputError
from llmctl.evals.evaluate import stderr_of
from llmctl.model.config import flops_per_token, num_params
from llmctl.model.engine import SamplingParams
from llmctl.reporting import Reporter
from llmctl.rl.grpo_loss import policy_loss
from llmctl.rl.prompts import PromptRecord, load_prompt_data
from llmctl.rl.rollout import RolloutBatch, RolloutSource
from llmctl.rl.verifiers import Reward, build_reward
from llmctl.stages.finetune import (
    Job,
    TrainedModel,
    attach_lora,
    choose_lr,
    merged_state,
    pad_id_of,
    run_finetune,
    start_finetune,
    without_data,
)
from llmctl.train import distributed as D
from llmctl.train.loop import LossFn, LossOutput, Trainer
from llmctl.train.setup import make_optimizer, prepare_model

FULL_LR_FRACTION = 0.1  # a tenth of the lr the base model was trained with
FULL_LR_FALLBACK = 1e-6  # TRL's GRPOConfig default, for a base model whose lr is unknown
PROGRESS_STATS = {"reward": "reward", "kl": "kl", "completion_len": "len"}


def run(ctx) -> dict[str, Any]:
    """Stage entry point on every rank; only rank 0 writes the artifact."""
    return run_finetune(ctx, "grpo", train, title=lambda cfg: f" ({cfg.loss_type})")


def skip_reason(cfg: GrpoConfig | None) -> str | None:
    """`llmctl run` leaves grpo out of a project that names no prompts."""
    return without_data("grpo", cfg)


def source_fingerprint(cfg: GrpoConfig | None, project_dir: Path) -> list[dict[str, Any]]:
    """The prompt files' fingerprint, in the reuse key: edited prompts make grpo run again."""
    from llmctl.rl.prompts import prompt_fingerprint

    return prompt_fingerprint(cfg.data, Path(project_dir)) if cfg is not None and cfg.data is not None else []


def training_texts(cfg: GrpoConfig, project_dir: Path) -> Iterator[str]:
    """Each training prompt's messages (data.sources; val_sources are held out)."""
    from llmctl.rl.prompts import read_prompts

    for record in read_prompts(cfg.data.sources, Path(project_dir), on_error="skip"):
        yield "\n".join(m.get("content") or "" for m in record.prompt)


def preflight(cfg: GrpoConfig, world_size: int) -> None:
    """Checks that need only the config and the process count: run once before any process starts."""
    if cfg.data is None:
        raise ConfigError(
            "grpo.data: no prompts configured",
            hint="add `grpo: {data: {sources: [{path: data/rl_prompts.jsonl}]}, rewards: [{type: math}]}`",
        )
    if cfg.prompts_per_step % world_size:
        raise ConfigError(
            f"grpo.prompts_per_step ({cfg.prompts_per_step}) is not a multiple of the process count {world_size}",
            hint=f"set grpo.prompts_per_step={max(world_size, cfg.prompts_per_step // world_size * world_size)}",
        )
    per_rank = cfg.prompts_per_step // world_size * cfg.num_generations
    if per_rank % cfg.micro_batch_size:
        raise ConfigError(
            f"grpo.micro_batch_size ({cfg.micro_batch_size}) does not divide the {per_rank} completions of a "
            f"process (prompts_per_step / processes x num_generations)",
            hint=f"set grpo.micro_batch_size to a divisor of {per_rank}",
        )
    if cfg.rollout.engine == "vllm":
        missing = [
            why
            for ok, why in (
                (torch.cuda.is_available(), "no CUDA device"),
                (importlib.util.find_spec("vllm") is not None, "the vllm package is not installed"),
            )
            if not ok
        ]
        if missing:
            raise ConfigError(
                f"grpo.rollout.engine: vllm needs a CUDA machine with vLLM ({'; '.join(missing)})",
                hint="set grpo.rollout.engine=llmctl (our engine, CPU or GPU)",
            )
        raise ConfigError(
            "grpo.rollout.engine: vllm rollouts are not available in this version",
            hint="set grpo.rollout.engine=llmctl",
        )


def grpo_objective(cfg: GrpoConfig, device: str) -> LossFn:
    """(model, RolloutBatch) -> the GRPO loss as a sum over its units, with KL, clipping and entropy."""

    def loss(model: torch.nn.Module, batch: RolloutBatch) -> LossOutput:
        b = batch.to(device)
        nll, entropy = model(b.input_ids, b.targets, reduction="none", entropy=True, **b.model_inputs())
        mask = b.mask
        terms = policy_loss(
            -nll.float(),
            b.old_logps,
            b.ref_logps,
            b.advantages,
            mask,
            loss_type=cfg.loss_type,
            epsilon_low=cfg.epsilon,
            epsilon_high=cfg.clip_high,
            beta=cfg.beta,
            max_completion_length=cfg.rollout.max_new_tokens,
            completion_of=b.completion_of,
        )
        tokens = terms.tokens
        stats = {
            "kl": (terms.kl_sum, tokens),
            "clip_ratio/low": (terms.clipped_low, tokens),
            "clip_ratio/high": (terms.clipped_high, tokens),
            "entropy": ((entropy * mask).sum(), tokens),
        }
        return LossOutput(terms.loss_sum, terms.units, b.n_real, stats)

    return loss


def heldout_rewards(
    engine: Any, tok: Any, prompts: list[PromptRecord], reward: Reward, cfg: GrpoConfig, info: D.DistInfo
) -> list[float]:
    """Greedy completions of the held-out prompts (each process its share), scored; every process
    gets the rewards of all of them, in order."""
    mine = list(range(info.rank, len(prompts), info.world_size))
    params = SamplingParams(
        max_new_tokens=cfg.rollout.max_new_tokens, temperature=0.0, stop_token_ids=tuple(tok.stop_ids)
    )
    totals = torch.zeros(len(prompts), dtype=torch.float64)
    if mine:
        policy = engine.model
        was_training = policy.training
        policy.eval()
        outs = engine.generate([tok.encode_chat(prompts[i].prompt) for i in mine], params)
        policy.train(was_training)
        results = reward.score(
            [prompts[i].record for i in mine], [o.text or "" for o in outs], [prompts[i].id for i in mine]
        )
        totals[mine] = torch.tensor([r.total for r in results], dtype=torch.float64)
    totals = totals.to(info.device)
    D.all_reduce(totals)
    return totals.cpu().tolist()


# ---- the recipe ------------------------------------------------------------------------------------


def train(cfg: GrpoConfig, job: Job, info: D.DistInfo, reporter: Reporter, note: Any = None) -> TrainedModel:
    """Setup, rollouts and updates, and the final (merged) state on every rank; only rank 0 writes."""
    preflight(cfg, info.world_size)
    start = start_finetune("grpo", cfg, job, info, reporter, note)
    model, tok, added_tokens, dtype = start.model, start.tok, start.added_tokens, start.dtype
    reporter, note = start.reporter, start.note
    mc = model.config
    lr, lr_source = choose_lr(
        "grpo",
        cfg.optimizer.lr,
        cfg.lora,
        job.base_lr,
        full_fraction=FULL_LR_FRACTION,
        fallback=FULL_LR_FALLBACK,
    )
    reward = build_reward(cfg.rewards, Path(job.project_dir))

    # -- prompts that fit, with room for the completion
    data = load_prompt_data(cfg.data, Path(job.project_dir), reporter if info.is_main else None)
    room = min(cfg.max_prompt_len, mc.max_seq_len - cfg.rollout.max_new_tokens)
    if room < 1:
        raise ConfigError(
            f"grpo.rollout.max_new_tokens ({cfg.rollout.max_new_tokens}) leaves no room for a prompt in the "
            f"model's context ({mc.max_seq_len})",
            hint=f"set grpo.rollout.max_new_tokens below {mc.max_seq_len}",
        )
    fits = lambda p: len(tok.encode_chat(p.prompt)) <= room  # noqa: E731
    train_prompts, val_prompts = [p for p in data.train if fits(p)], [p for p in data.val if fits(p)]
    too_long = len(data.train) + len(data.val) - len(train_prompts) - len(val_prompts)
    if len(train_prompts) < cfg.prompts_per_step:
        raise InputError(
            f"grpo: {len(train_prompts)} training prompts fit in {room} tokens, fewer than prompts_per_step "
            f"({cfg.prompts_per_step}; {too_long} too long)",
            hint="add prompts, or lower grpo.prompts_per_step",
        )
    G, per_rank = cfg.num_generations, cfg.prompts_per_step // info.world_size
    accum = per_rank * G // cfg.micro_batch_size
    note(
        f"grpo: {len(train_prompts):,} train / {len(val_prompts):,} held-out prompts ({too_long} too long), "
        f"verifiers {', '.join(reward.names)}"
    )
    note(
        f"grpo: {cfg.max_steps:,} steps of {cfg.prompts_per_step} prompts x {G} completions "
        f"({cfg.num_iterations} pass(es) per rollout), loss {cfg.loss_type}, clip [{1 - cfg.epsilon:g}, "
        f"{1 + cfg.clip_high:g}], beta {cfg.beta:g}, lr {lr:.2e} ({lr_source}), "
        + (f"LoRA r={cfg.lora.rank}" if cfg.lora.enabled else "full fine-tuning")
        + f", {info.world_size} process(es) on {info.device}, {dtype}"
    )

    # -- the frozen reference (beta > 0 only): the starting model, before any adapter or update
    reference = None
    if cfg.beta > 0:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    if cfg.lora.enabled:
        attach_lora(model, cfg.lora, section="grpo", added_tokens=added_tokens, note=note)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    policy = model  # the unwrapped module the engine samples from
    model = prepare_model(model, cfg, info)
    sharded = cfg.strategy == "fsdp" and info.distributed
    if sharded:
        raise ConfigError("grpo.strategy: fsdp is not supported for grpo yet", hint="use ddp (auto)")
    optimizer = make_optimizer(model, cfg.optimizer, lr=lr, device=info.device, sharded=sharded)

    pad_id = pad_id_of(tok) or 0
    source = RolloutSource(
        policy,
        tok,
        train_prompts,
        reward,
        cfg,
        info,
        run_dir=Path(job.run_dir),
        pad_id=pad_id,
        reference=reference,
    )
    start = heldout_rewards(source.engine, tok, val_prompts, reward, cfg, info) if val_prompts else []
    if start:
        note(
            f"grpo: held-out reward before training {sum(start) / len(start):.4f} ({len(start)} prompts, greedy)"
        )

    def validate(_model: torch.nn.Module) -> dict[str, float]:
        rewards = heldout_rewards(source.engine, tok, val_prompts, reward, cfg, info)
        return {"val_reward": sum(rewards) / len(rewards)}

    trainer = Trainer(
        stage="grpo",
        cfg=cfg,
        model=model,
        optimizer=optimizer,
        source=source,
        loss_fn=grpo_objective(cfg, info.device),
        info=info,
        max_steps=cfg.max_steps,
        grad_accum=accum,
        lr=lr,
        run_dir=Path(job.run_dir),
        model_config=mc,
        reporter=reporter,
        dtype=dtype,
        validate=validate if val_prompts else None,
        flops_per_token=flops_per_token(mc, cfg.max_prompt_len),
        project=job.project,
        progress_stats=PROGRESS_STATS,
    )
    fit = trainer.fit(resume=job.resumed)

    end = heldout_rewards(source.engine, tok, val_prompts, reward, cfg, info) if val_prompts else []
    gain = [b - a for a, b in zip(start, end, strict=True)]
    model_state, adapter = fit.model_state, None
    if info.is_main:
        model_state, adapter = merged_state(model_state, cfg.lora, added_tokens)
    metrics = {
        **fit.metrics,
        "loss_type": cfg.loss_type,
        "beta": cfg.beta,
        "num_generations": G,
        "params": num_params(mc),
        "trainable_params": trainable,
        "prompts": len(train_prompts),
        "val_prompts": len(val_prompts),
        "start_val_reward": sum(start) / len(start) if start else None,
        "val_reward": sum(end) / len(end) if end else None,
        "val_reward_gain": sum(gain) / len(gain) if gain else None,
        "val_reward_gain_stderr": stderr_of(gain) if len(gain) > 1 else None,
        "rollouts": source.rollouts,
        "data": data.summary(),
    }
    if metrics["val_reward_gain"] is not None and not math.isfinite(metrics["val_reward_gain"]):
        metrics["val_reward_gain"] = None
    return TrainedModel(mc, tok, model_state, adapter, metrics)
