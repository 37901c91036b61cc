"""The sft stage: fine-tune a model on conversations into a chat model (full or LoRA) and publish it.

A recipe on the training library (llmctl.train.loop): read and validate the chat data
(llmctl.data.chat), give the model's tokenizer a chat template (ChatML unless it has one;
llmctl.train.chat_template), tokenize each conversation with loss on the assistant turns only,
end-of-turn token included (llmctl.train.chat_tokens), pack the conversations into rows without
attention across them or pad one per row (llmctl.train.packing), and train with next-token loss
over the trained tokens of each global batch. The published folder is a plain HF model (LoRA
merged) with the tokenizer and template it was trained with; with LoRA also `adapter/` in PEFT's
format.

Inputs: `model`, any model artifact (default: the newest model made before sft in pipeline order).
Distributed like pretrain: every rank runs `run(ctx)`; only rank 0 writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmctl.config.sft import SftConfig
from llmctl.data.chat import ChatData, Conversation, load_chat_data
from llmctl.errors import ConfigError, InputError
from llmctl.model.checkpoint import load_model_folder
from llmctl.model.config import ModelConfig, flops_per_token, num_params
from llmctl.model.hf_tokenizer import FolderTokenizer, load_folder_tokenizer
from llmctl.model.lora import add_lora, save_peft_adapter, split_lora_state
from llmctl.reporting import Reporter
from llmctl.train import distributed as D
from llmctl.train.chat_template import ensure_chat_template, save_tokenizer_files
from llmctl.train.chat_tokens import ChatExample, check_end_of_turn_trained, tokenize_conversation
from llmctl.train.loop import Trainer
from llmctl.train.objectives import next_token_loss
from llmctl.train.packing import (
    Batch,
    collate_packed,
    collate_padded,
    fit_to_length,
    pack,
    packing_efficiency,
)
from llmctl.train.precision import resolve_dtype
from llmctl.train.publish import save_trained_model, save_training_log
from llmctl.train.setup import apply_cpu_threads, make_optimizer, prepare_model
from llmctl.train.validation import loss_validation

ADAPTER_DIR = "adapter"
DEFAULT_EPOCHS = 3
FULL_LR_FALLBACK = 2e-5  # full fine-tuning of a model whose pretraining lr is unknown (imported)
FULL_LR_FRACTION = 0.1  # full fine-tuning: a tenth of the base model's pretraining peak lr
LORA_LR_FACTOR = 10.0  # LoRA: 10x the full fine-tuning lr (Hu et al. 2021; the usual 2e-4 vs 2e-5)


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


@dataclass
class SftResult:
    model_config: ModelConfig
    tokenizer: FolderTokenizer
    model_state: dict[str, torch.Tensor]
    adapter: dict[str, torch.Tensor] | None  # PEFT-keyed LoRA tensors
    metrics: dict[str, Any]


def run(ctx) -> dict[str, Any]:
    """Stage entry point on every rank; only rank 0 writes the artifact."""
    cfg: SftConfig = ctx.config
    info = D.init_distributed(device=cfg.device)
    base = ctx.inputs.get("model")
    if base is None:
        raise InputError(
            "sft needs a model and none was given", hint="run `llmctl pretrain` or `llmctl import`"
        )
    job = Job(
        run_dir=str(ctx.run_dir),
        model_path=str(base.path),
        model_ref=getattr(base, "id", None),
        project_dir=str(ctx.project_dir),
        resumed=ctx.resumed,
        base_config=dict(getattr(getattr(base, "manifest", None), "config", None) or {}),
        base_lr=(getattr(getattr(base, "manifest", None), "metrics", None) or {}).get("lr"),
        project=str(getattr(ctx.project, "name", "llmctl")),
    )
    ctx.device = info.device
    result = train(cfg, job, info, ctx.reporter, note=ctx.note)
    if not info.is_main:
        return {}
    out = ctx.output_dir
    tok = result.tokenizer
    save_trained_model(
        out,
        result.model_state,
        result.model_config,
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        pad_id=pad_id_of(tok),
        stop_ids=tok.stop_ids,
    )
    save_tokenizer_files(tok, out)  # the template sft trained with travels with the model
    if result.adapter is not None:
        lora = cfg.lora
        save_peft_adapter(
            out / ADAPTER_DIR,
            result.adapter,
            rank=lora.rank,
            alpha=lora.alpha,
            dropout=lora.dropout,
            base_model=job.model_ref or job.model_path,
        )
    save_training_log(Path(job.run_dir), out, title=f"sft {job.project}")
    return result.metrics


def skip_reason(cfg: SftConfig | None) -> str | None:
    """`llmctl run` leaves sft out of a project that names no chat data."""
    if cfg is None or cfg.data is None:
        return "no sft.data in llmctl.yaml"
    return None


def source_fingerprint(cfg: SftConfig | None, project_dir: Path) -> list[dict[str, Any]]:
    """The chat files' fingerprint, in the reuse key: edited chat data makes sft run again."""
    from llmctl.data.chat import chat_fingerprint

    return chat_fingerprint(cfg.data, Path(project_dir)) if cfg is not None and cfg.data is not None else []


