"""The pretrain stage: train a transformer on a tokens artifact and publish an HF-compatible model.

Top to bottom: setup (tokenizer, model shape, checks, model, optimizer, data, resume) -> loop
(grad accumulation, clipping, schedule, NaN/spike guard, eval, checkpoints) -> save (model folder
with its tokenizer, metrics.jsonl, loss.png).

Inputs: `data`, a tokens artifact (`tokenizer/`, `train/`, `val/` shards; see llmctl.data.encode);
optionally `init`, a model artifact to continue pretraining (its shape replaces `pretrain.model`).

Distributed (see llmctl.train.distributed): under torchrun every rank runs the same CLI command.
Rank 0 comes through the stage runner into `run(ctx)`: it owns the run folder, broadcasts a `Job`
(run folder, input paths, resumed flag) to the other ranks, and alone writes checkpoints, metrics
and the published artifact. Ranks > 0 call `run_worker(config)` instead of the runner: they receive
the `Job`, run the same `train` loop, and return nothing to publish. Every rank evaluates the same
checks on the same inputs, so a bad config fails on all ranks at once rather than hanging.

Resume is exact: a checkpoint holds weights, optimizer state, the data loader position, RNG states
and the guard state at a step boundary, and the schedule is a pure function of the step, so a
resumed run continues with bit-identical losses (tested).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmctl.config.pretrain import DEFAULT_MAX_STEPS, PretrainConfig
from llmctl.data.loader import TokenLoader, val_batches
from llmctl.data.shards import TOKENIZER_DIR, TRAIN_DIR, VAL_DIR, TokenShard, list_shards
from llmctl.data.tokenizer import Tokenizer, load_tokenizer
from llmctl.errors import ConfigError, InputError, Interrupted, StageFailed
from llmctl.model.checkpoint import load_model_folder, read_model_config, save_state_dict_folder
from llmctl.model.config import ModelConfig, flops_per_token, from_depth, num_params, preset, suggested_lr
from llmctl.model.transformer import Transformer
from llmctl.reporting import Reporter
from llmctl.threads import apply_threads, choose_threads
from llmctl.train import distributed as D
from llmctl.train.checkpoint import (
    CHECKPOINTS_DIR,
    load_latest_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from llmctl.train.interrupts import StepBoundaryStop
from llmctl.train.metrics import ExternalLoggers, MetricsWriter, mfu, peak_flops, plot_losses
from llmctl.train.optim import lr_at, make_adamw, param_groups

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
SPIKE_WINDOW = 50  # good losses averaged for the spike test
SPIKE_MIN_HISTORY = 5  # no spike test before this many good steps (early loss falls fast)


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
    save_state_dict_folder(
        result.model_state,
        result.model_config,
        out,
        dtype=torch.float32,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
        generation_config={"eos_token_id": tok.stop_token_ids},
    )
    # The model folder carries its tokenizer: the artifact is self-contained.
    tok.save(out, model_max_length=result.model_config.max_seq_len)
    metrics_path = Path(job.run_dir) / METRICS_FILE
    (out / METRICS_FILE).write_bytes(metrics_path.read_bytes())
    plot_losses(metrics_path, out / LOSS_PLOT, title=f"pretrain {job.project}")
    return result.metrics


def preflight(cfg: PretrainConfig, world_size: int) -> None:
    """Checks that need only the config and the process count: run once before any process starts."""
    grad_accum_steps(cfg, world_size)


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


def token_byte_lengths(tok: Tokenizer) -> torch.Tensor:
    """Bytes of text each id stands for; 0 for special tokens, which bits-per-byte leaves out."""
    specials = set(tok.special_tokens.values())
    return torch.tensor(
        [0 if i in specials else len(tok.token_bytes(i)) for i in range(tok.vocab_size)], dtype=torch.int64
    )


def enable_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block in backward; patching the instance keeps parameter names unchanged."""
    import functools

    from torch.utils.checkpoint import checkpoint

    for block in model.model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    val_dir: Path,
    *,
    batch_size: int,
    seq_len: int,
    max_batches: int,
    token_bytes: torch.Tensor,
    info: D.DistInfo,
    autocast: Any,
) -> tuple[float, float]:
    """(val loss in nats/token, bits per byte) over the first max_batches global batches of val.

    bits/byte = sum of losses on tokens that stand for text / (ln 2 * their bytes): independent of
    the tokenizer, so models with different vocabularies compare (nanochat's bpb).
    """
    module = D.unwrap(model)
    module.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=info.device)  # loss, count, text loss, bytes
    for x, y in val_batches(
        val_dir,
        batch_size=batch_size,
        seq_len=seq_len,
        rank=info.rank,
        world_size=info.world_size,
        max_batches=max_batches,
    ):
        x, y = x.to(info.device), y.to(info.device)
        with autocast():
            losses = module(x, y, reduction="none").double()  # (B, T)
        nbytes = token_bytes[y]
        sums += torch.stack(
            [
                losses.sum(),
                torch.tensor(losses.numel(), device=info.device),
                (losses * (nbytes > 0)).sum(),
                nbytes.sum(),
            ]
        ).to(sums)
    D.all_reduce(sums)
    module.train()
    loss = float(sums[0] / sums[1])
    bpb = float(sums[2] / (math.log(2) * sums[3])) if sums[3] > 0 else float("nan")
    return loss, bpb


