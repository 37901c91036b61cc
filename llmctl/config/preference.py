"""Preference data in llmctl.yaml (`dpo.data`): pairs of a prompt, a chosen and a rejected completion.

    dpo:
      data:
        sources:
          - path: data/preferences.jsonl              # local JSONL (plain, .gz, .zst, .bz2) or parquet
          - path: hf://datasets/HuggingFaceH4/ultrafeedback_binarized
            split: train_prefs
            limit: 20000
        on_error: skip
        val_fraction: 0.05                            # or val_sources: [...]

`llmctl.data.preference` reads them; its docstring lists the record layouts it accepts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmctl.config.data import RecordDataConfig, SourceLocation

DEFAULT_VAL_FRACTION = 0.05


class PreferenceSourceConfig(SourceLocation):
    """One preference data input: local files or a Hugging Face hub dataset."""

    format: Literal["auto", "jsonl", "parquet"] = Field(
        "auto",
        description="File format. 'auto' picks it from the extension: .jsonl/.jsonl.gz/.jsonl.zst -> jsonl, "
        ".parquet -> parquet.",
    )
    prompt_key: str = Field(
        "prompt",
        description="Field holding the prompt: a string (one user turn) or a list of messages. May be "
        "absent when chosen and rejected are whole conversations (the ultrafeedback_binarized layout).",
    )
    chosen_key: str = Field(
        "chosen",
        description="Field holding the preferred completion: a string (one assistant turn), a list of "
        "messages, or the whole conversation ending with the assistant's turn.",
    )
    rejected_key: str = Field(
        "rejected", description="Field holding the dispreferred completion, in the same layout as chosen."
    )


class PreferenceDataConfig(RecordDataConfig):
    """The preference pairs a model is optimised on, and the ones its val metrics are measured on."""

    sources: list[PreferenceSourceConfig] = Field(
        min_length=1, description="Inputs, read in order; their pairs are concatenated."
    )
    on_error: Literal["error", "skip"] = Field(
        "error",
        description="What to do with a malformed pair (bad JSON, missing field, unknown role, chosen equal "
        "to rejected, prompts that differ between chosen and rejected, ...): 'error' stops with "
        "file:line, 'skip' drops and counts it by reason.",
    )
    val_fraction: float = Field(
        DEFAULT_VAL_FRACTION,
        ge=0.0,
        lt=0.5,
        description="Share of the pairs held out for val metrics, chosen by a hash of each pair's prompt "
        "(pairs with the same prompt land on the same side). Ignored with val_sources.",
    )
    val_sources: list[PreferenceSourceConfig] | None = Field(
        None,
        min_length=1,
        description="Separate val pairs; when set, every pair of `sources` is trained on.",
    )
