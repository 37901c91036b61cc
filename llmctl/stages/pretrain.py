"""The pretrain stage: train a transformer on a tokens artifact and publish an HF-compatible model.

A recipe on the training library (llmctl.train.loop): build the tokenizer-sized model, a loader of
random token windows and the next-token loss, hand them to `Trainer.fit`, publish the model folder
with its tokenizer, metrics.jsonl and loss.png. The loop (grad accumulation, clipping, schedule,
NaN/spike guard, validation, checkpoints, exact resume, interrupts) is the library's.

Inputs: `data`, a tokens artifact (`tokenizer/`, `train/`, `val/` shards; see llmctl.data.encode);
optionally `init`, a model artifact to continue pretraining (its shape replaces `pretrain.model`).

Distributed: under torchrun every rank runs `run(ctx)` with the same inputs and run folder (the
stage runner hands them from rank 0 to the others); every rank evaluates the same checks on the same
inputs, so a bad config fails on all ranks at once rather than hanging; only rank 0 writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmctl.config.pretrain import DEFAULT_MAX_STEPS, PretrainConfig
from llmctl.data.loader import TokenLoader
from llmctl.data.shards import TOKENIZER_DIR, TRAIN_DIR, VAL_DIR, TokenShard, list_shards
from llmctl.data.tokenizer import Tokenizer, load_tokenizer
from llmctl.errors import ConfigError, InputError
from llmctl.model.checkpoint import load_model_folder, read_model_config
from llmctl.model.config import ModelConfig, flops_per_token, from_depth, num_params, preset, suggested_lr
from llmctl.model.transformer import Transformer
from llmctl.reporting import Reporter
from llmctl.train import distributed as D
from llmctl.train.loop import Trainer
from llmctl.train.objectives import next_token_loss
from llmctl.train.precision import resolve_dtype
from llmctl.train.publish import save_trained_model, save_training_log
from llmctl.train.setup import apply_cpu_threads, make_optimizer, prepare_model
from llmctl.train.validation import token_byte_lengths, token_validation


@dataclass(frozen=True)
class Job:
    """What rank 0 tells every other rank: where to work and what to read."""

    run_dir: str
    data_path: str
    init_path: str | None
    resumed: bool
    project: str = "llmctl"


@dataclass
class TrainResult:
    """What `train` hands back to rank 0 for publishing (model_state is empty on other ranks)."""

    model_config: ModelConfig
    tokenizer: Tokenizer
    model_state: dict[str, torch.Tensor]
    metrics: dict[str, Any] = field(default_factory=dict)


def run(ctx) -> dict[str, Any]:
    """Stage entry point, on every rank of a torchrun job (the stage runner starts the process group
    and gives ranks > 0 the same inputs and run folder); only rank 0 writes the artifact."""
    info = D.init_distributed(device=ctx.config.device)
    data = ctx.inputs.get("data")
    if data is None:
        raise InputError(
            "pretrain needs a tokens artifact and none was given", hint="run `llmctl tokenize` first"
        )
    init = ctx.inputs.get("init")
    job = Job(
        run_dir=str(ctx.run_dir),
        data_path=str(data.path),
        init_path=str(init.path) if init is not None else None,
        resumed=ctx.resumed,
        project=str(getattr(ctx.project, "name", "llmctl")),
    )
    ctx.device = info.device
    result = train(ctx.config, job, info, ctx.reporter, note=ctx.note)
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
        pad_id=tok.pad_id,
        stop_ids=tok.stop_token_ids,
    )
    # The model folder carries its tokenizer: the artifact is self-contained.
    tok.save(out, model_max_length=result.model_config.max_seq_len)
    save_training_log(Path(job.run_dir), out, title=f"pretrain {job.project}")
    return result.metrics


def preflight(cfg: PretrainConfig, world_size: int, inputs: dict[str, Any]) -> None:
    """Checks of the config against the process count and the inputs, run once before any process
    starts: a batch that does not split over the ranks, an init model whose vocabulary is not the
    tokenizer's."""
    grad_accum_steps(cfg, world_size)
    data, init = inputs.get("data"), inputs.get("init")
    if data is not None and init is not None and (data.path / TOKENIZER_DIR).is_dir():
        model_config_for(cfg, load_tokenizer(data.path / TOKENIZER_DIR).vocab_size, str(init.path))


