"""Read prompt data sets (the `grpo.data` section) into validated prompts with their records.

    data = load_prompt_data(cfg.grpo.data, project_dir, reporter)
    data.train[0].prompt        # [{"role": "user", "content": "What is the capital of Velmora?"}]
    data.train[0].record        # the whole record, for the verifiers: {"prompt": ..., "answer": "Ostrin"}
    data.summary()              # counts for the manifest: records read, prompts kept, skipped by reason

Accepted records (one JSONL line or one parquet row), with any other fields (`answer`, test cases, ...):

* `{"prompt": "..."}`: one user turn;
* `{"prompt": [messages]}`: messages under `llmctl.data.chat`'s rules (roles, string or text-part
  content), not ending with an assistant turn: the policy writes that turn;
* GSM8K's `{"question": "...", "answer": "... #### 72"}`: `question` is the prompt when the source's
  `prompt_key` is left at "prompt" and a record has none; the answer stays in the record for the
  `math` verifier.

A prompt's id is the record's `id` field when it has one, else where it was read ('file:line').
A record that breaks a rule stops the read with `file:line: what` (InputError, exit 2), or with
`on_error: skip` is dropped and counted by reason. Files are read by `llmctl.data.chat.read_records`,
like chat data and preference pairs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.config.prompts import GSM8K_PROMPT_KEY, PromptDataConfig, PromptSourceConfig
from llmctl.data.chat import (
    BadRecord,
    ChatCounts,
    RecordData,
    RecordKind,
    load_records,
    normalize_messages,
    read_records,
    records_fingerprint,
)
from llmctl.reporting import Reporter

SECTION = "grpo.data"
Messages = list[dict[str, Any]]


@dataclass
class PromptRecord:
    """One validated prompt: its id, its messages, and the whole record it came from (for verifiers)."""

    id: str  # the record's `id`, else `where`
    prompt: Messages  # normalized messages, ending with a user (or system/tool) turn
    record: dict[str, Any] = field(default_factory=dict)  # every field as read: answer, tests, ...
    where: str = ""  # 'file:line' (JSONL) or 'file:row' (parquet), as error messages name it


class PromptCounts(ChatCounts):
    """ChatCounts of a prompt read; what it keeps are prompts, and the manifest says so."""

    def to_json(self) -> dict[str, Any]:
        return {("prompts" if k == "conversations" else k): v for k, v in super().to_json().items()}


@dataclass
class PromptData(RecordData[PromptRecord]):
    """Train and val prompts, with the counts of the reads that made them (PromptCounts)."""


# ---------------------------------------------------------------------------------------------
# public API


def load_prompt_data(cfg: PromptDataConfig, base_dir: Path, reporter: Reporter | None = None) -> PromptData:
    """Read every source, validate every record, and split off val (val_sources, or val_fraction by a
    hash of each prompt's messages). Raises InputError for bad records (on_error=error), a source with
    no prompts, or a split that leaves nothing to train on."""
    return PromptData(
        *load_records(PROMPT_RECORDS, cfg, base_dir, reporter, read_prompts, lambda p: p.prompt, PromptCounts)
    )


def read_prompts(
    sources: Sequence[PromptSourceConfig],
    base_dir: Path,
    on_error: str = "error",
    counts: PromptCounts | None = None,
    reporter: Reporter | None = None,
    key: str = f"{SECTION}.sources",
) -> Iterator[PromptRecord]:
    """Yield the prompts of every source, in order; `counts` is updated as they are read."""
    counts = counts if counts is not None else PromptCounts()
    for where, prompt in read_records(PROMPT_RECORDS, sources, base_dir, on_error, counts, reporter, key):
        prompt.where = where
        if not prompt.id:
            prompt.id = where
        counts.conversations += 1
        yield prompt


def prompt_fingerprint(cfg: PromptDataConfig, base_dir: Path) -> list[dict[str, Any]]:
    """What identifies the prompt data (files by path, size and mtime; hub datasets by revision), so a
    stage that read it can tell when it changed."""
    return records_fingerprint([*cfg.sources, *(cfg.val_sources or [])], base_dir, "prompts")


def normalize_prompt(record: Any, source: PromptSourceConfig | None = None) -> PromptRecord:
    """One record as a PromptRecord (with `where` unset, and `id` empty unless the record has one), or
    BadRecord saying what is wrong."""
    key = _prompt_key(record, source or PromptSourceConfig(path="-"))
    if not isinstance(record, dict):
        raise BadRecord("not_an_object", f"expected a JSON object, got {type(record).__name__}")
    value = record.get(key)
    if value is None:
        present = ", ".join(repr(k) for k, v in record.items() if v is not None) or "none"
        raise BadRecord("no_prompt", f"no {key!r} field (keys present: {present})")
    if isinstance(value, str):
        if not value.strip():
            raise BadRecord("empty_prompt", f"{key!r} is an empty string")
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list) and value:
        messages = normalize_messages(value, key)
        if messages[-1]["role"] == "assistant":
            raise BadRecord(
                "assistant_last",
                f"{key!r} ends with an assistant turn: nothing is left for the policy to say",
            )
    else:
        what = "an empty list" if isinstance(value, list) else f"a {type(value).__name__}"
        raise BadRecord("bad_prompt", f"{key!r} must be a string or a non-empty list of messages, got {what}")
    record_id = record.get("id")
    return PromptRecord(id="" if record_id is None else str(record_id), prompt=messages, record=dict(record))


# ---------------------------------------------------------------------------------------------
# validation


def _prompt_keys(source: PromptSourceConfig) -> tuple[str, ...]:
    """The fields a prompt is read from, in order: the source's prompt_key, then GSM8K's `question`
    when prompt_key is left at its default."""
    default = PromptSourceConfig.model_fields["prompt_key"].default
    return (default, GSM8K_PROMPT_KEY) if source.prompt_key == default else (source.prompt_key,)


def _prompt_key(record: Any, source: PromptSourceConfig) -> str:
    keys = _prompt_keys(source)
    if isinstance(record, dict):
        return next((k for k in keys if record.get(k) is not None), keys[0])
    return keys[0]


def _prompt_columns(columns: list[str], source: PromptSourceConfig) -> tuple[str, str] | None:
    if any(k in columns for k in _prompt_keys(source)):
        return None
    return (
        f"no {' nor '.join(repr(k) for k in _prompt_keys(source))} column",
        "set `prompt_key` on this source to the column holding the prompts",
    )


PROMPT_RECORDS = RecordKind(
    noun="prompt",
    section=SECTION,
    normalize=normalize_prompt,
    check_columns=_prompt_columns,
    needs="each record needs a `prompt` (a string or messages) or a GSM8K `question`",
)
