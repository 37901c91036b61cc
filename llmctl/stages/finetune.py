"""What the stages that fine-tune a model (sft, dpo) share: the job a run starts from, the
hyperparameters they inherit from the base model's own training, LoRA, and the published folder.

    job = Job.from_context(ctx)                        # the base model's folder, id and training config
    seq_len, why = choose_seq_len("dpo", cfg.seq_len, model.config, base_training_config(job))
    lr, why = choose_lr(cfg, job.base_lr, full_fraction=0.1, fallback=5e-7)
    added = attach_lora(model, cfg.lora, section="dpo", added_tokens=..., note=note)
    publish_model(ctx.output_dir, result, cfg.lora, job, title="dpo demo")
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmctl.config.sft import LoraConfig
from llmctl.errors import ConfigError, InputError
from llmctl.model.config import ModelConfig
from llmctl.model.hf_tokenizer import FolderTokenizer
from llmctl.model.lora import add_lora, save_peft_adapter, split_lora_state
from llmctl.train.chat_template import save_tokenizer_files
from llmctl.train.publish import save_trained_model, save_training_log

ADAPTER_DIR = "adapter"
LORA_LR_FACTOR = 10.0  # LoRA: 10x the full fine-tuning lr (Hu et al. 2021; the usual 2e-4 vs 2e-5)
TRAINING_SECTIONS = ("dpo", "sft", "pretrain")  # where a model's manifest keeps its training config


@dataclass(frozen=True)
class Job:
    run_dir: str
    model_path: str
    model_ref: str | None
    project_dir: str
    resumed: bool
    base_config: dict[str, Any] = field(default_factory=dict)  # the base model's own training config
    base_lr: float | None = None  # the peak lr the base model was trained with (its manifest)
    project: str = "llmctl"

    @classmethod
    def from_context(cls, ctx: Any, stage: str) -> Job:
        base = ctx.inputs.get("model")
        if base is None:
            raise InputError(
                f"{stage} needs a model and none was given",
                hint="run `llmctl pretrain` or `llmctl import`",
            )
        manifest = getattr(base, "manifest", None)
        return cls(
            run_dir=str(ctx.run_dir),
            model_path=str(base.path),
            model_ref=getattr(base, "id", None),
            project_dir=str(ctx.project_dir),
            resumed=ctx.resumed,
            base_config=dict(getattr(manifest, "config", None) or {}),
            base_lr=(getattr(manifest, "metrics", None) or {}).get("lr"),
            project=str(getattr(ctx.project, "name", "llmctl")),
        )


def run_finetune(
    ctx: Any, stage: str, train: Callable[..., TrainedModel], title: Callable[[Any], str]
) -> dict[str, Any]:
    """A fine-tuning stage's `run(ctx)` on every rank: train, then rank 0 publishes the model."""
    from llmctl.train import distributed as D

    cfg = ctx.config
    info = D.init_distributed(device=cfg.device)
    job = Job.from_context(ctx, stage)
    ctx.device = info.device
    trained = train(cfg, job, info, ctx.reporter, note=ctx.note)
    if not info.is_main:
        return {}
    publish_model(ctx.output_dir, trained, cfg.lora, job, title=f"{stage} {job.project}{title(cfg)}")
    return trained.metrics


def without_data(section: str, cfg: Any) -> str | None:
    """`llmctl run` leaves a fine-tuning stage out of a project whose section names no data."""
    return f"no {section}.data in llmctl.yaml" if cfg is None or cfg.data is None else None


def grad_accum_steps(section: str, micro_batch_size: int, batch_size: int, world_size: int) -> int:
    """Micro-batches per optimizer step on each process; a batch that does not split is a ConfigError."""
    per_pass = micro_batch_size * world_size
    if batch_size % per_pass:
        raise ConfigError(
            f"{section}.batch_size ({batch_size}) is not a multiple of micro_batch_size x world_size = "
            f"{micro_batch_size} x {world_size} = {per_pass}",
            hint=f"set {section}.batch_size={max(per_pass, batch_size // per_pass * per_pass)}",
        )
    return batch_size // per_pass


@dataclass
class Start:
    """What every fine-tuning recipe starts from (`start_finetune`)."""

    model: torch.nn.Module  # the base model in fp32 on this rank's device, chat tokens added if needed
    tok: FolderTokenizer  # with a chat template (ChatML when the base had none)
    added_tokens: bool  # the vocabulary grew (an adapter alone could not carry the new rows)
    dtype: str  # the compute dtype
    reporter: Any  # a silent one on ranks > 0
    note: Callable[[str], None]  # no-op on ranks > 0


