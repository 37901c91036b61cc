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

from pydantic import Field, field_validator, model_validator

from llmctl.config.base import Section
from llmctl.config.data import HF_DATASETS_PREFIX, HF_PREFIX

DEFAULT_VAL_FRACTION = 0.05


class ChatSourceConfig(Section):
    """One chat data input: local files or a Hugging Face hub dataset."""

    path: str = Field(
        description=(
            "Local file, folder or glob (relative to the project folder), or a hub dataset as "
            "'hf://datasets/<org>/<name>' (optionally '@<revision>' and a glob of files inside the repo)."
        )
    )
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
    subset: str | None = Field(None, description="Hub datasets only: the subset (config name).")
    split: str | None = Field(None, description="Hub datasets only: the split to read, e.g. 'train_sft'.")
    limit: int | None = Field(
        None, ge=1, description="Read at most this many conversations from this source (for quick runs)."
    )

    @field_validator("path")
    @classmethod
    def _path_is_local_or_hub_dataset(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("path must not be empty")
        if v.startswith(HF_PREFIX) and not v.startswith(HF_DATASETS_PREFIX):
            raise ValueError(f"hub paths must look like 'hf://datasets/<org>/<name>', got {v!r}")
        if v.startswith(HF_DATASETS_PREFIX) and len(v[len(HF_DATASETS_PREFIX) :].split("/")) < 2:
            raise ValueError(f"hub paths must name a dataset repo 'hf://datasets/<org>/<name>', got {v!r}")
        return v

    @model_validator(mode="after")
    def _hub_only_fields(self) -> ChatSourceConfig:
        if not self.is_hub and (self.subset is not None or self.split is not None):
            raise ValueError("subset and split only apply to hub sources (path: hf://datasets/<org>/<name>)")
        return self

    @property
    def is_hub(self) -> bool:
        return self.path.startswith(HF_DATASETS_PREFIX)


class ChatDataConfig(Section):
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

    @model_validator(mode="after")
    def _one_way_to_pick_val(self) -> ChatDataConfig:
        if self.val_sources is not None and "val_fraction" in self.model_fields_set and self.val_fraction:
            raise ValueError("give either val_fraction or val_sources, not both")
        return self


class SftConfig(Section):
    """Supervised fine-tuning of a model on conversations."""

    data: ChatDataConfig | None = Field(
        None, description="Chat data: sources, what to do with malformed records, the val split."
    )