def preflight(cfg: SftConfig, world_size: int) -> None:
    """Checks that need only the config and the process count: run once before any process starts."""
    grad_accum_steps(cfg, world_size)
    if cfg.data is None:
        raise ConfigError(
            "sft.data: no chat data configured",
            hint="add `sft: {data: {sources: [{path: data/chat.jsonl}]}}` to llmctl.yaml",
        )


def grad_accum_steps(cfg: SftConfig, world_size: int) -> int:
    per_pass = cfg.micro_batch_size * world_size
    if cfg.batch_size % per_pass:
        raise ConfigError(
            f"sft.batch_size ({cfg.batch_size}) is not a multiple of micro_batch_size x world_size = "
            f"{cfg.micro_batch_size} x {world_size} = {per_pass}",
            hint=f"set sft.batch_size={max(per_pass, cfg.batch_size // per_pass * per_pass)}",
        )
    return cfg.batch_size // per_pass


# ---- inherited hyperparameters -------------------------------------------------------------------


def base_training_config(job: Job) -> dict[str, Any]:
    """The training section the base model was made with (pretrain's, or an earlier sft's), if any."""
    for section in ("sft", "pretrain"):
        if isinstance(job.base_config.get(section), dict):
            return job.base_config[section]
    return {}


def choose_seq_len(cfg: SftConfig, mc: ModelConfig, base: dict[str, Any]) -> tuple[int, str]:
    if cfg.seq_len is not None:
        if cfg.seq_len > mc.max_seq_len:
            raise ConfigError(
                f"sft.seq_len ({cfg.seq_len}) is longer than the model's context (max_seq_len {mc.max_seq_len})",
                hint=f"set sft.seq_len={mc.max_seq_len}",
            )
        return cfg.seq_len, "sft.seq_len"
    if isinstance(base.get("seq_len"), int) and base["seq_len"] <= mc.max_seq_len:
        return base["seq_len"], "inherited from the base model's training"
    return min(mc.max_seq_len, 2048), "min(max_seq_len, 2048)"


def choose_lr(cfg: SftConfig, base_lr: float | None) -> tuple[float, str]:
    if cfg.optimizer.lr is not None:
        return cfg.optimizer.lr, "sft.optimizer.lr"
    if base_lr:
        full, why = (
            base_lr * FULL_LR_FRACTION,
            f"{FULL_LR_FRACTION:g} x the base model's peak lr {base_lr:.2e}",
        )
    else:
        full, why = FULL_LR_FALLBACK, "full fine-tuning default"
    if cfg.lora.enabled:
        return full * LORA_LR_FACTOR, f"LoRA: {LORA_LR_FACTOR:g} x ({why})"
    return full, why


def pad_id_of(tok: FolderTokenizer) -> int | None:
    pad = tok.special_tokens.get("pad_token")
    found = tok.tokenizer.token_to_id(pad) if pad else None
    return found if found is not None else tok.eos_id


# ---- data ----------------------------------------------------------------------------------------


def tokenize_all(
    tok: FolderTokenizer, conversations: list[Conversation], cfg: SftConfig
) -> list[ChatExample]:
    out = []
    for conv in conversations:
        out.append(
            tokenize_conversation(
                tok, conv.messages, turns=cfg.assistant_turns, train_on_prompt=cfg.train_on_prompt
            )
        )
    return out


def rows_of(examples: list[ChatExample], cfg: SftConfig, seq_len: int) -> list[list[int]]:
    """Example indices per training row: packed several to a row, or one per row."""
    if cfg.packing == "packed":
        return pack(examples, seq_len)
    return [[i] for i in range(len(examples))]


def collate(
    examples: list[ChatExample], rows: list[list[int]], cfg: SftConfig, seq_len: int, pad_id: int
) -> Batch:
    if cfg.packing == "packed":
        return collate_packed([[examples[i] for i in row] for row in rows], seq_len, pad_id)
    return collate_padded([examples[row[0]] for row in rows], pad_id)