def _agreed(flag: bool, info: D.DistInfo) -> bool:
    """True on every rank when any rank's flag is set (one tiny all-reduce when distributed)."""
    if not info.distributed:
        return flag
    return bool(D.all_reduce(torch.tensor([float(flag)], device=info.device))[0] > 0)


# ---- the training loop ---------------------------------------------------------------------------


def train(
    cfg: PretrainConfig,
    job: Job,
    info: D.DistInfo,
    reporter: Reporter,
    note: Any = None,
) -> TrainResult:
    """Setup, loop and final state on every rank; only rank 0 writes files."""
    if not info.is_main:
        reporter = Reporter()
    note = note if (note is not None and info.is_main) else (lambda _msg: None)
    run_dir = Path(job.run_dir)
    data_dir = Path(job.data_path)

    # -- setup: threads and precision
    if info.device == "cpu":
        apply_threads(choose_threads(cfg.threads, processes=info.local_world_size))
    device_type = "cuda" if info.device.startswith("cuda") else "cpu"
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device_type == "cuda" else "fp32")
    if dtype == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "pretrain.dtype is bf16 but this GPU has no bf16 support", hint="set pretrain.dtype=fp32"
        )

    def autocast() -> Any:
        if dtype == "bf16":
            return torch.autocast(device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- setup: tokenizer, model shape, checks
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
    val_windows = max(0, val_tokens - 1) // cfg.seq_len
    eval_batch = min(cfg.micro_batch_size, val_windows // info.world_size)
    if eval_batch == 0:
        reporter.warn(
            f"the val split is too small for one {cfg.seq_len}-token window per process; no val loss"
        )
    token_bytes = token_byte_lengths(tok).to(info.device)

    # -- setup: model and optimizer
    torch.manual_seed(cfg.seed)
    if job.init_path is not None:
        model, _ = load_model_folder(job.init_path, device=info.device, dtype=torch.float32)
        model.train()
    else:
        with torch.device(info.device):
            model = Transformer(mc)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    if cfg.compile:
        model.compile()  # in place: parameter names (and checkpoints) stay unchanged
    model = D.wrap_model(model, cfg.strategy, info)
    opt_cfg = cfg.optimizer
    fused = opt_cfg.fused == "on" or (opt_cfg.fused == "auto" and device_type == "cuda")
    optimizer = make_adamw(
        param_groups(D.unwrap(model), weight_decay=opt_cfg.weight_decay, no_decay=opt_cfg.no_decay),
        lr=lr,
        betas=tuple(opt_cfg.betas),
        eps=opt_cfg.eps,
        fused=fused,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    fpt = flops_per_token(mc, cfg.seq_len)
    peak, device_name = peak_flops(info.device, dtype, threads=torch.get_num_threads())
    peak_total = peak * info.world_size if peak else None

    # -- setup: resume
    step, tokens, train_seconds, timed_steps = 0, 0, 0.0, 0
    recent: deque[float] = deque(maxlen=SPIKE_WINDOW)
    bad_steps = 0
    ckpt_root = run_dir / CHECKPOINTS_DIR
    writer = MetricsWriter(run_dir / METRICS_FILE)
    resumed = (
        load_latest_checkpoint(ckpt_root, lambda msg: reporter.warn(f"pretrain: {msg}"))
        if job.resumed
        else None
    )
    if resumed is not None:
        latest, model_state, optim_state, state = resumed
        D.load_full_state_dicts(model, optimizer, model_state, optim_state)
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        step, tokens = int(state["step"]), int(state["tokens"])
        train_seconds, timed_steps = float(state["train_seconds"]), int(state["timed_steps"])
        recent.extend(state["recent_losses"])
        bad_steps = int(state["bad_steps"])
        if info.is_main:
            writer.truncate_after(step)
        reporter.log(f"pretrain: resumed from {latest.name} ({tokens:,} tokens)")
    elif info.is_main:
        if job.resumed:
            reporter.warn("pretrain: no checkpoint in the run folder; starting from step 0")
        writer.path.unlink(missing_ok=True)
    loggers = (
        ExternalLoggers(
            tensorboard=cfg.tensorboard,
            wandb=cfg.wandb,
            log_dir=run_dir,
            project=job.project,
            config=cfg.model_dump(mode="json"),
        )
        if info.is_main
        else None
    )

    loader_state = loader.state_dict()

    def checkpoint() -> None:
        """Collective under FSDP (state gathering); rank 0 writes."""
        model_state, optim_state = D.full_state_dicts(model, optimizer)
        if info.is_main:
            state = {
                "tokens": tokens,
                "loader": loader_state,
                "rng": rng_state(),
                "train_seconds": train_seconds,
                "timed_steps": timed_steps,
                "recent_losses": list(recent),
                "bad_steps": bad_steps,
                "max_steps": max_steps,
                "lr": lr,
                "world_size": info.world_size,
            }
            save_checkpoint(ckpt_root, step, model_state, mc, optim_state, state, keep=cfg.keep_checkpoints)

    # -- loop
    val_loss = val_bpb = None
    loss_value = float("nan")
    tok_s = 0.0
    first_step = step
    updating = at_boundary = False
    model.train()
    # Ctrl-C / SIGTERM end the loop after a full step; deferred until the checkpoint below is saved.
    stop = StepBoundaryStop().install()
    try:
        with reporter.progress("pretrain", total=max_steps, unit="steps", completed=step) as bar:
            while step < max_steps:
                step_lr = lr_at(
                    step,
                    max_steps,
                    lr,
                    schedule=opt_cfg.schedule,
                    warmup=opt_cfg.warmup_steps,
                    min_lr_ratio=opt_cfg.min_lr_ratio,
                    decay_fraction=opt_cfg.decay_fraction,
                )
                for group in optimizer.param_groups:
                    group["lr"] = step_lr
                t0 = time.perf_counter()
                loss_sum = torch.zeros((), device=info.device)
                for micro in range(accum):
                    x, y = loader.next_batch()
                    x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
                    with D.grad_sync(model, sync=micro == accum - 1), autocast():
                        loss = model(x, y)
                    (loss / accum).backward()
                    loss_sum += loss.detach()
                next_loader_state = loader.state_dict()  # where the next step starts
                loss_t = D.all_reduce(loss_sum / accum, op="mean")
                norm = torch.nn.utils.clip_grad_norm_(
                    params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf
                )
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
                loss_value, norm_value = float(loss_t), float(norm)  # identical on every rank

                # NaN/spike guard: every rank sees the same all-reduced loss, so all skip together.
                spike = (
                    cfg.spike_factor > 0
                    and len(recent) >= SPIKE_MIN_HISTORY
                    and loss_value > cfg.spike_factor * (sum(recent) / len(recent))
                )
                # Step, tokens and data position move in one assignment right after the update, so an
                # interrupt (raised between bytecodes by the CLI's signal handler) saves a consistent state.
                if not math.isfinite(loss_value) or not math.isfinite(norm_value) or spike:
                    optimizer.zero_grad(set_to_none=True)
                    step, tokens, loader_state = step + 1, tokens + cfg.batch_tokens, next_loader_state
                    bad_steps += 1
                    reporter.warn(
                        f"pretrain: step {step} skipped: loss {loss_value:.4g}, grad norm {norm_value:.4g} "
                        f"({bad_steps}/{cfg.max_bad_steps} in a row)"
                    )
                    if bad_steps >= cfg.max_bad_steps:
                        raise StageFailed(
                            f"pretrain: {bad_steps} bad steps in a row (last loss {loss_value:.4g}, "
                            f"grad norm {norm_value:.4g}) at step {step}",
                            hint="lower pretrain.optimizer.lr, keep pretrain.grad_clip on, or check the init "
                            "model's weights; `--resume` restarts from the last good checkpoint",
                        )
                else:
                    updating = True  # an interrupt inside optimizer.step() leaves weights half-updated
                    optimizer.step()
                    step, tokens, loader_state = step + 1, tokens + cfg.batch_tokens, next_loader_state
                    updating = False
                    optimizer.zero_grad(set_to_none=True)
                    bad_steps = 0
                    recent.append(loss_value)
                if device_type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                if step > first_step + 1:  # the first step of a process pays warmup/compile costs
                    train_seconds += dt
                    timed_steps += 1
                tok_s = cfg.batch_tokens / dt
                step_mfu = mfu(fpt, tok_s, peak_total)

                if info.is_main and (step % cfg.log_every == 0 or step == max_steps):
                    row = {
                        "step": step,
                        "tokens": tokens,
                        "loss": loss_value,
                        "lr": step_lr,
                        "grad_norm": norm_value,
                        "tok_s": round(tok_s, 1),
                        "dt_ms": round(dt * 1000, 2),
                        "mfu": None if step_mfu is None else round(step_mfu, 5),
                    }
                    writer.write(row)
                    loggers.log(step, row)
                if eval_batch and ((cfg.eval_every and step % cfg.eval_every == 0) or step == max_steps):
                    val_loss, val_bpb = evaluate(
                        model,
                        val_dir,
                        batch_size=eval_batch,
                        seq_len=cfg.seq_len,
                        max_batches=max(1, cfg.eval_batches // info.world_size),
                        token_bytes=token_bytes,
                        info=info,
                        autocast=autocast,
                    )
                    if info.is_main:
                        row = {"step": step, "tokens": tokens, "val_loss": val_loss, "val_bpb": val_bpb}
                        writer.write(row)
                        loggers.log(step, row)
                        reporter.log(
                            f"pretrain: step {step}: val loss {val_loss:.4f}, {val_bpb:.4f} bits/byte"
                        )
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < max_steps:
                    checkpoint()
                fields = {"loss": round(loss_value, 4), "lr": f"{step_lr:.2e}", "tok_s": round(tok_s)}
                if step_mfu is not None:
                    fields["mfu"] = f"{step_mfu:.1%}"
                bar.update(completed=step, **fields)
                if _agreed(stop.requested, info):  # every rank stops after the same step
                    at_boundary = True
                    raise stop.interrupted()
    except (KeyboardInterrupt, Interrupted):
        # At the step boundary every rank is here with whole weights: save (collective under FSDP).
        # Anywhere else (a KeyboardInterrupt where no handler could be installed: not the main
        # thread) only an unsharded state outside a weight update is whole.
        if updating:
            reporter.warn(
                "pretrain: interrupted during a weight update; --resume continues from the last checkpoint"
            )
        elif at_boundary or cfg.strategy != "fsdp" or not info.distributed:
            reporter.log(f"pretrain: interrupted; saving a checkpoint at step {step}")
            optimizer.zero_grad(set_to_none=True)
            checkpoint()
            reporter.log(f"pretrain: checkpoint saved at step {step}")
        raise
    finally:
        stop.restore()
        if loggers is not None:
            loggers.close()

    # -- final state
    model_state, _ = D.full_state_dicts(model, optimizer)
    avg_tok_s = timed_steps * cfg.batch_tokens / train_seconds if train_seconds > 0 else tok_s
    avg_mfu = mfu(fpt, avg_tok_s, peak_total)
    metrics = {
        "steps": step,
        "tokens": tokens,
        "params": num_params(mc),
        "train_loss": loss_value,
        "val_loss": val_loss,
        "val_bpb": val_bpb,
        "tokens_per_s": round(avg_tok_s, 1),
        "mfu": None if avg_mfu is None else round(avg_mfu, 5),
        "peak_flops": peak_total,
        "device_name": device_name,
        "world_size": info.world_size,
        "grad_accum": accum,
        "lr": lr,
        "dtype": dtype,
        "train_seconds": round(train_seconds, 3),
    }
    return TrainResult(mc, tok, model_state if info.is_main else {}, metrics)