# ---- setup helpers -------------------------------------------------------------------------------


def model_config_for(cfg: PretrainConfig, vocab_size: int, init_path: str | None) -> tuple[ModelConfig, str]:
    """The model shape and where it came from; vocab_size always from the tokenizer."""
    if init_path is not None:
        mc, _ = read_model_config(Path(init_path))
        if mc.vocab_size != vocab_size:
            raise InputError(
                f"pretrain.init model has vocab_size {mc.vocab_size:,} but the tokenizer has {vocab_size:,}",
                hint="continue pretraining on data tokenized with the model's own tokenizer "
                "(tokenize.adopt: <the init model folder>)",
            )
        return mc, f"shape from the init model {init_path} (pretrain.model ignored)"
    shape = cfg.model
    try:
        if shape.depth is not None:
            max_len = shape.max_seq_len or max(cfg.seq_len, 2048)
            overrides = {k: v for k, v in shape.overrides().items() if k != "max_seq_len"}
            mc = from_depth(shape.depth, vocab_size, max_seq_len=max_len, **overrides)
            return mc, f"depth {shape.depth}"
        return preset(shape.preset, vocab_size=vocab_size, **shape.overrides()), f"preset {shape.preset}"
    except ValueError as e:
        raise ConfigError(
            f"pretrain.model: {e}", hint="see `llmctl config schema` for the model fields"
        ) from None


def horizon(cfg: PretrainConfig, mc: ModelConfig) -> tuple[int, str]:
    """max_steps and how it was derived (token horizons round up to whole steps)."""
    if cfg.max_steps is not None:
        return cfg.max_steps, "max_steps"
    if cfg.max_tokens is not None:
        return math.ceil(cfg.max_tokens / cfg.batch_tokens), f"max_tokens {cfg.max_tokens:,} / batch_tokens"
    if cfg.tokens_per_param is not None:
        tokens = cfg.tokens_per_param * num_params(mc)
        return max(
            1, math.ceil(tokens / cfg.batch_tokens)
        ), f"{cfg.tokens_per_param} tokens/param x {num_params(mc):,} params"
    return DEFAULT_MAX_STEPS, "default"


