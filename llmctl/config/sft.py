"""The `sft:` section of llmctl.yaml: supervised fine-tuning on chat data.

    sft:
      data:
        sources:
          - path: data/chat.jsonl                     # local JSONL (plain, .gz, .zst) or parquet
          - path: hf://datasets/HuggingFaceH4/ultrachat_200k
            split: train_sft
            limit: 20000
        on_error: error
        val_fraction: 0.05                            # or val_sources: [...]

Chat sources live here rather than under the pretraining `data.sources`: they hold conversations
(`messages`, or `prompt`/`completion` pairs), not documents. `llmctl.data.chat` reads them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmctl.config.base import Section
from llmctl.config.data import RecordDataConfig, SourceLocation
from llmctl.config.training import TrainingConfig

DEFAULT_VAL_FRACTION = 0.05


class ChatSourceConfig(SourceLocation):
    """One chat data input: local files or a Hugging Face hub dataset."""

    format: Literal["auto", "jsonl", "parquet"] = Field(
        "auto",
        description="File format. 'auto' picks it from the extension: .jsonl/.jsonl.gz/.jsonl.zst -> jsonl, "
        ".parquet -> parquet.",
    )
    messages_key: str = Field(
        "messages",
        description="Field (JSONL key or parquet column) holding the conversation as a list of "
        "{role, content} messages. Records without it are read as {prompt, completion} pairs.",
    )


class ChatDataConfig(RecordDataConfig):
    """The conversations a chat model is fine-tuned on, and the ones its val loss is measured on."""

    sources: list[ChatSourceConfig] = Field(
        min_length=1, description="Inputs, read in order; their conversations are concatenated."
    )
    on_error: Literal["error", "skip"] = Field(
        "error",
        description="What to do with a malformed conversation (bad JSON, unknown role, no assistant turn, "
        "empty assistant message, ...): 'error' stops with file:line, 'skip' drops and counts it by reason.",
    )
    val_fraction: float = Field(
        DEFAULT_VAL_FRACTION,
        ge=0.0,
        lt=0.5,
        description="Share of the conversations held out for val loss, chosen by a hash of each "
        "conversation's messages (identical conversations land on the same side). Ignored with val_sources.",
    )
    val_sources: list[ChatSourceConfig] | None = Field(
        None,
        min_length=1,
        description="Separate val conversations; when set, every conversation of `sources` is trained on.",
    )


class LoraConfig(Section):
    """Low-rank adapters instead of full fine-tuning (llmctl.model.lora)."""

    enabled: bool = Field(False, description="Train LoRA adapters (the base weights stay frozen).")
    rank: int = Field(16, ge=1, description="Adapter rank r.")
    alpha: float = Field(32.0, gt=0, description="Scale numerator: the update is (alpha / r) B A.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Linear layers to adapt, by the last part of their name.",
    )


class SftConfig(TrainingConfig):
    """Supervised fine-tuning of a model on conversations: a chat model (full or LoRA)."""

    data: ChatDataConfig | None = Field(
        None, description="Chat data: sources, what to do with malformed records, the val split."
    )
    model: str | None = Field(
        None,
        description="Model artifact to fine-tune (e.g. 'pretrain:latest', 'import:latest', a path); "
        "null = the newest model made before sft in pipeline order.",
    )
    seq_len: int | None = Field(
        None,
        ge=8,
        description="Tokens per training row; null = the base model's pretraining seq_len when its "
        "manifest has one, else min(max_seq_len, 2048).",
    )
    micro_batch_size: int = Field(8, ge=1, description="Rows per forward/backward pass on each device.")
    batch_size: int = Field(
        16,
        ge=1,
        description="Rows per optimizer step over all processes; grad_accum = batch_size / "
        "(micro_batch_size * world_size) must be an integer.",
    )
    epochs: float | None = Field(
        None,
        gt=0,
        description="Horizon in passes over the training rows (default 3 when no horizon is set); "
        "max_steps, when set, wins (as in HF Trainer).",
    )
    max_steps: int | None = Field(
        None,
        ge=1,
        description="Horizon in optimizer steps; overrides epochs (`--set sft.max_steps=20` for a quick run).",
    )
    packing: Literal["packed", "padded"] = Field(
        "packed",
        description="packed: several conversations per row, no attention across them (positions restart); "
        "padded: one conversation per row, padded to the longest in the micro-batch.",
    )
    assistant_turns: Literal["all", "last"] = Field(
        "all", description="Which assistant turns carry loss: all of them, or only the last."
    )
    train_on_prompt: bool = Field(
        False, description="Also train on system/user tokens (loss on the whole conversation)."
    )
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="A conversation longer than seq_len is cut to seq_len, or dropped (counted)."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters (off: full fine-tuning).")
    eval_every: int = Field(50, ge=0, description="Val loss every N steps (and at the end); 0 = end only.")
    checkpoint_every: int = Field(
        50, ge=0, description="Save a resumable checkpoint every N steps; 0 = only on interrupt."
    )
    log_every: int = Field(5, ge=1, description="Write a metrics.jsonl line every N steps.")
