"""One training loop for every training stage: a batch source and a loss function in, a trained
model and its metrics out.

    trainer = Trainer(
        stage="pretrain", cfg=cfg, model=model, optimizer=optimizer, info=info,
        source=loader,                      # next_batch(), state_dict(), load_state_dict()
        loss_fn=next_token_loss(info.device),  # (model, batch) -> LossOutput
        max_steps=200, grad_accum=2, lr=1e-3, run_dir=run_dir, model_config=mc, reporter=reporter,
        validate=lambda model: {"val_loss": ...},   # optional; runs every cfg.eval_every steps and at the end
    )
    result = trainer.fit(resume=True)       # result.model_state (rank 0), result.metrics

A stage is a recipe: build the model, the batch source and the loss function, call `fit`, publish.
Everything else lives here and behaves the same for every stage:

- One optimizer step = `grad_accum` micro-batches on each of `world_size` processes. The loss
  function returns the loss *summed* over its units (label tokens, preference pairs) and how many
  units that was; the step divides the accumulated gradients by the units of the whole global
  batch, so micro-batches with different numbers of label tokens (padding, masked prompts) weigh
  what their tokens weigh, on any number of processes.
- Learning-rate schedule as a pure function of the step; gradient clipping; the NaN/spike guard
  (llmctl.train.guard); bf16 autocast (llmctl.train.precision).
- Checkpoints every `checkpoint_every` steps and on Ctrl-C/SIGTERM at a step boundary
  (llmctl.train.interrupts); `fit(resume=True)` continues from the newest one bit-exactly: the
  checkpoint holds weights, optimizer, the batch source's position, RNG states and the guard.
- metrics.jsonl (step, tokens, loss, lr, grad norm, tokens/s, MFU), TensorBoard/W&B when enabled,
  live progress.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from llmctl.config.training import TrainingConfig
from llmctl.errors import Interrupted, StageFailed
from llmctl.model.config import ModelConfig
from llmctl.reporting import Reporter
from llmctl.train import distributed as D
from llmctl.train.checkpoint import CHECKPOINTS_DIR, Checkpointer, rng_state, set_rng_state
from llmctl.train.guard import LossGuard
from llmctl.train.interrupts import StepBoundaryStop
from llmctl.train.metrics import ExternalLoggers, MetricsWriter, mfu, peak_flops
from llmctl.train.optim import lr_at
from llmctl.train.precision import autocast_factory, device_type

METRICS_FILE = "metrics.jsonl"


class LossOutput(NamedTuple):
    """What a loss function returns for one micro-batch."""

    loss_sum: torch.Tensor  # the loss summed over `units`
    units: torch.Tensor | int  # how many things the loss is an average over (label tokens, pairs)
    tokens: int  # tokens the micro-batch put through the model (for tokens/s and MFU)
    # Metrics summed over the units like the loss (dpo's "rewards/accuracies", ...), or (sum, count)
    # pairs averaged over their own count (grpo's per-token KL): the loop logs their mean over the
    # global batch beside the loss. The same keys in every micro-batch. Read-only.
    stats: dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}


def stat_parts(value: torch.Tensor | tuple[torch.Tensor, torch.Tensor], units: Any) -> torch.Tensor:
    """(sum, count) of a LossOutput stat as one float64 pair; a plain sum counts the loss's units."""
    total, count = value if isinstance(value, tuple) else (value, units)
    return torch.stack(
        [torch.as_tensor(total).detach().double().cpu(), torch.as_tensor(count).double().cpu()]
    )


LossFn = Callable[[nn.Module, Any], LossOutput]