class ChatRows:
    """Training rows in a seeded random order per epoch; each process takes its slice of every
    micro-batch. Its state (epoch, position) is saved in checkpoints, so resume is exact."""

    def __init__(self, examples, rows, cfg: SftConfig, seq_len: int, pad_id: int, info: D.DistInfo):
        self.examples, self.rows, self.cfg = examples, rows, cfg
        self.seq_len, self.pad_id, self.info = seq_len, pad_id, info
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)
        self.real_tokens = self.positions = 0  # this process's batches: the padding efficiency

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.rows))

    def next_batch(self) -> Batch:
        micro, info = self.cfg.micro_batch_size, self.info
        span = micro * info.world_size
        picked: list[int] = []
        while len(picked) < span:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(span - len(picked), len(self._order) - self.position)
            picked.extend(self._order[self.position : self.position + take].tolist())
            self.position += take
        mine = picked[info.rank * micro : (info.rank + 1) * micro]
        batch = collate(self.examples, [self.rows[i] for i in mine], self.cfg, self.seq_len, self.pad_id)
        self.real_tokens += batch.n_real
        self.positions += batch.input_ids.numel()
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


def inspect_example(cfg: SftConfig, base: Any, project_dir: Path, index: int):
    """(ChatInspection of training conversation `index`, where it came from, the model's id) for
    `llmctl sft --inspect`: rendered with the template and masking sft would train with."""
    from llmctl.train.chat_tokens import inspect_conversation

    if cfg.data is None:
        preflight(cfg, 1)
    data = load_chat_data(cfg.data, project_dir)
    if not 0 <= index < len(data.train):
        raise InputError(
            f"sft --inspect {index}: there are {len(data.train)} training conversations",
            hint=f"pass 0..{len(data.train) - 1}",
        )
    tok = load_folder_tokenizer(base.path)
    if tok.chat_template is None:  # ChatML and its tokens get added: the model grows with them
        model, _ = load_model_folder(base.path, dtype=torch.float32)
        tok, _ = ensure_chat_template(model, tok)
    conv = data.train[index]
    seen = inspect_conversation(
        tok, conv.messages, turns=cfg.assistant_turns, train_on_prompt=cfg.train_on_prompt
    )
    return seen, conv.where, base.id


# ---- the recipe ------------------------------------------------------------------------------------