def grad_accum_steps(cfg: PretrainConfig, world_size: int) -> int:
    per_pass = cfg.micro_batch_size * cfg.seq_len * world_size
    if cfg.batch_tokens % per_pass:
        lo = max(per_pass, cfg.batch_tokens // per_pass * per_pass)
        raise ConfigError(
            f"pretrain.batch_tokens ({cfg.batch_tokens:,}) is not a multiple of micro_batch_size x seq_len x "
            f"world_size = {cfg.micro_batch_size} x {cfg.seq_len} x {world_size} = {per_pass:,}",
            hint=f"set pretrain.batch_tokens={lo} (or {lo + per_pass}), or change micro_batch_size/seq_len",
        )
    return cfg.batch_tokens // per_pass


# ---- the recipe ------------------------------------------------------------------------------------


def train(
    cfg: PretrainConfig,
    job: Job,
    info: D.DistInfo,
    reporter: Reporter,
    note: Any = None,
) -> TrainResult:
    """Setup, training and final state on every rank; only rank 0 writes files."""
    if not info.is_main:
        reporter = Reporter()
    note = note if (note is not None and info.is_main) else (lambda _msg: None)
    data_dir = Path(job.data_path)
    apply_cpu_threads(cfg, info)
    dtype = resolve_dtype(cfg.dtype, info.device)

    # -- tokenizer, model shape, checks
    tok_dir = data_dir / TOKENIZER_DIR
    if not (tok_dir.is_dir() and (data_dir / TRAIN_DIR).is_dir()):
        raise InputError(
            f"{data_dir}: not a tokens artifact (expected {TOKENIZER_DIR}/ and {TRAIN_DIR}/ inside)",
            hint="pass a tokens artifact made by `llmctl tokenize`",
        )
    tok = load_tokenizer(tok_dir)
    mc, shape_source = model_config_for(cfg, tok.vocab_size, job.init_path)
    note(f"pretrain: model {shape_source}, vocab_size {tok.vocab_size:,} from the tokenizer")
    if cfg.seq_len > mc.max_seq_len:
        raise ConfigError(
            f"pretrain.seq_len ({cfg.seq_len}) is longer than the model's context (max_seq_len {mc.max_seq_len})",
            hint=f"set pretrain.seq_len={mc.max_seq_len}"
            + ("" if job.init_path else f" or pretrain.model.max_seq_len={cfg.seq_len}"),
        )
    accum = grad_accum_steps(cfg, info.world_size)
    max_steps, horizon_source = horizon(cfg, mc)
    lr = cfg.optimizer.lr or suggested_lr(mc)
    note(
        f"pretrain: {num_params(mc):,} params, grad_accum {accum}, {max_steps:,} steps ({horizon_source}), "
        f"lr {lr:.2e}{'' if cfg.optimizer.lr else ' (suggested_lr)'}, {info.world_size} process(es) on "
        f"{info.device}, {dtype}"
    )

    # -- data: random windows of the train shards; the first val windows for validation
    loader = TokenLoader(
        data_dir / TRAIN_DIR,
        batch_size=cfg.micro_batch_size,
        seq_len=cfg.seq_len,
        mode="random",
        seed=cfg.seed,
        rank=info.rank,
        world_size=info.world_size,
    )
    if loader.vocab_size != tok.vocab_size:
        raise InputError(
            f"{data_dir / TRAIN_DIR}: shards were written for vocab_size {loader.vocab_size:,}, "
            f"the tokenizer has {tok.vocab_size:,}",
            hint="re-run `llmctl tokenize`",
        )
    val_dir = data_dir / VAL_DIR
    val_tokens = sum(len(TokenShard(p)) for p in list_shards(val_dir)) if val_dir.is_dir() else 0
    eval_batch = min(cfg.micro_batch_size, max(0, val_tokens - 1) // cfg.seq_len // info.world_size)
    validate = None
    if eval_batch:
        validate = token_validation(
            val_dir,
            batch_size=eval_batch,
            seq_len=cfg.seq_len,
            max_batches=max(1, cfg.eval_batches // info.world_size),
            token_bytes=token_byte_lengths(tok),
            info=info,
        )
    else:
        reporter.warn(
            f"the val split is too small for one {cfg.seq_len}-token window per process; no val loss"
        )

    # -- model and optimizer
    torch.manual_seed(cfg.seed)
    if job.init_path is not None:
        model, _ = load_model_folder(job.init_path, device=info.device, dtype=torch.float32)
    else:
        with torch.device(info.device):
            model = Transformer(mc)
    model = prepare_model(model, cfg, info)
    sharded = cfg.strategy == "fsdp" and info.distributed
    optimizer = make_optimizer(model, cfg.optimizer, lr=lr, device=info.device, sharded=sharded)

    # -- train
    trainer = Trainer(
        stage="pretrain",
        cfg=cfg,
        model=model,
        optimizer=optimizer,
        source=loader,
        loss_fn=next_token_loss(info.device),
        info=info,
        max_steps=max_steps,
        grad_accum=accum,
        lr=lr,
        run_dir=Path(job.run_dir),
        model_config=mc,
        reporter=reporter,
        dtype=dtype,
        validate=validate,
        flops_per_token=flops_per_token(mc, cfg.seq_len),
        project=job.project,
    )
    fit = trainer.fit(resume=job.resumed)
    metrics = {"val_loss": None, "val_bpb": None, **fit.metrics, "params": num_params(mc)}
    return TrainResult(mc, tok, fit.model_state, metrics)
