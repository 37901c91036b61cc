"""Prompt data in llmctl.yaml (`grpo.data`): prompts to sample completions for, with what the verifiers need.

    grpo:
      data:
        sources:
          - path: data/rl_prompts.jsonl               # local JSONL (plain, .gz, .zst, .bz2) or parquet
          - path: hf://datasets/openai/gsm8k           # GSM8K's `question`/`answer` layout works as is
            subset: main
            split: train
        on_error: skip
        val_sources:                                  # or val_fraction: 0.05
          - path: data/rl_eval.jsonl

`llmctl.rl.prompts` reads them; its docstring lists the record layouts it accepts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmctl.config.data import RecordDataConfig, SourceLocation

DEFAULT_VAL_FRACTION = 0.05
GSM8K_PROMPT_KEY = "question"  # read when prompt_key is left at "prompt" and a record has no "prompt"


class PromptSourceConfig(SourceLocation):
    """One prompt data input: local files or a Hugging Face hub dataset."""

    format: Literal["auto", "jsonl", "parquet"] = Field(
        "auto",
        description="File format. 'auto' picks it from the extension: .jsonl/.jsonl.gz/.jsonl.zst -> jsonl, "
        ".parquet -> parquet.",
    )
    prompt_key: str = Field(
        "prompt",
        description="Field holding the prompt: a string (one user turn) or a list of messages not ending "
        "with an assistant turn. Left at 'prompt', records without it are read from 'question' (GSM8K). "
        "Every other field (answer, tests, ...) is kept for the verifiers.",
    )


class PromptDataConfig(RecordDataConfig):
    """The prompts a policy is trained on with verifiable rewards, and the ones it is evaluated on."""

    sources: list[PromptSourceConfig] = Field(
        min_length=1, description="Inputs, read in order; their prompts are concatenated."
    )
    on_error: Literal["error", "skip"] = Field(
        "error",
        description="What to do with a malformed record (bad JSON, no prompt, unknown role, a prompt "
        "ending with an assistant turn, ...): 'error' stops with file:line, 'skip' drops and counts it "
        "by reason.",
    )
    val_fraction: float = Field(
        DEFAULT_VAL_FRACTION,
        ge=0.0,
        lt=0.5,
        description="Share of the prompts held out for evaluation, chosen by a hash of each prompt's "
        "messages (identical prompts land on the same side). Ignored with val_sources.",
    )
    val_sources: list[PromptSourceConfig] | None = Field(
        None,
        min_length=1,
        description="Separate held-out prompts; when set, every prompt of `sources` is trained on.",
    )
