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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from llmctl.config.sft import SftConfig
from llmctl.data.chat import ChatData, Conversation, load_chat_data
from llmctl.errors import ConfigError, InputError
from llmctl.model.checkpoint import load_model_folder
from llmctl.model.config import flops_per_token, num_params
from llmctl.model.hf_tokenizer import FolderTokenizer, load_folder_tokenizer
from llmctl.reporting import Reporter
from llmctl.stages.finetune import (
    Job,
    TrainedModel,
    attach_lora,
    base_training_config,
    choose_lr,
    choose_seq_len,
    grad_accum_steps,
    merged_state,
    pad_id_of,
    run_finetune,
    start_finetune,
    without_data,
)
from llmctl.train import distributed as D
from llmctl.train.chat_template import ensure_chat_template
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
from llmctl.train.sampler import ShuffledRows
from llmctl.train.setup import make_optimizer, prepare_model
from llmctl.train.validation import loss_validation

DEFAULT_EPOCHS = 3
FULL_LR_FALLBACK = 2e-5  # full fine-tuning of a model whose pretraining lr is unknown (imported)
FULL_LR_FRACTION = 0.1  # full fine-tuning: a tenth of the base model's pretraining peak lr


def run(ctx) -> dict[str, Any]:
    """Stage entry point on every rank; only rank 0 writes the artifact."""
    return run_finetune(ctx, "sft", train, title=lambda cfg: "")


def skip_reason(cfg: SftConfig | None) -> str | None:
    """`llmctl run` leaves sft out of a project that names no chat data."""
    return without_data("sft", cfg)


def source_fingerprint(cfg: SftConfig | None, project_dir: Path) -> list[dict[str, Any]]:
    """The chat files' fingerprint, in the reuse key: edited chat data makes sft run again."""
    from llmctl.data.chat import chat_fingerprint

    return chat_fingerprint(cfg.data, Path(project_dir)) if cfg is not None and cfg.data is not None else []


def training_texts(cfg: SftConfig, project_dir: Path) -> Iterator[str]:
    """Each training conversation's messages (data.sources; val_sources are held out)."""
    from llmctl.data.chat import read_conversations

    for record in read_conversations(cfg.data.sources, Path(project_dir), on_error="skip"):
        yield "\n".join(m.get("content") or "" for m in record.messages)


def preflight(cfg: SftConfig, world_size: int) -> None:
    """Checks that need only the config and the process count: run once before any process starts."""
    grad_accum_steps("sft", cfg.micro_batch_size, cfg.batch_size, world_size)
    if cfg.data is None:
        raise ConfigError(
            "sft.data: no chat data configured",
            hint="add `sft: {data: {sources: [{path: data/chat.jsonl}]}}` to llmctl.yaml",
        )


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


class ChatRows(ShuffledRows):
    """Training rows in a seeded random order per epoch (llmctl.train.sampler), collated packed or
    padded; counts the positions its batches hold and how many are real tokens."""

    def __init__(self, examples, rows, cfg: SftConfig, seq_len: int, pad_id: int, info: D.DistInfo):
        super().__init__(
            len(rows), micro_batch_size=cfg.micro_batch_size, seed=cfg.seed, info=info, collate=self._collate
        )
        self.examples, self.rows, self.cfg, self.seq_len, self.pad_id = examples, rows, cfg, seq_len, pad_id
        self.real_tokens = self.positions = 0  # this process's batches: the padding efficiency

    def _collate(self, picked: list[int]) -> Batch:
        batch = collate(self.examples, [self.rows[i] for i in picked], self.cfg, self.seq_len, self.pad_id)
        self.real_tokens += batch.n_real
        self.positions += batch.input_ids.numel()
        return batch


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


def train(cfg: SftConfig, job: Job, info: D.DistInfo, reporter: Reporter, note: Any = None) -> TrainedModel:
    """Setup, training and the final (merged) state on every rank; only rank 0 writes files."""
    preflight(cfg, info.world_size)
    start = start_finetune("sft", cfg, job, info, reporter, note)
    model, tok, added_tokens, dtype = start.model, start.tok, start.added_tokens, start.dtype
    reporter, note = start.reporter, start.note
    base = base_training_config(job)
    check_end_of_turn_trained(tok)
    mc = model.config
    seq_len, seq_source = choose_seq_len("sft", cfg.seq_len, mc, base)
    lr, lr_source = choose_lr(
        "sft",
        cfg.optimizer.lr,
        cfg.lora,
        job.base_lr,
        full_fraction=FULL_LR_FRACTION,
        fallback=FULL_LR_FALLBACK,
    )

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
    accum = grad_accum_steps("sft", cfg.micro_batch_size, cfg.batch_size, info.world_size)
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
        attach_lora(model, cfg.lora, section="sft", added_tokens=added_tokens, note=note)
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
    if info.is_main:  # the published model is plain, adapters folded in; the adapter is saved beside it
        model_state, adapter = merged_state(model_state, cfg.lora, added_tokens)
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
    return TrainedModel(mc, tok, model_state, adapter, metrics)
