"""The `eval:` section of llmctl.yaml: which tasks to score a model on, and how.

eval:
  tasks: [perplexity, world_mc, arc_easy]
  limit: 500
  shots: {mmlu: 5}
  custom:
    - {name: capitals, path: evals/capitals.jsonl, type: multiple_choice}
    - {name: support_faq, path: evals/faq.jsonl, type: chat}
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from llmctl.config.base import Section


class CustomTask(Section):
    """A task read from a JSONL file: multiple-choice rows {query, choices, gold}, generative rows
    {prompt, answer, match: exact|regex, pattern}, or chat rows {prompt, answer (or a list), system}."""

    name: str = Field(description="Task name used on the command line and in results (e.g. `capitals`).")
    path: str = Field(description="JSONL file, relative to the project folder.")
    type: Literal["multiple_choice", "generative", "chat"] = Field(
        description="multiple_choice: score each choice as a continuation of query; generative: "
        "greedy generation compared with answer; chat: the prompt asked as a user turn in the model's "
        "chat template, greedy generation until its end-of-turn token, exact match and contains."
    )
    until: list[str] = Field(
        default_factory=lambda: ["\n"],
        description="Generative only: stop generating at the first of these strings (chat tasks stop at "
        "the model's end-of-turn token).",
    )


class EvalConfig(Section):
    """How `llmctl eval` scores a model."""

    tasks: list[str] = Field(
        default_factory=lambda: ["perplexity", "world_mc"],
        description="Tasks to run: built-ins (mmlu, hellaswag, arc_easy, arc_challenge, piqa, winogrande, "
        "lambada, gsm8k, perplexity, world_mc, world_chat) or names of `custom` tasks.",
    )
    limit: int | None = Field(
        default=None, ge=1, description="Score at most this many items per task (perplexity: val windows)."
    )
    shots: dict[str, int] = Field(
        default_factory=dict,
        description="Few-shot examples per task, e.g. {mmlu: 5}; unlisted tasks use lm-eval's default "
        "(gsm8k 5, others 0).",
    )
    batch_size: int = Field(
        default=16, ge=1, description="Prompts per generation batch, and windows per perplexity forward."
    )
    batch_tokens: int = Field(
        default=4096,
        ge=1,
        description="Scoring (log-likelihood) batches: at most this many tokens, padding included, per "
        "forward pass; contexts shared by several choices count once. Lower it if memory runs out.",
    )
    data_dir: str | None = Field(
        default=None,
        description="Folder with benchmark files (hub parquet/JSONL or original-release layout); "
        "unset: download from the Hugging Face Hub (cached).",
    )
    custom: list[CustomTask] = Field(default_factory=list, description="Tasks defined by local JSONL files.")
    samples_to_keep: int = Field(
        default=20,
        ge=0,
        description="Rendered prompts and model answers kept per task in samples/<task>.jsonl.",
    )
    log_samples: bool = Field(
        default=False,
        description="Keep every item in samples/<task>.jsonl (lm-eval's --log_samples), not only the "
        "first samples_to_keep.",
    )
    seed: int = Field(default=1234, description="Seed of few-shot sampling (lm-eval's default is 1234).")
    max_gen_tokens: int = Field(
        default=256, ge=1, description="Most tokens generated per answer (lm-eval: 256)."
    )
    chat_max_gen_tokens: int = Field(
        default=32,
        ge=1,
        description="Most tokens generated per answer in chat tasks (world_chat, type: chat).",
    )
    base: bool = Field(
        default=True,
        description="Chat tasks also score the evaluated model's base model (the `model` input its "
        "manifest records, e.g. where sft started) with the same prompts, as base_* metrics beside "
        "the model's. `--no-base` turns it off for one run.",
    )
    world_seed: int | None = Field(
        default=None,
        description="Seed of the synthetic world for world_mc (and world_chat without data/chat_eval.jsonl); "
        "unset: the seed in data/truth.json, else 0.",
    )
    world_items: int = Field(
        default=150, ge=1, description="Number of world_mc items (the default world has 186 facts)."
    )
    decontaminate: bool = Field(
        default=False,
        description="Check every item against the model's training documents (found through lineage: "
        "its pretraining corpus artifact and post-training data files) by 13-gram overlap, and report "
        "per task the items found and the scores on the clean rest. `--decontaminate` for one run.",
    )
    model: str | None = Field(
        default=None,
        description="Model to evaluate (e.g. 'import:latest'); null = the newest model in pipeline order "
        "(the last training stage that has one; `import` counts as before the pipeline).",
    )

    @model_validator(mode="after")
    def _unique_custom_names(self) -> EvalConfig:
        names = [c.name for c in self.custom]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"custom task names must be unique: {', '.join(dupes)}")
        return self
