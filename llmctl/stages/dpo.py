"""The dpo stage: optimise a (chat) model on preference pairs (DPO, cDPO, robust DPO, IPO, SimPO).

A recipe on the training library (llmctl.train.loop): read and validate the pairs
(llmctl.data.preference), render each prompt once with the model's chat template and each answer as
the assistant turn after it (llmctl.train.preference), compute the reference log-probs of every pair
once with the starting model and keep them in the run folder (a resumed run reads them back), then
train on one row per pair with the preference loss; the loop logs TRL's rewards/* and logps/*
metrics on train and held-out pairs. With LoRA the reference is the starting model, i.e. the base
weights without the adapter. The published folder is a plain HF model (LoRA merged) with the
tokenizer and template it was trained with; with LoRA also `adapter/` in PEFT's format.

Inputs: `model`, any model artifact (default: the newest model made before dpo in pipeline order:
sft's). Distributed like sft: every rank runs `run(ctx)`; only rank 0 writes.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from llmctl.config.dpo import DpoConfig
from llmctl.data.preference import PreferencePair, load_preference_data
from llmctl.errors import ConfigError, InputError
from llmctl.model.config import flops_per_token, num_params
from llmctl.model.hf_tokenizer import FolderTokenizer
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
from llmctl.train.loop import LossFn, LossOutput, Trainer
from llmctl.train.precision import autocast_factory
from llmctl.train.preference import (
    REFERENCE_FREE,
    PairBatch,
    PairExample,
    collate_pairs,
    completion_logps,
    fit_pairs,
    pair_stats,
    preference_loss,
    reference_logps,
    tokenize_pair,
)
from llmctl.train.sampler import ShuffledRows
from llmctl.train.setup import make_optimizer, prepare_model
from llmctl.train.validation import loss_validation

DEFAULT_EPOCHS = 1.0
FULL_LR_FRACTION = 0.1  # a tenth of the lr the base model was trained with (an sft model's: ~1e-6 for 1e-5)
FULL_LR_FALLBACK = 1e-6  # TRL's DPOConfig default, for a base model whose lr is unknown
REFERENCE_FILE = "reference_logps.safetensors"
PROGRESS_STATS = {"rewards/accuracies": "acc", "rewards/margins": "margin"}


def run(ctx) -> dict[str, Any]:
    """Stage entry point on every rank; only rank 0 writes the artifact."""
    return run_finetune(ctx, "dpo", train, title=lambda cfg: f" ({cfg.loss})")


def skip_reason(cfg: DpoConfig | None) -> str | None:
    """`llmctl run` leaves dpo out of a project that names no preference data."""
    return without_data("dpo", cfg)


def source_fingerprint(cfg: DpoConfig | None, project_dir: Path) -> list[dict[str, Any]]:
    """The preference files' fingerprint, in the reuse key: edited pairs make dpo run again."""
    from llmctl.data.preference import preference_fingerprint

    return (
        preference_fingerprint(cfg.data, Path(project_dir))
        if cfg is not None and cfg.data is not None
        else []
    )


def training_texts(cfg: DpoConfig, project_dir: Path) -> Iterator[str]:
    """Each training pair's prompt, chosen and rejected answers (data.sources; val_sources are held out)."""
    from llmctl.data.preference import read_pairs

    for pair in read_pairs(cfg.data.sources, Path(project_dir), on_error="skip"):
        yield "\n".join(m.get("content") or "" for m in [*pair.prompt, *pair.chosen, *pair.rejected])


def preflight(cfg: DpoConfig, world_size: int) -> None:
    """Checks that need only the config and the process count: run once before any process starts."""
    grad_accum_steps("dpo", cfg.micro_batch_size, cfg.batch_size, world_size)
    if cfg.data is None:
        raise ConfigError(
            "dpo.data: no preference data configured",
            hint="add `dpo: {data: {sources: [{path: data/preferences.jsonl}]}}` to llmctl.yaml",
        )


# ---- pairs and their reference log-probs -------------------------------------------------------------


def tokenize_pairs(tok: FolderTokenizer, pairs: list[PreferencePair]) -> list[PairExample]:
    out = []
    for pair in pairs:
        try:
            out.append(tokenize_pair(tok, pair.prompt, pair.chosen, pair.rejected))
        except InputError as e:
            raise InputError(f"{pair.where}: {e.message}", hint=e.hint) from None
    return out


def batches_of(examples: list[PairExample], micro: int, pad_id: int) -> list[PairBatch]:
    """Fixed micro-batches in order (reference log-probs and validation)."""
    return [
        collate_pairs(examples[i : i + micro], pad_id, range(i, min(i + micro, len(examples))))
        for i in range(0, len(examples), micro)
    ]


def examples_digest(examples: list[PairExample], model_path: str) -> str:
    """What the reference log-probs depend on: the starting model and every pair's tokens."""
    h = hashlib.sha256(os.fsencode(str(Path(model_path).resolve())))
    for p in examples:
        h.update(repr((p.prompt, p.chosen, p.rejected)).encode())
    return h.hexdigest()