def train(cfg: SftConfig, job: Job, info: D.DistInfo, reporter: Reporter, note: Any = None) -> SftResult:
    """Setup, training and the final (merged) state on every rank; only rank 0 writes files."""
    if not info.is_main:
        reporter = Reporter()
    note = note if (note is not None and info.is_main) else (lambda _msg: None)
    preflight(cfg, info.world_size)
    apply_cpu_threads(cfg, info)
    dtype = resolve_dtype(cfg.dtype, info.device, section="sft")
    base = base_training_config(job)

    # -- model and tokenizer with a chat template
    torch.manual_seed(cfg.seed)
    model, _ = load_model_folder(job.model_path, device=info.device, dtype=torch.float32)
    base_vocab = model.config.vocab_size
    tok, changed = ensure_chat_template(model, load_folder_tokenizer(job.model_path))
    if changed:
        note(f"sft: {changed}")
    added_tokens = model.config.vocab_size != base_vocab
    check_end_of_turn_trained(tok)
    mc = model.config
    seq_len, seq_source = choose_seq_len(cfg, mc, base)
    lr, lr_source = choose_lr(cfg, job.base_lr)

    # -- data: validated conversations -> tokens with assistant-only labels -> rows
    data: ChatData = load_chat_data(cfg.data, Path(job.project_dir), reporter if info.is_main else None)
    train_examples, fit_counts = fit_to_length(
        tokenize_all(tok, data.train, cfg), seq_len, overlong=cfg.overlong
    )
    val_examples, _ = fit_to_length(tokenize_all(tok, data.val, cfg), seq_len, overlong=cfg.overlong)
    if not train_examples:
        raise InputError(
            "sft: no training conversation is left with a trained token "
            f"({fit_counts.dropped_overlong} over-long dropped, {fit_counts.dropped_untrained} without assistant tokens)",
            hint="check sft.data, sft.seq_len and sft.overlong",
        )
    rows = rows_of(train_examples, cfg, seq_len)
    efficiency = (
        packing_efficiency([len(ex) for ex in train_examples], rows, seq_len)
        if cfg.packing == "packed"
        else None
    )
    accum = grad_accum_steps(cfg, info.world_size)
    steps_per_epoch = max(1, math.ceil(len(rows) / cfg.batch_size))
    if cfg.max_steps is not None:
        max_steps, horizon = cfg.max_steps, "max_steps"
    else:
        epochs = cfg.epochs or DEFAULT_EPOCHS
        max_steps, horizon = max(1, math.ceil(epochs * len(rows) / cfg.batch_size)), f"{epochs:g} epochs"
    pad_id = pad_id_of(tok) or 0  # padding carries no target and is masked: any id would do
    note(
        f"sft: {len(train_examples):,} train / {len(val_examples):,} val conversations "
        f"({fit_counts.truncated} truncated, {fit_counts.dropped_overlong} dropped as over-long), "
        f"{len(rows):,} rows of {seq_len} tokens ({seq_source})"
        + (f", packing efficiency {efficiency:.1%}" if efficiency is not None else ", padded")
    )
    note(
        f"sft: {max_steps:,} steps ({horizon}, {steps_per_epoch} per epoch), batch {cfg.batch_size} rows, "
        f"grad_accum {accum}, lr {lr:.2e} ({lr_source}), "
        + (f"LoRA r={cfg.lora.rank} alpha={cfg.lora.alpha:g}" if cfg.lora.enabled else "full fine-tuning")
        + f", {info.world_size} process(es) on {info.device}, {dtype}"
    )

    # -- LoRA or full, wrapped for the device(s)
    if cfg.lora.enabled:
        try:
            add_lora(
                model,
                rank=cfg.lora.rank,
                alpha=cfg.lora.alpha,
                dropout=cfg.lora.dropout,
                targets=cfg.lora.targets,
            )
        except ValueError as e:
            raise ConfigError(f"sft.lora.targets: {e}", hint="e.g. [q_proj, v_proj]") from None
        if added_tokens:
            # New chat tokens start as the mean embedding; frozen, the model could not learn them. The
            # merged model carries the trained rows; an adapter alone could not (its base lacks them).
            for p in (*model.model.embed_tokens.parameters(), *model.lm_head.parameters()):
                p.requires_grad_(True)
            note(
                "sft: LoRA with new chat tokens: embeddings trained too; no adapter/ (the base lacks the rows)"
            )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model = prepare_model(model, cfg, info)
    sharded = cfg.strategy == "fsdp" and info.distributed
    optimizer = make_optimizer(model, cfg.optimizer, lr=lr, device=info.device, sharded=sharded)

    val_rows = rows_of(val_examples, cfg, seq_len)
    val_batches = [
        collate(val_examples, val_rows[i : i + cfg.micro_batch_size], cfg, seq_len, pad_id)
        for i in range(0, len(val_rows), cfg.micro_batch_size)
    ]
    loss_fn = next_token_loss(info.device)
    source = ChatRows(train_examples, rows, cfg, seq_len, pad_id, info)
    trainer = Trainer(
        stage="sft",
        cfg=cfg,
        model=model,
        optimizer=optimizer,
        source=source,
        loss_fn=loss_fn,
        info=info,
        max_steps=max_steps,
        grad_accum=accum,
        lr=lr,
        run_dir=Path(job.run_dir),
        model_config=mc,
        reporter=reporter,
        dtype=dtype,
        validate=loss_validation(val_batches, loss_fn, info) if val_batches else None,
        flops_per_token=flops_per_token(mc, seq_len),
        project=job.project,
    )
    fit = trainer.fit(resume=job.resumed)

    model_state, adapter = fit.model_state, None
    if cfg.lora.enabled and info.is_main:
        # The published model is plain, adapters folded in; the adapter itself is saved beside it.
        model_state, adapter = split_lora_state(model_state, scaling=cfg.lora.alpha / cfg.lora.rank)
        adapter = None if added_tokens else adapter
    metrics = {
        "val_loss": None,
        **fit.metrics,
        "params": num_params(mc),
        "trainable_params": trainable,
        "conversations": len(train_examples),
        "val_conversations": len(val_examples),
        "rows": len(rows),
        "seq_len": seq_len,
        "packing_efficiency": None if efficiency is None else round(efficiency, 4),
        # what the batches held: real tokens / positions (packed rows' tails and padded rows' pads)
        "batch_efficiency": round(source.real_tokens / source.positions, 4) if source.positions else None,
        "epochs": round(fit.state.step * cfg.batch_size / len(rows), 3),
        "data": {**data.summary(), **fit_counts.as_dict()},
    }
    return SftResult(mc, tok, model_state, adapter, metrics)
