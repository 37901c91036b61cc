"""The `data:` section of llmctl.yaml: where the raw documents come from.

    data:
      sources:
        - path: raw/*.jsonl.gz          # local file, folder or glob, relative to the project folder
        - path: hf://datasets/HuggingFaceFW/fineweb-edu
          subset: sample-10BT
          split: train
          limit: 10000
      on_error: error

`llmctl.data.sources.read_sources` reads it into datatrove `Document`s.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from llmctl.config.base import Section

HF_PREFIX = "hf://"
HF_DATASETS_PREFIX = "hf://datasets/"


class SourceLocation(Section):
    """Where one input lives: local files or a Hugging Face hub dataset (pretraining and chat sources)."""

    path: str = Field(
        description=(
            "Local file, folder or glob (relative to the project folder), or a hub dataset as "
            "'hf://datasets/<org>/<name>' (optionally '@<revision>' and a glob inside the repo)."
        )
    )
    subset: str | None = Field(
        None, description="Hub datasets only: the subset (config name), e.g. 'sample-10BT' for fineweb-edu."
    )
    split: str | None = Field(None, description="Hub datasets only: the split to read, e.g. 'train'.")
    limit: int | None = Field(
        None, ge=1, description="Read at most this many records from this source (for quick runs)."
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
    def _hub_only_fields(self) -> SourceLocation:
        if not self.is_hub and (self.subset is not None or self.split is not None):
            raise ValueError("subset and split only apply to hub sources (path: hf://datasets/<org>/<name>)")
        return self

    @property
    def is_hub(self) -> bool:
        return self.path.startswith(HF_DATASETS_PREFIX)


class SourceConfig(SourceLocation):
    """One input of documents: local files or a Hugging Face hub dataset."""

    format: Literal["auto", "jsonl", "parquet", "text"] = Field(
        "auto",
        description=(
            "File format. 'auto' picks it from the extension: .jsonl/.jsonl.gz/.jsonl.zst/.json.gz -> jsonl, "
            ".parquet -> parquet, .txt -> text (one document per file)."
        ),
    )
    text_key: str = Field(
        "text", description="Field (JSONL key or parquet column) holding the document text."
    )
    id_key: str = Field(
        "id",
        description="Field holding the document id; when absent, ids are '<source file>/<line or row number>'.",
    )


class DataConfig(Section):
    """The raw documents a project starts from."""

    sources: list[SourceConfig] = Field(
        min_length=1, description="Inputs, read in order; their documents are concatenated."
    )
    on_error: Literal["error", "skip"] = Field(
        "error",
        description="What to do with a malformed record (bad JSON, missing or non-string text): "
        "'error' stops with file:line, 'skip' drops and counts it.",
    )


class RecordDataConfig(Section):
    """Base of the sections that read records and split off val data (sft's chat, dpo's pairs, grpo's
    prompts): each declares `sources`, `on_error`, `val_fraction` and `val_sources`; the val split is
    picked one way only."""

    @model_validator(mode="after")
    def _one_way_to_pick_val(self) -> RecordDataConfig:
        fraction_given = "val_fraction" in self.model_fields_set and getattr(self, "val_fraction", 0)
        if getattr(self, "val_sources", None) is not None and fraction_given:
            raise ValueError("give either val_fraction or val_sources, not both")
        return self