def load_or_compute_reference(
    model: torch.nn.Module,
    splits: dict[str, list[PairExample]],
    *,
    micro: int,
    pad_id: int,
    run_dir: Path,
    digest: str,
    info: D.DistInfo,
    reporter: Reporter,
    autocast: Any,
) -> dict[str, torch.Tensor]:
    """Reference log-probs per split, (n, 2) chosen/rejected: read from the run folder when a file
    made from the same model and pairs is there (a resumed run), else computed (each process its
    share of the batches, summed over processes) and saved there by rank 0."""
    path = run_dir / REFERENCE_FILE
    cached = None
    if path.exists():
        try:
            tensors = load_file(str(path))
            if bytes(tensors.pop("digest").tolist()).decode() == digest:
                cached = tensors
        except Exception:  # a damaged file is recomputed, never trusted
            cached = None
    # Every process computes, or none does (the sum below is collective): read only when all have it.
    have = torch.tensor([float(cached is not None)], device=info.device)
    if float(D.all_reduce(have)[0]) == info.world_size:
        reporter.log(f"dpo: reference log-probs read from {path.name}")
        return {k: cached[k] for k in splits}
    tables = {}
    model.eval()
    for name, examples in splits.items():
        batches = batches_of(examples, micro, pad_id)
        with reporter.progress(f"dpo reference ({name})", total=len(batches), unit="batches") as bar:
            mine = batches[info.rank :: info.world_size]
            table = torch.zeros((len(examples), 2), dtype=torch.float64)
            for k, batch in enumerate(mine):
                with autocast():  # the precision training runs in: step 0's rewards are 0
                    table += reference_logps(model, [batch], len(examples), info.device)
                bar.update(completed=min(len(batches), (k + 1) * info.world_size))
        table = table.to(info.device)
        D.all_reduce(table)
        tables[name] = table.cpu()
    model.train()
    if info.is_main:
        tmp = path.with_suffix(".tmp")
        save_file({**tables, "digest": torch.tensor(list(digest.encode()), dtype=torch.uint8)}, str(tmp))
        os.replace(tmp, path)  # a kill mid-write leaves no file that looks complete
    return tables


def preference_objective(cfg: DpoConfig, reference: torch.Tensor | None, device: str) -> LossFn:
    """(model, PairBatch) -> the preference loss summed over the batch's pairs, and TRL's metrics."""
    beta = cfg.effective_beta

    def loss(model: torch.nn.Module, batch: PairBatch) -> LossOutput:
        b = batch.to(device)
        chosen, rejected = completion_logps(model, b)
        n_c, n_r = b.chosen_tokens, b.rejected_tokens
        ref = reference[batch.indices].to(chosen) if reference is not None else None
        scores = preference_loss(
            cfg.loss,
            chosen,
            rejected,
            None if ref is None else ref[:, 0],
            None if ref is None else ref[:, 1],
            n_c,
            n_r,
            beta=beta,
            label_smoothing=cfg.label_smoothing,
            simpo_gamma=cfg.simpo_gamma,
        )
        loss_sum = scores.losses.sum()
        if cfg.sft_weight:  # TRL's "sft" term: the chosen tokens' mean NLL over the micro-batch, per pair
            loss_sum = loss_sum + cfg.sft_weight * len(batch.indices) * (
                -chosen.sum() / n_c.sum().clamp_min(1)
            )
        if cfg.loss == "simpo":  # SimPO's log-probs are per-token means, as TRL logs them
            chosen, rejected = chosen / n_c.clamp_min(1), rejected / n_r.clamp_min(1)
        stats = pair_stats(scores, chosen, rejected)
        return LossOutput(loss_sum, len(batch.indices), b.n_real, stats)

    return loss


# ---- the recipe ------------------------------------------------------------------------------------


