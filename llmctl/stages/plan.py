"""`llmctl plan`: what each training stage of a project will cost, before anything runs.

    plan = plan_project(config, project_dir, device="A100-80GB", gpus=8)
    plan["stages"][0]["memory"]["total_bytes"], plan["stages"][0]["wall_seconds"]
    error = fit_error(plan)            # a ConfigError naming the largest term, or None

For pretrain, and for sft/dpo/grpo where the project configures them (the stages `llmctl run` would
not skip): the model (shape, parameter count), tokens (steps x tokens per step), FLOPs, the
Chinchilla ratio, memory per device (llmctl.train.plan) and wall time at a stated MFU. Shapes come
from the same functions the stages use (pretrain.model_config_for, horizon, grad_accum_steps), the
vocabulary from the newest tokens artifact when there is one (else tokenize.vocab_size), so a plan
agrees with the run. Post-training stages take the model pretrain makes unless their `model` names
an artifact; their horizon in epochs depends on data rendered at run time, so their tokens are
known only with max_steps (GRPO always has it).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from llmctl.errors import ConfigError, InputError, UsageError
from llmctl.model.checkpoint import read_model_config
from llmctl.model.config import ModelConfig, num_params, token_budget
from llmctl.stages import dpo as dpo_stage
from llmctl.stages import pretrain as pretrain_stage
from llmctl.stages import sft as sft_stage
from llmctl.stages.registry import STAGES, TOKENS
from llmctl.stages.runner import workspace_for
from llmctl.train import plan as P

POST_TRAINING = ("sft", "dpo", "grpo")


def local_device() -> str:
    """The table's name for this machine's first GPU, or `cpu` without one (or one not in the table)."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    props = torch.cuda.get_device_properties(0)
    return P.table_name(props.name, props.total_memory) or "cpu"


def _newest(ws: Any, ref: str, kinds: tuple[str, ...]) -> Any | None:
    try:
        return ws.resolve(ref, kinds=kinds, verify=False)
    except InputError:
        return None


def _model_info(mc: ModelConfig, source: str) -> dict[str, Any]:
    return {
        "source": source,
        "params": num_params(mc),
        "non_embedding_params": num_params(mc, non_embedding=True),
        "n_layer": mc.n_layer,
        "n_embd": mc.n_embd,
        "n_head": mc.n_head,
        "n_kv_head": mc.n_kv_head,
        "vocab_size": mc.vocab_size,
        "max_seq_len": mc.max_seq_len,
    }


