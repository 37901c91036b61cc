"""What every training stage's section shares: optimizer and schedule, precision, checkpoints,
logging, the NaN/spike guard and where to run. Each training stage's section (`pretrain:`, `sft:`,
...) extends `TrainingConfig` with its own data, model and horizon fields, so the keys below mean
the same thing in every section (see llmctl/train/ for how they are used).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmctl.config.base import Section

NO_DECAY_CHOICES = ("norms", "biases", "embeddings")


class OptimizerConfig(Section):
    """AdamW and its learning-rate schedule."""

    lr: float | None = Field(
        None,
        gt=0,
        description="Peak learning rate; null = suggested_lr(model) (6e-4 * 768 / n_embd, clipped to [1e-4, 3e-3]).",
    )
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas (GPT-3 / nanoGPT: 0.9, 0.95).")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    weight_decay: float = Field(0.1, ge=0, description="Decoupled weight decay of the decayed group.")
    no_decay: list[Literal["norms", "biases", "embeddings"]] = Field(
        default_factory=lambda: list(NO_DECAY_CHOICES),
        description="Parameter kinds excluded from weight decay (norm weights, biases, token embedding; "
        "a tied output head follows the embedding).",
    )
    fused: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Fused AdamW kernel: auto = on (CUDA, and CPU where it measured 3.5x the per-parameter "
        "loop), except FSDP-sharded parameters on CPU.",
    )
    schedule: Literal["cosine", "wsd", "linear", "constant"] = Field(
        "cosine",
        description="cosine: linear warmup then cosine decay to min_lr_ratio * lr. wsd: warmup, constant, "
        "then linear decay to min_lr_ratio * lr over the last decay_fraction of steps. linear: warmup, then "
        "linear decay to min_lr_ratio * lr. constant: warmup, then lr.",
    )
    warmup_steps: int = Field(
        20, ge=0, description="Linear warmup steps from 0 to lr (capped at the horizon)."
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of lr.")
    decay_fraction: float = Field(
        0.2, gt=0, le=1, description="wsd only: fraction of the steps spent decaying at the end."
    )


class TrainingConfig(Section):
    """The training-loop keys shared by every training stage."""

    optimizer: OptimizerConfig = Field(
        default_factory=OptimizerConfig, description="AdamW and the LR schedule."
    )
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this; 0 disables.")
    dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Compute dtype: auto = bf16 autocast on CUDA, fp32 on CPU. Weights stay fp32."
    )
    compile: bool = Field(False, description="torch.compile the model (faster on GPU after a warmup).")
    activation_checkpointing: bool = Field(
        False, description="Recompute each block's activations in backward: less memory, ~30% more compute."
    )
    eval_every: int = Field(
        100, ge=0, description="Validation loss / bits per byte every N steps (and at the end); 0 = end only."
    )
    checkpoint_every: int = Field(
        100, ge=0, description="Save a resumable checkpoint every N steps; 0 = only on interrupt."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Keep the last K checkpoints in the run folder.")
    log_every: int = Field(10, ge=1, description="Write a metrics.jsonl line every N steps.")
    spike_factor: float = Field(
        5.0,
        ge=0,
        description="Skip a step (and warn) when its loss exceeds this x the mean of recent good losses, or is "
        "NaN/inf; 0 disables the spike test (NaN/inf are always skipped).",
    )
    max_bad_steps: int = Field(5, ge=1, description="Abort after this many consecutive skipped steps.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where to train: auto = CUDA when there is a GPU, else CPU. Multi-process CPU runs "
        "(--gpus N without GPUs) need cpu, set explicitly.",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads per process (unset: the cores available to this process, split among "
        "the processes on this node; never more than the cores).",
    )
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="Multi-process wrapping: ddp, fsdp (FSDP2 fully_shard), auto = ddp."
    )
    tensorboard: bool = Field(False, description="Also log scalars to TensorBoard (run folder/tensorboard).")
    wandb: bool = Field(False, description="Also log to Weights & Biases (project = llmctl project name).")
    seed: int = Field(1337, description="Seed for weight init and data order.")
