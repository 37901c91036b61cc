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

from pydantic import Field, model_validator

from llmctl.config.base import Section
from llmctl.config.training import TrainingConfig

# The `tiny` CPU template: ~3-4 minutes on 2 cores (200 steps x 2048 tokens at ~2k tokens/s).
DEFAULT_MAX_STEPS = 200


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


class PretrainConfig(TrainingConfig):
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
    eval_batches: int = Field(
        8,
        ge=1,
        description="Validation micro-batches per evaluation, over all processes (each of W processes "
        "takes eval_batches // W), so the val loss does not depend on the process count.",
    )

    @model_validator(mode="after")
    def _one_horizon(self) -> PretrainConfig:
        given = [n for n in ("max_steps", "max_tokens", "tokens_per_param") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(
                f"set exactly one of max_steps, max_tokens, tokens_per_param (got {', '.join(given)})"
            )
        return self
