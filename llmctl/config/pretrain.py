"""The `pretrain:` section of llmctl.yaml: model shape, batch, horizon, optimizer and schedule, checks.

    pretrain:
      model:
        preset: tiny                # or `depth: 8` (derives width, heads, MLP; see from_depth)
      seq_len: 256
      micro_batch_size: 8
      batch_tokens: 2048            # global batch; grad accumulation is derived from it
      max_steps: 200                # or max_tokens, or tokens_per_param (exactly one)
      optimizer:
        lr: null                    # null: llmctl.model.config.suggested_lr of the model
        schedule: cosine            # or wsd

Derived values (documented where they are computed, in llmctl/stages/pretrain.py):
- vocab_size always comes from the tokenizer of the input tokens artifact;
- grad_accum = batch_tokens / (micro_batch_size * seq_len * world_size), which must be an integer;
- max_steps from max_tokens or tokens_per_param (x model params) / batch_tokens, rounded up.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from llmctl.config.base import Section

# The `tiny` CPU template: ~3-4 minutes on 2 cores (200 steps x 2048 tokens at ~2k tokens/s).
DEFAULT_MAX_STEPS = 200
NO_DECAY_CHOICES = ("norms", "biases", "embeddings")


class ModelShape(Section):
    """The model to train: a named preset or the depth dial, plus optional overrides."""

    preset: str = Field(
        "tiny",
        description="Named shape from llmctl.model.config.PRESETS (test-1m, tiny, gpt2-small, 350m, 1b); "
        "ignored when `depth` is set.",
    )
    depth: int | None = Field(
        None,
        ge=1,
        description="nanochat-style single dial: n_layer = depth, n_embd = 64 * depth, heads of 64/128, "
        "SwiGLU 8/3 * n_embd (llmctl.model.config.from_depth). Overrides `preset`.",
    )
    n_layer: int | None = Field(None, ge=1, description="Override: number of transformer blocks.")
    n_head: int | None = Field(None, ge=1, description="Override: number of attention heads.")
    n_kv_head: int | None = Field(None, ge=1, description="Override: key/value heads (GQA); divides n_head.")
    n_embd: int | None = Field(None, ge=1, description="Override: residual stream width.")
    intermediate_size: int | None = Field(None, ge=1, description="Override: SwiGLU hidden width.")
    max_seq_len: int | None = Field(
        None, ge=1, description="Override: the model's context length (rotary table size); >= seq_len."
    )
    tie_embeddings: bool | None = Field(
        None, description="Override: share the input embedding and output head."
    )

    def overrides(self) -> dict[str, int | bool]:
        """The shape fields set explicitly (passed to preset()/from_depth())."""
        names = (
            "n_layer",
            "n_head",
            "n_kv_head",
            "n_embd",
            "intermediate_size",
            "max_seq_len",
            "tie_embeddings",
        )
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


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
        "auto", description="Fused AdamW kernel: auto = on CUDA, off on CPU (where it is not faster)."
    )
    schedule: Literal["cosine", "wsd"] = Field(
        "cosine",
        description="cosine: linear warmup then cosine decay to min_lr_ratio * lr. wsd: warmup, constant, "
        "then linear decay to min_lr_ratio * lr over the last decay_fraction of steps.",
    )
    warmup_steps: int = Field(
        20, ge=0, description="Linear warmup steps from 0 to lr (capped at the horizon)."
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of lr.")
    decay_fraction: float = Field(
        0.2, gt=0, le=1, description="wsd only: fraction of the steps spent decaying at the end."
    )


class PretrainConfig(Section):
    """Pretrain a transformer on a tokens artifact; publishes an HF-compatible model folder."""

    model: ModelShape = Field(default_factory=ModelShape, description="Model shape (preset or depth dial).")
    init: str | None = Field(
        None,
        description="Model artifact to continue pretraining from (e.g. 'import:latest'); null = random init. "
        "Its shape replaces `model`, and its vocabulary must match the tokenizer.",
    )
    seq_len: int = Field(256, ge=1, description="Training sequence length in tokens (<= model max_seq_len).")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per forward/backward pass on each device.")
    batch_tokens: int = Field(
        2048,
        ge=1,
        description="Global batch in tokens per optimizer step; must equal micro_batch_size * seq_len * "
        "world_size * grad_accum for an integer grad_accum.",
    )
    max_steps: int | None = Field(
        None,
        ge=1,
        description=f"Horizon in optimizer steps (default {DEFAULT_MAX_STEPS} when no horizon is set).",
    )
    max_tokens: int | None = Field(
        None, ge=1, description="Horizon in training tokens (rounded up to whole steps)."
    )
    tokens_per_param: float | None = Field(
        None, gt=0, description="Horizon as tokens per model parameter (Chinchilla: 20)."
    )
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
    eval_batches: int = Field(
        8,
        ge=1,
        description="Validation micro-batches per evaluation, over all processes (each of W processes "
        "takes eval_batches // W), so the val loss does not depend on the process count.",
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

    @model_validator(mode="after")
    def _one_horizon(self) -> PretrainConfig:
        given = [n for n in ("max_steps", "max_tokens", "tokens_per_param") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(
                f"set exactly one of max_steps, max_tokens, tokens_per_param (got {', '.join(given)})"
            )
        return self