def start_finetune(section: str, cfg: Any, job: Job, info: Any, reporter: Any, note: Any) -> Start:
    """The start every fine-tuning recipe shares, on every rank: threads, dtype, the seed, the base
    model and its tokenizer with a chat template."""
    from llmctl.model.checkpoint import load_model_folder
    from llmctl.model.hf_tokenizer import load_folder_tokenizer
    from llmctl.reporting import Reporter
    from llmctl.train.chat_template import ensure_chat_template
    from llmctl.train.precision import resolve_dtype
    from llmctl.train.setup import apply_cpu_threads

    if not info.is_main:
        reporter = Reporter()
    note = note if (note is not None and info.is_main) else (lambda _msg: None)
    apply_cpu_threads(cfg, info)
    dtype = resolve_dtype(cfg.dtype, info.device, section=section)
    torch.manual_seed(cfg.seed)
    model, _ = load_model_folder(job.model_path, device=info.device, dtype=torch.float32)
    base_vocab = model.config.vocab_size
    tok, changed = ensure_chat_template(model, load_folder_tokenizer(job.model_path))
    if changed:
        note(f"{section}: {changed}")
    return Start(model, tok, model.config.vocab_size != base_vocab, dtype, reporter, note)


@dataclass
class TrainedModel:
    """What a fine-tuning recipe hands to `publish_model` (rank 0)."""

    model_config: ModelConfig
    tokenizer: FolderTokenizer
    model_state: dict[str, torch.Tensor]
    adapter: dict[str, torch.Tensor] | None  # PEFT-keyed LoRA tensors
    metrics: dict[str, Any]


def base_training_config(job: Job) -> dict[str, Any]:
    """The training section the base model was made with (pretrain's, sft's, dpo's), if any."""
    for section in TRAINING_SECTIONS:
        if isinstance(job.base_config.get(section), dict):
            return job.base_config[section]
    return {}


def choose_seq_len(
    section: str, seq_len: int | None, mc: ModelConfig, base: dict[str, Any]
) -> tuple[int, str]:
    if seq_len is not None:
        if seq_len > mc.max_seq_len:
            raise ConfigError(
                f"{section}.seq_len ({seq_len}) is longer than the model's context (max_seq_len {mc.max_seq_len})",
                hint=f"set {section}.seq_len={mc.max_seq_len}",
            )
        return seq_len, f"{section}.seq_len"
    if isinstance(base.get("seq_len"), int) and base["seq_len"] <= mc.max_seq_len:
        return base["seq_len"], "inherited from the base model's training"
    return min(mc.max_seq_len, 2048), "min(max_seq_len, 2048)"


def choose_lr(
    section: str,
    lr: float | None,
    lora: LoraConfig,
    base_lr: float | None,
    *,
    full_fraction: float,
    fallback: float,
) -> tuple[float, str]:
    """The configured lr, else `full_fraction` x the base model's peak lr (or `fallback` when its
    manifest has none), x LORA_LR_FACTOR with LoRA."""
    if lr is not None:
        return lr, f"{section}.optimizer.lr"
    if base_lr:
        full, why = base_lr * full_fraction, f"{full_fraction:g} x the base model's peak lr {base_lr:.2e}"
    else:
        full, why = fallback, "full fine-tuning default"
    if lora.enabled:
        return full * LORA_LR_FACTOR, f"LoRA: {LORA_LR_FACTOR:g} x ({why})"
    return full, why


def pad_id_of(tok: FolderTokenizer) -> int | None:
    pad = tok.special_tokens.get("pad_token")
    found = tok.tokenizer.token_to_id(pad) if pad else None
    return found if found is not None else tok.eos_id


def attach_lora(
    model: torch.nn.Module, lora: LoraConfig, *, section: str, added_tokens: bool, note: Callable[[str], None]
) -> None:
    """LoRA adapters on the configured layers. With chat tokens just added, the embeddings train too:
    new rows start as the mean embedding and, frozen, could not be learned."""
    try:
        add_lora(model, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=lora.targets)
    except ValueError as e:
        raise ConfigError(f"{section}.lora.targets: {e}", hint="e.g. [q_proj, v_proj]") from None
    if added_tokens:
        # The merged model carries the trained rows; an adapter alone could not (its base lacks them).
        for p in (*model.model.embed_tokens.parameters(), *model.lm_head.parameters()):
            p.requires_grad_(True)
        note(
            f"{section}: LoRA with new chat tokens: embeddings trained too; no adapter/ (the base lacks the rows)"
        )


def merged_state(
    state: dict[str, torch.Tensor], lora: LoraConfig, added_tokens: bool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The plain model's state (adapters folded in) and the adapter itself (None without LoRA, or
    when new tokens were added: its base would lack their rows)."""
    if not lora.enabled:
        return state, None
    plain, adapter = split_lora_state(state, scaling=lora.alpha / lora.rank)
    return plain, None if added_tokens else adapter


def publish_model(out: Path, trained: TrainedModel, lora: LoraConfig, job: Job, *, title: str) -> None:
    """The published folder: a plain HF model with the tokenizer and template it was trained with,
    `adapter/` in PEFT's format with LoRA, and the run's training log."""
    tok = trained.tokenizer
    save_trained_model(
        out,
        trained.model_state,
        trained.model_config,
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        pad_id=pad_id_of(tok),
        stop_ids=tok.stop_ids,
    )
    save_tokenizer_files(tok, out)  # the template it trained with travels with the model
    if trained.adapter is not None:
        save_peft_adapter(
            out / ADAPTER_DIR,
            trained.adapter,
            rank=lora.rank,
            alpha=lora.alpha,
            dropout=lora.dropout,
            base_model=job.model_ref or job.model_path,
        )
    save_training_log(Path(job.run_dir), out, title=title)