def train(cfg: DpoConfig, job: Job, info: D.DistInfo, reporter: Reporter, note: Any = None) -> TrainedModel:
    """Setup, reference log-probs, training and the final (merged) state on every rank; only rank 0
    writes files."""
    preflight(cfg, info.world_size)
    start = start_finetune("dpo", cfg, job, info, reporter, note)
    model, tok, added_tokens, dtype = start.model, start.tok, start.added_tokens, start.dtype
    reporter, note = start.reporter, start.note
    base = base_training_config(job)
    mc = model.config
    seq_len, seq_source = choose_seq_len("dpo", cfg.seq_len, mc, base)
    lr, lr_source = choose_lr(
        "dpo",
        cfg.optimizer.lr,
        cfg.lora,
        job.base_lr,
        full_fraction=FULL_LR_FRACTION,
        fallback=FULL_LR_FALLBACK,
    )

    # -- data: validated pairs -> prompt and completion tokens -> fitted to seq_len
    data = load_preference_data(cfg.data, Path(job.project_dir), reporter if info.is_main else None)
    train_pairs, _, fit_counts = fit_pairs(tokenize_pairs(tok, data.train), seq_len, overlong=cfg.overlong)
    val_pairs, _, _ = fit_pairs(tokenize_pairs(tok, data.val), seq_len, overlong=cfg.overlong)
    if not train_pairs:
        raise InputError(
            f"dpo: no training pair is left ({fit_counts.dropped_overlong} over-long dropped, "
            f"{fit_counts.dropped_empty} with an empty completion after truncation)",
            hint="check dpo.data, dpo.seq_len and dpo.overlong",
        )
    accum = grad_accum_steps("dpo", cfg.micro_batch_size, cfg.batch_size, info.world_size)
    steps_per_epoch = max(1, math.ceil(len(train_pairs) / cfg.batch_size))
    if cfg.max_steps is not None:
        max_steps, horizon = cfg.max_steps, "max_steps"
    else:
        epochs = cfg.epochs or DEFAULT_EPOCHS
        max_steps, horizon = (
            max(1, math.ceil(epochs * len(train_pairs) / cfg.batch_size)),
            f"{epochs:g} epochs",
        )
    pad_id = pad_id_of(tok) or 0  # padding carries no target and is masked: any id would do
    beta = cfg.effective_beta
    note(
        f"dpo: {len(train_pairs):,} train / {len(val_pairs):,} val pairs ({fit_counts.truncated} truncated, "
        f"{fit_counts.dropped_overlong + fit_counts.dropped_empty} dropped), seq_len {seq_len} ({seq_source})"
    )
    note(
        f"dpo: loss {cfg.loss}, beta {beta:g}"
        + (f", label smoothing {cfg.label_smoothing:g}" if cfg.label_smoothing else "")
        + (f", gamma {cfg.simpo_gamma:g}" if cfg.loss == "simpo" else "")
        + (f", sft weight {cfg.sft_weight:g}" if cfg.sft_weight else "")
        + f"; {max_steps:,} steps ({horizon}, {steps_per_epoch} per epoch), batch {cfg.batch_size} pairs, "
        f"grad_accum {accum}, lr {lr:.2e} ({lr_source}), "
        + (f"LoRA r={cfg.lora.rank} alpha={cfg.lora.alpha:g}" if cfg.lora.enabled else "full fine-tuning")
        + f", {info.world_size} process(es) on {info.device}, {dtype}"
    )

    # -- the reference: the starting model's log-probs, before any adapter or update
    reference = {"train": None, "val": None}
    if cfg.loss not in REFERENCE_FREE:
        splits = {"train": train_pairs, **({"val": val_pairs} if val_pairs else {})}
        with torch.no_grad():
            reference.update(
                load_or_compute_reference(
                    model,
                    splits,
                    micro=cfg.micro_batch_size,
                    pad_id=pad_id,
                    run_dir=Path(job.run_dir),
                    digest=examples_digest(train_pairs + val_pairs, job.model_path),
                    info=info,
                    reporter=reporter,
                    autocast=autocast_factory(dtype, info.device),
                )
            )

    # -- LoRA or full, wrapped for the device(s)
    if cfg.lora.enabled:
        attach_lora(model, cfg.lora, section="dpo", added_tokens=added_tokens, note=note)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model = prepare_model(model, cfg, info)
    sharded = cfg.strategy == "fsdp" and info.distributed
    optimizer = make_optimizer(model, cfg.optimizer, lr=lr, device=info.device, sharded=sharded)

    val_loss_fn = preference_objective(cfg, reference["val"], info.device)
    val_batches = batches_of(val_pairs, cfg.micro_batch_size, pad_id)
    source = ShuffledRows(
        len(train_pairs),
        micro_batch_size=cfg.micro_batch_size,
        seed=cfg.seed,
        info=info,
        collate=lambda picked: collate_pairs([train_pairs[i] for i in picked], pad_id, picked),
    )
    mean_len = sum(len(p) for p in train_pairs) / len(train_pairs)
    trainer = Trainer(
        stage="dpo",
        cfg=cfg,
        model=model,
        optimizer=optimizer,
        source=source,
        loss_fn=preference_objective(cfg, reference["train"], info.device),
        info=info,
        max_steps=max_steps,
        grad_accum=accum,
        lr=lr,
        run_dir=Path(job.run_dir),
        model_config=mc,
        reporter=reporter,
        dtype=dtype,
        validate=loss_validation(val_batches, val_loss_fn, info) if val_batches else None,
        flops_per_token=flops_per_token(mc, int(mean_len)),
        project=job.project,
        progress_stats=PROGRESS_STATS,
    )
    fit = trainer.fit(resume=job.resumed)

    model_state, adapter = fit.model_state, None
    if info.is_main:  # the published model is plain, adapters folded in; the adapter is saved beside it
        model_state, adapter = merged_state(model_state, cfg.lora, added_tokens)
    metrics = {
        "val_loss": None,
        **fit.metrics,
        "loss_type": cfg.loss,
        "beta": beta,
        "sft_weight": cfg.sft_weight,
        "params": num_params(mc),
        "trainable_params": trainable,
        "pairs": len(train_pairs),
        "val_pairs": len(val_pairs),
        "seq_len": seq_len,
        "epochs": round(fit.state.step * cfg.batch_size / len(train_pairs), 3),
        "data": {**data.summary(), **fit_counts.as_dict()},
    }
    return TrainedModel(mc, tok, model_state, adapter, metrics)