def plan_project(
    project: Any,
    project_dir: Path,
    *,
    device: str,
    gpus: int = 1,
    nodes: int = 1,
    mfu: float | None = None,
    strategy: str | None = None,
) -> dict[str, Any]:
    """The plan of every training stage of `project` on gpus x nodes devices of type `device`."""
    if gpus < 1 or nodes < 1:
        raise UsageError(f"--gpus and --nodes must be >= 1 (got {gpus} and {nodes})")
    if mfu is not None and not 0 < mfu <= 1:
        raise UsageError(f"--mfu must be in (0, 1] (got {mfu})")
    world = gpus * nodes
    try:
        # cpu: the processes on a node share its cores (pretrain.threads each, when set) and its memory
        threads = project.pretrain.threads or max(1, (os.cpu_count() or 1) // gpus)
        spec = P.device_spec(device, threads=threads)
    except ValueError as e:
        raise UsageError(str(e), hint="--gpu-type " + " | ".join(P.DEVICE_NAMES)) from None
    if spec.kind == "cpu":
        spec = dataclasses.replace(spec, memory_bytes=spec.memory_bytes // gpus)
    mfu = mfu if mfu is not None else P.DEFAULT_MFU[spec.kind]
    ws = workspace_for(project, project_dir)

    # -- pretrain: the vocabulary of the tokens it will read, the shape and horizon it will use
    pcfg = project.pretrain
    tokens_artifact = _newest(ws, "latest", (TOKENS,))
    notes: list[str] = []
    if tokens_artifact is not None:
        vocab = int(tokens_artifact.manifest.metrics.get("vocab_size") or project.tokenize.vocab_size)
        dataset_tokens = (tokens_artifact.manifest.metrics.get("train") or {}).get("tokens")
        notes.append(f"vocab_size and dataset tokens from {tokens_artifact.id}")
    else:
        vocab, dataset_tokens = project.tokenize.vocab_size, None
        notes.append("no tokens artifact yet: vocab_size from tokenize.vocab_size, dataset size unknown")
    init = _newest(ws, pcfg.init, ("model",)) if pcfg.init else None
    if pcfg.init and init is None:
        raise InputError(f"pretrain.init {pcfg.init!r} names no model artifact", hint="llmctl artifacts ls")
    mc, shape_source = pretrain_stage.model_config_for(pcfg, vocab, str(init.path) if init else None)
    accum = pretrain_stage.grad_accum_steps(pcfg, world)
    steps, horizon_source = pretrain_stage.horizon(pcfg, mc)
    tokens = steps * pcfg.batch_tokens
    stages = [
        _stage_plan(
            "pretrain",
            pcfg,
            mc,
            _model_info(mc, shape_source),
            spec=spec,
            world=world,
            mfu=mfu,
            strategy=strategy,
            micro_rows=pcfg.micro_batch_size,
            seq_len=pcfg.seq_len,
            steps=steps,
            tokens_per_step=pcfg.batch_tokens,
            steps_source=horizon_source,
            extra={"grad_accum": accum, "dataset_tokens": dataset_tokens},
            notes=notes,
        )
    ]
    first = stages[0]
    first["chinchilla"] = {
        "tokens_per_param": round(tokens / num_params(mc), 2),
        "compute_optimal_tokens": token_budget(mc),
    }
    if dataset_tokens:
        first["epochs"] = round(tokens / dataset_tokens, 3)

    # -- post-training stages that `llmctl run` would run
    skipped = []
    for name in POST_TRAINING:
        stage = STAGES.get(name)
        if stage is None:
            continue
        reason = stage.skip_reason(project)
        if reason:
            skipped.append({"stage": name, "reason": reason})
            continue
        stages.append(
            _post_training(name, stage.section_of(project), project, ws, mc, pcfg, spec, world, mfu, strategy)
        )
    return {
        "device": {
            "name": spec.name,
            "kind": spec.kind,
            "peak_flops_bf16": spec.peak_bf16,
            "peak_flops_fp32": spec.peak_fp32,
            "memory_bytes": spec.memory_bytes,
        },
        "gpus": gpus,
        "nodes": nodes,
        "world_size": world,
        "mfu": mfu,
        "memory_budget": P.MEMORY_BUDGET,
        "stages": stages,
        "skipped": skipped,
        "fits": all(s["memory"]["fits"] for s in stages),
    }


def _post_training(
    name: str,
    cfg: Any,
    project: Any,
    ws: Any,
    pretrain_mc: ModelConfig,
    pcfg: Any,
    spec: P.DeviceSpec,
    world: int,
    mfu: float,
    strategy: str | None,
) -> dict[str, Any]:
    """sft/dpo/grpo: the model they start from, rows per micro-batch and tokens per step."""
    mc, source = pretrain_mc, "the model pretrain makes"
    if cfg.model:
        artifact = _newest(ws, cfg.model, ("model",))
        if artifact is not None:
            mc, source = read_model_config(artifact.path)[0], artifact.id
    notes: list[str] = []
    trainable = P.lora_params(mc, cfg.lora.rank, cfg.lora.targets) if cfg.lora.enabled else None
    if trainable is not None:
        notes.append(f"LoRA rank {cfg.lora.rank}: {trainable:,} trainable parameters")
    frozen, forward_only = 0, 0
    if name == "grpo":
        seq_len = cfg.max_prompt_len + cfg.rollout.max_new_tokens
        micro_rows, steps, steps_source = cfg.micro_batch_size, cfg.max_steps, "max_steps"
        tokens_per_step = cfg.prompts_per_step * cfg.num_generations * seq_len
        frozen = 1 if cfg.beta > 0 else 0
        notes.append(
            f"rows of max_prompt_len + max_new_tokens = {seq_len} tokens (an upper bound); "
            "rollout generation and its KV cache are not counted"
        )
        if frozen:
            notes.append("beta > 0: a frozen reference copy of the model")
    else:
        seq_len = min(cfg.seq_len or pcfg.seq_len, mc.max_seq_len)
        pairs = 2 if name == "dpo" else 1  # a dpo row holds the prompt with both answers
        micro_rows = cfg.micro_batch_size * pairs
        tokens_per_step = cfg.batch_size * pairs * seq_len
        steps = cfg.max_steps
        epochs = cfg.epochs or {"sft": sft_stage, "dpo": dpo_stage}[name].DEFAULT_EPOCHS
        steps_source = "max_steps" if steps else f"{epochs:g} epochs over the data"
        notes.append(f"rows of up to seq_len {seq_len} tokens (packed rows are full; an upper bound)")
        if name == "dpo" and cfg.loss != "simpo":
            forward_only = 1
            notes.append("reference log-probs computed once before training (forward only)")
    return _stage_plan(
        name,
        cfg,
        mc,
        _model_info(mc, source),
        spec=spec,
        world=world,
        mfu=mfu,
        strategy=strategy,
        micro_rows=micro_rows,
        seq_len=seq_len,
        steps=steps,
        tokens_per_step=tokens_per_step,
        steps_source=steps_source,
        trainable=trainable,
        frozen=frozen,
        forward_only=forward_only,
        notes=notes,
    )


def _resolved_dtype(cfg: Any, spec: P.DeviceSpec) -> str:
    """As llmctl.train.precision.resolve_dtype: auto = bf16 on CUDA, fp32 on CPU."""
    return cfg.dtype if cfg.dtype != "auto" else ("bf16" if spec.kind == "cuda" else "fp32")


def _stage_plan(
    name: str,
    cfg: Any,
    mc: ModelConfig,
    model: dict[str, Any],
    *,
    spec: P.DeviceSpec,
    world: int,
    mfu: float,
    strategy: str | None,
    micro_rows: int,
    seq_len: int,
    steps: int | None,
    tokens_per_step: int,
    steps_source: str,
    trainable: int | None = None,
    frozen: int = 0,
    forward_only: int = 0,
    extra: dict[str, Any] | None = None,
    notes: list[str],
) -> dict[str, Any]:
    dtype = _resolved_dtype(cfg, spec)
    if cfg.compile:
        notes = [*notes, "compile: inductor fuses the loss, so the logits' buffers are likely smaller"]
    strat = strategy or ("fsdp" if cfg.strategy == "fsdp" else "ddp")
    common = dict(
        micro_batch_size=micro_rows,
        seq_len=seq_len,
        dtype=dtype,
        device=spec,
        strategy=strat,
        world_size=world,
        trainable_params=trainable,
        frozen_copies=frozen,
    )
    mem = P.memory_per_device(mc, activation_checkpointing=cfg.activation_checkpointing, **common)
    other = P.memory_per_device(mc, activation_checkpointing=not cfg.activation_checkpointing, **common)
    budget = int(spec.memory_bytes * P.MEMORY_BUDGET)
    # The largest micro-batch (halving the configured one) that fits with the configured checkpointing.
    fitting: int | None = cfg.micro_batch_size if mem.total <= budget else None
    size = cfg.micro_batch_size
    while fitting is None and size > 1:
        size //= 2
        smaller = dict(common, micro_batch_size=size * micro_rows // cfg.micro_batch_size)
        if (
            P.memory_per_device(mc, activation_checkpointing=cfg.activation_checkpointing, **smaller).total
            <= budget
        ):
            fitting = size
    tokens = steps * tokens_per_step if steps else None
    flops = (
        P.training_flops(mc, seq_len=seq_len, tokens=tokens, forward_only_copies=forward_only)
        if tokens
        else None
    )
    largest, largest_bytes = mem.largest()
    return {
        "stage": name,
        "model": model,
        "dtype": dtype,
        "strategy": strat,
        "micro_batch_rows": micro_rows,
        "seq_len": seq_len,
        "steps": steps,
        "steps_source": steps_source,
        "tokens_per_step": tokens_per_step,
        "tokens": tokens,
        **(extra or {}),
        "flops": flops,
        "wall_seconds": P.wall_seconds(flops, spec, world_size=world, mfu=mfu, dtype=dtype)
        if flops
        else None,
        "memory": {
            "terms_bytes": mem.terms,
            "total_bytes": mem.total,
            "formula": mem.formula,
            "activation_checkpointing": cfg.activation_checkpointing,
            "total_bytes_checkpointing_" + ("off" if cfg.activation_checkpointing else "on"): other.total,
            "activations_bytes_checkpointing_"
            + ("off" if cfg.activation_checkpointing else "on"): other.terms["activations"],
            "budget_bytes": budget,
            "fits": mem.total <= budget,
            "largest_term": largest,
            "largest_term_bytes": largest_bytes,
            "micro_batch_size_that_fits": fitting,
        },
        "notes": notes,
    }


def gib(n: float) -> str:
    return f"{n / P.GIB:.1f} GiB" if n >= P.GIB / 10 else f"{n / (1 << 20):.1f} MiB"


def fit_error(plan: dict[str, Any]) -> ConfigError | None:
    """A ConfigError for the first stage whose memory exceeds the budget: the sum, the budget, the
    largest term; one line per term; a hint with the settings that would shrink it. None if all fit."""
    for s in plan["stages"]:
        m = s["memory"]
        if m["fits"]:
            continue
        dev = plan["device"]
        unit = "GPU" if dev["kind"] == "cuda" else "process"
        terms = " + ".join(f"{k} {gib(v)}" for k, v in m["terms_bytes"].items())
        message = (
            f"{s['stage']} does not fit: {terms} = {gib(m['total_bytes'])} per {unit} exceeds "
            f"{gib(m['budget_bytes'])} ({P.MEMORY_BUDGET:.0%} of {gib(dev['memory_bytes'])} on {dev['name']}); "
            f"largest term: {m['largest_term']} {gib(m['largest_term_bytes'])}"
        )
        fixes = []
        if not m["activation_checkpointing"]:
            fixes.append(
                f"--set {s['stage']}.activation_checkpointing=true ({gib(m['total_bytes_checkpointing_on'])})"
            )
        if m["micro_batch_size_that_fits"] is not None:
            fixes.append(f"--set {s['stage']}.micro_batch_size={m['micro_batch_size_that_fits']}")
        if s["strategy"] == "ddp" and plan["world_size"] > 1:
            fixes.append("--strategy fsdp")
        elif plan["world_size"] == 1 and dev["kind"] == "cuda":
            fixes.append("more GPUs with --strategy fsdp")
        return ConfigError(message, hint="try " + ", ".join(fixes) if fixes else "a device with more memory")
    return None