class BatchSource(Protocol):
    """Where micro-batches come from; its state is saved in checkpoints so resume is exact."""

    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """The counters a checkpoint carries besides weights, optimizer and RNG."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0  # time in steps after a process's first (warmup, compile) step
    timed_tokens: int = 0  # tokens of those steps (sft's steps differ in tokens)
    loader: dict[str, Any] = field(default_factory=dict)  # the batch source where the next step starts


@dataclass
class FitResult:
    state: TrainState
    model_state: dict[str, torch.Tensor]  # full fp32 state dict on rank 0; empty on other ranks
    metrics: dict[str, Any]


class Trainer:
    def __init__(
        self,
        *,
        stage: str,
        cfg: TrainingConfig,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        source: BatchSource,
        loss_fn: LossFn,
        info: D.DistInfo,
        max_steps: int,
        grad_accum: int,
        lr: float,
        run_dir: Path,
        model_config: ModelConfig,
        reporter: Reporter,
        dtype: str = "fp32",
        validate: Callable[[nn.Module], dict[str, float]] | None = None,
        flops_per_token: float | None = None,
        project: str = "llmctl",
        progress_stats: dict[str, str] | None = None,
    ):
        self.stage = stage
        self.cfg = cfg
        self.model = model
        self.optimizer = optimizer
        self.source = source
        self.loss_fn = loss_fn
        self.info = info
        self.max_steps = max_steps
        self.grad_accum = grad_accum
        self.lr = lr
        self.run_dir = Path(run_dir)
        self.reporter = reporter if info.is_main else Reporter()
        self.dtype = dtype
        self.autocast = autocast_factory(dtype, info.device)
        self.validate = validate
        self.flops_per_token = flops_per_token
        self.project = project
        self.progress_stats = progress_stats or {}  # stat key -> its name on the live progress line
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.guard = LossGuard(cfg.spike_factor, cfg.max_bad_steps)
        self.checkpointer = Checkpointer(
            self.run_dir / CHECKPOINTS_DIR, model_config, keep=cfg.keep_checkpoints, is_main=info.is_main
        )
        self.metrics_writer = MetricsWriter(self.run_dir / METRICS_FILE)
        self.state = TrainState(loader=source.state_dict())
        self.last_validation: dict[str, float] = {}

    # ---- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Collective under FSDP; rank 0 writes. The state is the one at the last step boundary."""
        state = {
            **asdict(self.state),
            "rng": rng_state(),
            **self.guard.state_dict(),
            "max_steps": self.max_steps,
            "lr": self.lr,
            "world_size": self.info.world_size,
        }
        state.pop("step")  # the checkpoint's own step field
        self.checkpointer.save(self.state.step, self.model, self.optimizer, state)

    def _restore(self, resume: bool) -> None:
        warn = lambda msg: self.reporter.warn(f"{self.stage}: {msg}")  # noqa: E731
        restored = self.checkpointer.restore(self.model, self.optimizer, warn) if resume else None
        if restored is None:
            if self.info.is_main:
                if resume:
                    self.reporter.warn(f"{self.stage}: no checkpoint in the run folder; starting from step 0")
                self.metrics_writer.path.unlink(missing_ok=True)
            return
        path, saved = restored
        self.source.load_state_dict(saved["loader"])
        set_rng_state(saved["rng"])
        self.guard.load_state_dict(saved)
        self.state = TrainState(
            step=int(saved["step"]),
            tokens=int(saved["tokens"]),
            train_seconds=float(saved["train_seconds"]),
            timed_tokens=int(saved.get("timed_tokens", 0)),
            loader=saved["loader"],
        )
        if self.info.is_main:
            self.metrics_writer.truncate_after(self.state.step)
        self.reporter.log(f"{self.stage}: resumed from {path.name} ({self.state.tokens:,} tokens)")

    # ---- one step ----------------------------------------------------------------------------------

    def _accumulate(self) -> tuple[float, float, int, dict[str, float]]:
        """Forward/backward over this step's micro-batches; gradients scaled to the global mean.
        Returns (mean loss over the global batch, grad norm before clipping, tokens in the global
        batch, the loss function's stats as means over the global batch's units)."""
        info = self.info
        totals = torch.zeros(3, dtype=torch.float64, device=info.device)  # loss sum, units, tokens
        stat_sums: dict[str, torch.Tensor] = {}
        for micro in range(self.grad_accum):
            batch = self.source.next_batch()
            with D.grad_sync(self.model, sync=micro == self.grad_accum - 1), self.autocast():
                out = self.loss_fn(self.model, batch)
            out.loss_sum.backward()
            totals[0] += out.loss_sum.detach().double()
            totals[1] += out.units
            totals[2] += out.tokens
            for key, value in out.stats.items():
                stat_sums[key] = stat_sums.get(key, 0.0) + stat_parts(value, out.units)
        if stat_sums:  # one all-reduce for the totals and the stats together
            totals = torch.cat([totals, torch.cat(list(stat_sums.values())).to(totals)])
        D.all_reduce(totals)
        loss_sum, units, tokens = (float(v) for v in totals[:3])
        pairs = totals[3:].view(-1, 2).tolist()
        stats = {k: (s / c if c else float("nan")) for k, (s, c) in zip(stat_sums, pairs, strict=True)}
        # DDP and FSDP average gradients over processes; scale them to sum / units of the global batch.
        scale = info.world_size / max(units, 1.0)
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads and not hasattr(grads[0], "full_tensor"):
            torch._foreach_mul_(grads, scale)  # one call, not one per parameter
        else:  # FSDP's DTensor gradients
            for g in grads:
                g.mul_(scale)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return loss_sum / max(units, 1.0), float(norm), int(tokens), stats

    def _log(self, row: dict[str, Any], loggers: ExternalLoggers | None) -> None:
        if self.info.is_main:
            self.metrics_writer.write(row)
            if loggers is not None:
                loggers.log(row["step"], row)

    def _run_validation(self, loggers: ExternalLoggers | None) -> None:
        module = D.unwrap(self.model)
        module.eval()
        with torch.no_grad(), self.autocast():
            values = self.validate(self.model)
        module.train()
        self.last_validation = values
        self._log({"step": self.state.step, "tokens": self.state.tokens, **values}, loggers)
        shown = ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in values.items() if v is not None)
        self.reporter.log(f"{self.stage}: step {self.state.step}: {shown}")

    # ---- the loop ----------------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> FitResult:
        cfg, info, opt_cfg = self.cfg, self.info, self.cfg.optimizer
        self._restore(resume)
        peak, device_name = peak_flops(info.device, self.dtype, threads=torch.get_num_threads())
        peak_total = peak * info.world_size if peak else None
        loggers = (
            ExternalLoggers(
                tensorboard=cfg.tensorboard,
                wandb=cfg.wandb,
                log_dir=self.run_dir,
                project=self.project,
                config=cfg.model_dump(mode="json"),
                section=self.stage,
            )
            if info.is_main
            else None
        )
        loss_value, tok_s, tokens_per_step, stats = float("nan"), 0.0, 0, {}
        first_step = self.state.step
        updating = at_boundary = False
        self.model.train()
        # Ctrl-C / SIGTERM end the loop after a full step; deferred until the checkpoint below is saved.
        stop = StepBoundaryStop().install()
        try:
            with self.reporter.progress(
                self.stage, total=self.max_steps, unit="steps", completed=self.state.step
            ) as bar:
                while self.state.step < self.max_steps:
                    step_lr = lr_at(
                        self.state.step,
                        self.max_steps,
                        self.lr,
                        schedule=opt_cfg.schedule,
                        warmup=opt_cfg.warmup_steps,
                        min_lr_ratio=opt_cfg.min_lr_ratio,
                        decay_fraction=opt_cfg.decay_fraction,
                    )
                    for group in self.optimizer.param_groups:
                        group["lr"] = step_lr
                    t0 = time.perf_counter()
                    loss_value, norm_value, tokens_per_step, stats = self._accumulate()
                    # What the batch source measured making this step's data (rollouts: rewards, time).
                    stats = {
                        **stats,
                        **(self.source.pop_stats() if hasattr(self.source, "pop_stats") else {}),
                    }
                    next_loader = self.source.state_dict()  # where the next step starts
                    skipped = self.guard.is_bad(loss_value, norm_value)  # same on every rank
                    if not skipped:
                        updating = True  # an interrupt inside optimizer.step() leaves weights half-updated
                        self.optimizer.step()
                    # Step, tokens and data position move in one assignment right after the update, so
                    # the state a checkpoint saves is always that of a step boundary.
                    s = self.state
                    s.step, s.tokens, s.loader = s.step + 1, s.tokens + tokens_per_step, next_loader
                    updating = False
                    self.optimizer.zero_grad(set_to_none=True)
                    self.guard.record(loss_value, skipped)
                    if skipped:
                        self._report_bad_step(loss_value, norm_value)
                    if device_type(info.device) == "cuda":
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                    if s.step > first_step + 1:  # the first step of a process pays warmup/compile costs
                        s.train_seconds += dt
                        s.timed_tokens += tokens_per_step
                    tok_s = tokens_per_step / dt
                    step_mfu = mfu(self.flops_per_token, tok_s, peak_total) if self.flops_per_token else None
                    if s.step % cfg.log_every == 0 or s.step == self.max_steps:
                        row = {
                            "step": s.step,
                            "tokens": s.tokens,
                            "loss": loss_value,
                            "lr": step_lr,
                            "grad_norm": norm_value,
                            "tok_s": round(tok_s, 1),
                            "dt_ms": round(dt * 1000, 2),
                            "mfu": None if step_mfu is None else round(step_mfu, 5),
                            **stats,
                        }
                        self._log(row, loggers)
                    if self.validate is not None and (
                        (cfg.eval_every and s.step % cfg.eval_every == 0) or s.step == self.max_steps
                    ):
                        self._run_validation(loggers)
                    if (
                        cfg.checkpoint_every
                        and s.step % cfg.checkpoint_every == 0
                        and s.step < self.max_steps
                    ):
                        self.save_checkpoint()
                    fields = {"loss": round(loss_value, 4), "lr": f"{step_lr:.2e}", "tok_s": round(tok_s)}
                    fields.update(
                        (label, round(stats[key], 3))
                        for key, label in self.progress_stats.items()
                        if key in stats
                    )
                    if step_mfu is not None:
                        fields["mfu"] = f"{step_mfu:.1%}"
                    bar.update(completed=s.step, **fields)
                    if _agreed(stop.requested, info):  # every rank stops after the same step
                        at_boundary = True
                        raise stop.interrupted()
        except (KeyboardInterrupt, Interrupted):
            # At the step boundary every rank is here with whole weights: save (collective under FSDP).
            # Anywhere else (a KeyboardInterrupt where no handler could be installed: not the main
            # thread) only an unsharded state outside a weight update is whole.
            if updating:
                self.reporter.warn(
                    f"{self.stage}: interrupted during a weight update; --resume continues from the last checkpoint"
                )
            elif at_boundary or cfg.strategy != "fsdp" or not info.distributed:
                self.reporter.log(f"{self.stage}: interrupted; saving a checkpoint at step {self.state.step}")
                self.optimizer.zero_grad(set_to_none=True)
                self.save_checkpoint()
                self.reporter.log(f"{self.stage}: checkpoint saved at step {self.state.step}")
            raise
        finally:
            stop.restore()
            if loggers is not None:
                loggers.close()

        model_state, _ = D.full_state_dicts(self.model, self.optimizer)
        s = self.state
        avg_tok_s = s.timed_tokens / s.train_seconds if s.train_seconds > 0 else tok_s
        avg_mfu = mfu(self.flops_per_token, avg_tok_s, peak_total) if self.flops_per_token else None
        metrics = {
            "steps": s.step,
            "tokens": s.tokens,
            "train_loss": loss_value,
            **{f"train_{k}": v for k, v in stats.items()},
            **self.last_validation,
            "tokens_per_s": round(avg_tok_s, 1),
            "mfu": None if avg_mfu is None else round(avg_mfu, 5),
            "peak_flops": peak_total,
            "device_name": device_name,
            "world_size": info.world_size,
            "grad_accum": self.grad_accum,
            "lr": self.lr,
            "dtype": self.dtype,
            "train_seconds": round(s.train_seconds, 3),
        }
        return FitResult(s, model_state if info.is_main else {}, metrics)

    def _report_bad_step(self, loss: float, norm: float) -> None:
        guard = self.guard
        self.reporter.warn(
            f"{self.stage}: step {self.state.step} skipped: loss {loss:.4g}, grad norm {norm:.4g} "
            f"({guard.bad_steps}/{guard.max_bad_steps} in a row)"
        )
        if guard.exhausted:
            raise StageFailed(
                f"{self.stage}: {guard.bad_steps} bad steps in a row (last loss {loss:.4g}, "
                f"grad norm {norm:.4g}) at step {self.state.step}",
                hint=f"lower {self.stage}.optimizer.lr, keep {self.stage}.grad_clip on, or check the init "
                "model's weights; `--resume` restarts from the last good checkpoint",
            )


def _agreed(flag: bool, info: D.DistInfo) -> bool:
    """True on every rank when any rank's flag is set (one tiny all-reduce when distributed)."""
    if not info.distributed:
        return flag
    return bool(D.all_reduce(torch.tensor([float(flag)], device=info.device))[0] > 0)
