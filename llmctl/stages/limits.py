"""Config values that become processes or memory, checked against this machine before a stage runs.

    check_limits(["dedup", "filter"], project)        # raises ConfigError, one line per key over its limit
    check_limits(["pretrain"], project, plan.inputs)  # with inputs: the real vocabulary size
    check_limits(["sft"], project, plan.inputs)       # fine-tuning: the input model's config.json

The schema (`llmctl config validate`) stays machine-independent on purpose: a project file written for
a 64-core node must validate on the laptop that edits it. These checks run where the work would run,
just before it starts (`llmctl.stages.runner`: every stage of `llmctl run` up front, and each stage
again with its resolved inputs), so `dedup.workers=100000` is a config error, not a fork bomb.

What is checked:
* worker processes (dedup, filter, tokenize `workers`) against the cores this process may use;
* dedup MinHash signature memory (bands x rows hashes per document, per worker) against memory;
* tokenize shard buffers (shard_tokens uint32 ids for train and for val) against memory;
* pretrain: parameters, gradients and AdamW state (16 bytes per parameter, fp32), the rotary tables
  (max_seq_len x head_dim) and activations at micro_batch_size x seq_len, against the memory of the
  device (GPU memory, or RAM shared by the processes of a CPU run). The estimate leans low: it is
  meant to refuse shapes that cannot fit, never to second-guess ones that might.
* sft, dpo, grpo: the same for the input model (its config.json): AdamW state for full fine-tuning,
  fp32 weights alone with LoRA (the adapters are small), a frozen reference copy for grpo with
  beta > 0, and the activations of one micro-batch (sft: rows x seq_len; dpo: one row of
  2 x seq_len + 1 per pair; grpo: completions x (max_prompt_len + max_new_tokens)); grpo's rollouts
  also hold a KV cache for their prompts x num_generations rows. Without inputs (`llmctl run` up
  front, before the model exists) these stages are checked later, with them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.errors import ConfigError
from llmctl.threads import available_cores

GB = 1024**3
# Bytes per stored activation value per token and layer, as multiples of n_embd: attention inputs,
# q/k/v, attention output, residuals, norms and the SwiGLU hidden states (Korthikanti et al. 2022
# count 34 bytes x n_embd in 16-bit; the lower 16 values are kept here so the estimate stays a floor).
_ACTIVATION_VALUES_PER_EMBD = 16


@dataclass(frozen=True)
class Machine:
    cores: int
    memory_bytes: int  # available to this process now (RAM, capped by a cgroup limit)

    @property
    def memory(self) -> str:
        return _size(self.memory_bytes)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def available_memory() -> int:
    """RAM this process can still get: MemAvailable, capped by its cgroup's memory limit."""
    meminfo = _read(Path("/proc/meminfo")) or ""
    available = next(
        (int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemAvailable:")),
        None,
    )
    if available is None:  # not Linux
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 1 << 62  # unknown: do not refuse on a guess
    limit, used = _read(Path("/sys/fs/cgroup/memory.max")), _read(Path("/sys/fs/cgroup/memory.current"))
    if limit and limit.isdigit() and used and used.isdigit():
        available = min(available, max(int(limit) - int(used), 0))
    return available


def this_machine() -> Machine:
    return Machine(cores=available_cores(), memory_bytes=available_memory())


def _size(n: float) -> str:
    for unit, scale in (("PB", 1024**5), ("TB", 1024**4), ("GB", GB), ("MB", 1024**2)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 1024:,.1f} KB"


def dedup_signature_bytes(bands: int, rows: int) -> int:
    """Peak signature memory of one dedup worker: two (chunk docs, bands x rows) uint64 arrays, plus
    the permutation parameters (see llmctl.data.minhash.MinHasher.signatures)."""
    from llmctl.data.dedup import CHUNK_DOCS

    return (2 * CHUNK_DOCS + 2) * bands * rows * 8


def pretrain_memory(mc: Any, cfg: Any, world_size: int = 1, *, device: str = "cpu") -> dict[str, int]:
    """Estimated peak memory of one training process by the keys that drive it (see the module
    docstring); a floor, not a bound."""
    from llmctl.model.config import num_params

    state = 16 * num_params(mc)  # fp32 weights, gradients, AdamW exp_avg and exp_avg_sq
    if cfg.strategy == "fsdp" and world_size > 1:
        state //= world_size
    return {
        "pretrain.model (n_layer, n_embd, intermediate_size, vocabulary)": state,
        "pretrain.model.max_seq_len": 3 * mc.max_seq_len * mc.head_dim * 4,  # cos, sin, their angles
        "pretrain.micro_batch_size x pretrain.seq_len": activation_memory(
            mc, cfg, cfg.micro_batch_size * cfg.seq_len, device=device
        ),
    }


def _value_bytes(cfg: Any, device: str) -> int:
    return 2 if device == "cuda" and cfg.dtype != "fp32" else 4


def activation_memory(mc: Any, cfg: Any, tokens: int, *, device: str = "cpu") -> int:
    """Stored activations of one forward/backward pass over `tokens` tokens, and its logits."""
    stored_layers = 1 if cfg.activation_checkpointing else mc.n_layer
    return (
        stored_layers * tokens * _ACTIVATION_VALUES_PER_EMBD * mc.n_embd * _value_bytes(cfg, device)
        + 2 * tokens * mc.vocab_size * 4  # fp32 logits and their gradient
    )


def finetune_memory(
    stage: str, mc: Any, cfg: Any, seq_len: int, world_size: int = 1, *, device: str = "cpu"
) -> tuple[dict[str, int], dict[str, int]]:
    """(memory held throughout, memory of one phase) of one sft/dpo/grpo process, by the key that
    drives each part; the peak is the first's sum plus the largest of the second (grpo's rollouts
    and its training passes do not overlap). `seq_len` is sft's and dpo's resolved row length,
    grpo's prompt room + max_new_tokens. A floor, like pretrain_memory."""
    from llmctl.model.config import num_params

    params = num_params(mc)
    if cfg.lora.enabled:
        # frozen fp32 weights; the adapters and their optimizer state are small beside them
        held = {f"{stage}.lora.enabled": 4 * params}
    else:
        state = 16 * params  # fp32 weights, gradients, AdamW exp_avg and exp_avg_sq
        if cfg.strategy == "fsdp" and world_size > 1:
            state //= world_size
        held = {f"{stage}.model (n_layer, n_embd, intermediate_size, vocabulary)": state}
    if stage == "grpo" and cfg.beta > 0:
        held["grpo.beta"] = 4 * params  # the frozen reference: a second copy of the weights
    row_len = 2 * seq_len + 1 if stage == "dpo" else seq_len  # dpo: prompt and both answers in one row
    length_key = (
        f"{stage}.seq_len" if stage != "grpo" else "(grpo.max_prompt_len + grpo.rollout.max_new_tokens)"
    )
    phase = {
        f"{stage}.micro_batch_size x {length_key}": activation_memory(
            mc, cfg, cfg.micro_batch_size * row_len, device=device
        )
    }
    if stage == "grpo":
        completions = cfg.prompts_per_step // max(world_size, 1) * cfg.num_generations
        per_token = 2 * mc.n_layer * mc.n_kv_head * mc.head_dim * _value_bytes(cfg, device)  # keys and values
        phase["grpo.prompts_per_step x grpo.num_generations"] = completions * seq_len * per_token
    return held, phase


def check_limits(
    stages: Sequence[str], project: Any, inputs: dict[str, Any] | None = None, machine: Machine | None = None
) -> None:
    """Raise one ConfigError naming every key of these stages' config that this machine cannot hold.
    `inputs` (a stage's resolved input artifacts) gives pretrain its real vocabulary size, and sft,
    dpo and grpo their model (without it they are not checked)."""
    machine = machine or this_machine()
    errors: list[str] = []
    for stage in stages:
        if stage in ("dedup", "filter", "tokenize"):
            errors += _data_limits(stage, getattr(project, stage), machine)
        elif stage == "pretrain":
            errors += _pretrain_limits(project, inputs or {}, machine)
        elif stage in ("sft", "dpo", "grpo") and (inputs or {}).get("model") is not None:
            errors += _finetune_limits(stage, getattr(project, stage), inputs["model"], machine)
    if errors:
        noun = "value" if len(errors) == 1 else "values"
        raise ConfigError(
            f"{len(errors)} config {noun} beyond this machine "
            f"({machine.cores} cores, {machine.memory} memory available)",
            errors=errors,
            hint="lower the values named above (`--set KEY=VALUE` for one run)",
        )


def _data_limits(stage: str, cfg: Any, machine: Machine) -> list[str]:
    errors = []
    local = stage != "dedup" or cfg.executor == "local"  # slurm/ray workers run elsewhere
    workers = cfg.workers or 0
    if local and workers > machine.cores:
        errors.append(
            f"{stage}.workers: {workers:,} worker processes, but this process may use {machine.cores} "
            f"cores; at most {machine.cores} (or 0/empty: one per core)"
        )
    if stage == "tokenize" and 2 * cfg.shard_tokens * 4 > machine.memory_bytes:
        # the train and val writers each buffer up to a shard of uint32 ids before writing it
        errors.append(
            f"tokenize.shard_tokens: {cfg.shard_tokens:,} tokens per shard are buffered in memory "
            f"(~{_size(2 * cfg.shard_tokens * 4)} for train and val), and {machine.memory} is available; "
            f"at most {machine.memory_bytes // 8:,} fit"
        )
    if stage == "dedup" and cfg.near and local:
        per_worker = dedup_signature_bytes(cfg.bands, cfg.rows)
        n = min(cfg.local_workers, machine.cores)
        if n * per_worker > machine.memory_bytes:
            fit = machine.memory_bytes // (n * dedup_signature_bytes(1, 1))
            errors.append(
                f"dedup.bands x dedup.rows: {cfg.bands:,} x {cfg.rows:,} = {cfg.bands * cfg.rows:,} hashes per "
                f"document need ~{_size(per_worker)} per worker x {n} workers, and {machine.memory} is "
                f"available; at most {fit:,} hashes per document fit (FineWeb uses 14 x 8 = 112)"
            )
    return errors


def _pretrain_limits(project: Any, inputs: dict[str, Any], machine: Machine) -> list[str]:
    from llmctl.stages.pretrain import model_config_for

    cfg = project.pretrain
    data, init = inputs.get("data"), inputs.get("init")
    vocab = _vocab_size(data, project)
    mc, _ = model_config_for(cfg, int(vocab), str(init.path) if init is not None else None)
    errors = []
    if mc.max_seq_len < cfg.seq_len:
        return errors  # the stage reports this mismatch itself, with its own hint
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device, budget, where = _training_memory(cfg, machine, world)
    parts = pretrain_memory(mc, cfg, world, device=device)
    need = sum(parts.values())
    if need > budget:
        from llmctl.model.config import num_params

        key, biggest = max(parts.items(), key=lambda kv: kv[1])
        errors.append(
            f"{key}: a {num_params(mc):,}-parameter model (n_layer {mc.n_layer}, n_embd {mc.n_embd:,}, "
            f"max_seq_len {mc.max_seq_len:,}) at micro_batch_size {cfg.micro_batch_size} x seq_len "
            f"{cfg.seq_len:,} needs at least ~{_size(need)} per process (~{_size(biggest)} for this key), "
            f"and {where}"
        )
    return errors


def _finetune_limits(stage: str, cfg: Any, model: Any, machine: Machine) -> list[str]:
    from llmctl.errors import InputError
    from llmctl.model.checkpoint import read_model_config
    from llmctl.model.config import num_params

    try:
        mc, _ = read_model_config(model.path)
    except InputError:
        return []  # the stage reports an unreadable model itself
    seq_len = _finetune_seq_len(stage, cfg, mc, model)
    if seq_len is None:
        return []  # a length the model cannot hold: the stage reports it, with its own hint
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device, budget, where = _training_memory(cfg, machine, world)
    held, phase = finetune_memory(stage, mc, cfg, seq_len, world, device=device)
    need = sum(held.values()) + max(phase.values())
    if need <= budget:
        return []
    key, biggest = max({**held, **phase}.items(), key=lambda kv: kv[1])
    return [
        f"{key}: a {num_params(mc):,}-parameter model (n_layer {mc.n_layer}, n_embd {mc.n_embd:,}, vocabulary "
        f"{mc.vocab_size:,}) at micro_batch_size {cfg.micro_batch_size} x {seq_len:,} tokens needs at least "
        f"~{_size(need)} per process (~{_size(biggest)} for this key), and {where}"
    ]


def _finetune_seq_len(stage: str, cfg: Any, mc: Any, model: Any) -> int | None:
    """The row length the stage will train on (see llmctl.stages.finetune.choose_seq_len), or None
    when the config asks for more than the model's context."""
    if stage == "grpo":
        room = min(cfg.max_prompt_len, mc.max_seq_len - cfg.rollout.max_new_tokens)
        return room + cfg.rollout.max_new_tokens if room >= 1 else None
    if cfg.seq_len is not None:
        return cfg.seq_len if cfg.seq_len <= mc.max_seq_len else None
    from llmctl.stages.finetune import TRAINING_SECTIONS, choose_seq_len

    config = getattr(getattr(model, "manifest", None), "config", None) or {}
    base = next((config[s] for s in TRAINING_SECTIONS if isinstance(config.get(s), dict)), {})
    return choose_seq_len(stage, None, mc, base)[0]


def _vocab_size(data: Any, project: Any) -> int:
    """The tokens artifact's vocabulary (its metrics, else a shard header), else the project's setting."""
    if data is not None:
        if vocab := data.manifest.metrics.get("vocab_size"):
            return int(vocab)
        from llmctl.data.shards import TRAIN_DIR, list_shards, read_header

        if shards := list_shards(data.path / TRAIN_DIR):
            return read_header(shards[0]).vocab_size
    tokenize = getattr(project, "tokenize", None)
    return tokenize.vocab_size if tokenize is not None else 50_304


def _training_memory(cfg: Any, machine: Machine, world: int) -> tuple[str, int, str]:
    """(device, bytes one training process may use, what that memory is, for the error)."""
    if cfg.device != "cpu":
        import torch

        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            total = torch.cuda.get_device_properties(local % torch.cuda.device_count()).total_memory
            return "cuda", total, f"GPU {local} has {_size(total)}"
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    share = machine.memory_bytes // max(local_world, 1)
    each = f" ({local_world} processes share {machine.memory})" if local_world > 1 else ""
    return "cpu", share, f"this machine has {_size(share)} available{each}"
