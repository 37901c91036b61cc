"""Read preference data sets (the `dpo.data` section) into validated pairs of prompt, chosen, rejected.

    data = load_preference_data(cfg.dpo.data, project_dir, reporter)
    pair = data.train[0]
    pair.prompt        # [{"role": "user", "content": "What is the capital of Velmora?"}]
    pair.chosen        # [{"role": "assistant", "content": "Its capital is Ostrin."}]
    pair.rejected      # [{"role": "assistant", "content": "Its capital is Barrow."}]
    data.summary()     # counts for the manifest: records read, pairs kept, skipped by reason

Accepted records (one JSON object per JSONL line, or one parquet row; field names set per source):

* strings: `{"prompt": str, "chosen": str, "rejected": str}`: a user turn, and one assistant turn each;
* TRL's conversational layout: `prompt` a list of messages, `chosen` and `rejected` the messages of
  each completion (usually one assistant turn; a string is one assistant turn);
* whole conversations, as `ultrafeedback_binarized` gives them: `chosen` and `rejected` each the
  conversation, ending with the assistant's turn; everything before that turn is the prompt and must
  be identical in both. `prompt` is absent, or a string equal to the conversations' first user turn.

Messages follow `llmctl.data.chat`'s rules (roles, string or text-part content, no empty assistant
turn); each completion must end with an assistant turn, and chosen must differ from rejected. A record
that breaks a rule stops the read with `file:line: what` (InputError, exit 2), or with `on_error: skip`
is dropped and counted by reason. Files are read by `llmctl.data.chat.read_records`, like chat data.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.config.preference import PreferenceDataConfig, PreferenceSourceConfig
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

SECTION = "dpo.data"
Messages = list[dict[str, Any]]


@dataclass
class PreferencePair:
    """One validated pair: the shared prompt and the two completions, as normalized messages."""

    prompt: Messages  # the turns before the completion (typically ending with a user or tool turn)
    chosen: Messages  # the preferred completion (ends with an assistant turn)
    rejected: Messages  # the dispreferred completion (ends with an assistant turn)
    where: str = ""  # 'file:line' (JSONL) or 'file:row' (parquet), as error messages name it
    extra: dict[str, Any] = field(default_factory=dict)  # the record's other fields (id, scores, ...)


class PreferenceCounts(ChatCounts):
    """ChatCounts of a preference read; what it keeps are pairs, and the manifest says so."""

    def to_json(self) -> dict[str, Any]:
        return {("pairs" if k == "conversations" else k): v for k, v in super().to_json().items()}


@dataclass
class PreferenceData(RecordData[PreferencePair]):
    """Train and val pairs, with the counts of the reads that made them (PreferenceCounts)."""


# ---------------------------------------------------------------------------------------------
# public API


def load_preference_data(
    cfg: PreferenceDataConfig, base_dir: Path, reporter: Reporter | None = None
) -> PreferenceData:
    """Read every source, validate every record, and split off val (val_sources, or val_fraction by a
    hash of each pair's prompt, so pairs of one prompt never straddle the split). Raises InputError for
    bad records (on_error=error), a source with no pairs, or a split that leaves nothing to train on."""
    return PreferenceData(
        *load_records(
            PREFERENCE_RECORDS, cfg, base_dir, reporter, read_pairs, lambda p: p.prompt, PreferenceCounts
        )
    )


def read_pairs(
    sources: Sequence[PreferenceSourceConfig],
    base_dir: Path,
    on_error: str = "error",
    counts: PreferenceCounts | None = None,
    reporter: Reporter | None = None,
    key: str = f"{SECTION}.sources",
) -> Iterator[PreferencePair]:
    """Yield the pairs of every source, in order; `counts` is updated as they are read."""
    counts = counts if counts is not None else PreferenceCounts()
    for where, pair in read_records(PREFERENCE_RECORDS, sources, base_dir, on_error, counts, reporter, key):
        pair.where = where
        counts.conversations += 1
        yield pair


def preference_fingerprint(cfg: PreferenceDataConfig, base_dir: Path) -> list[dict[str, Any]]:
    """What identifies the preference data (files by path, size and mtime; hub datasets by revision),
    so a stage that read it can tell when it changed."""
    return records_fingerprint([*cfg.sources, *(cfg.val_sources or [])], base_dir, "preferences")


def normalize_pair(record: Any, source: PreferenceSourceConfig | None = None) -> PreferencePair:
    """One record as a PreferencePair (with `where` unset), or BadRecord saying what is wrong."""
    keys = source or PreferenceSourceConfig(path="-")
    if not isinstance(record, dict):
        raise BadRecord("not_an_object", f"expected a JSON object, got {type(record).__name__}")
    present = ", ".join(repr(k) for k, v in record.items() if v is not None) or "none"
    record = dict(record)
    prompt = _field(record.pop(keys.prompt_key, None), keys.prompt_key)
    chosen = _field(record.pop(keys.chosen_key, None), keys.chosen_key)
    rejected = _field(record.pop(keys.rejected_key, None), keys.rejected_key)
    for name, value in ((keys.chosen_key, chosen), (keys.rejected_key, rejected)):
        if value is None:
            raise BadRecord("missing_field", f"no {name!r} field (keys present: {present})")
        if prompt is None and isinstance(value, str):
            raise BadRecord(
                "missing_field", f"no {keys.prompt_key!r} field, and {name!r} is a string, not a conversation"
            )
    if _whole_conversations(prompt, chosen, rejected):
        prompt_messages, chosen, rejected = _split_conversations(
            chosen, rejected, keys.chosen_key, keys.rejected_key
        )
    else:
        prompt_messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        chosen = _completion(chosen, prompt_messages, keys.chosen_key)
        rejected = _completion(rejected, prompt_messages, keys.rejected_key)
    for name, completion in ((keys.chosen_key, chosen), (keys.rejected_key, rejected)):
        if completion[-1]["role"] != "assistant":
            raise BadRecord(
                "not_assistant_last",
                f"{name!r} ends with a {completion[-1]['role']} turn, not the assistant's",
            )
    if chosen == rejected:
        raise BadRecord("identical_pair", f"{keys.chosen_key!r} and {keys.rejected_key!r} are identical")
    extra = {k: v for k, v in record.items() if v is not None}
    return PreferencePair(prompt_messages, chosen, rejected, extra=extra)


# ---------------------------------------------------------------------------------------------
# validation


def _field(value: Any, name: str) -> str | Messages | None:
    """A field as given: None, a string, or a list of normalized messages."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        what = "an empty list" if isinstance(value, list) else f"a {type(value).__name__}"
        raise BadRecord("bad_field", f"{name!r} must be a string or a non-empty list of messages, got {what}")
    return normalize_messages(value, name)


def _completion(value: str | Messages, prompt: Messages, name: str) -> Messages:
    """A completion as messages; one that repeats the prompt first (a whole conversation given beside
    a prompt list) loses that copy."""
    if isinstance(value, str):
        return normalize_messages([{"role": "assistant", "content": value}], name)
    return value[len(prompt) :] if len(value) > len(prompt) and value[: len(prompt)] == prompt else value


def _first_user_content(messages: Any) -> str | None:
    if not isinstance(messages, list):
        return None
    first = next((m for m in messages if m["role"] != "system"), None)
    return first["content"] if first is not None and first["role"] == "user" else None


def _whole_conversations(prompt: Any, chosen: Any, rejected: Any) -> bool:
    """No prompt, or a prompt string that opens the conversations (ultrafeedback_binarized): chosen and
    rejected hold the prompt too. Otherwise they are completions of `prompt`."""
    if prompt is None:
        return True
    return isinstance(prompt, str) and prompt in (_first_user_content(chosen), _first_user_content(rejected))


def _split_conversations(
    chosen: str | Messages, rejected: str | Messages, chosen_key: str, rejected_key: str
) -> tuple[Messages, Messages, Messages]:
    """(prompt, chosen completion, rejected completion) from two whole conversations: the prompt is
    everything before the last turn, and must be the same in both."""
    for name, value in ((chosen_key, chosen), (rejected_key, rejected)):
        if isinstance(value, str):  # the other one is a conversation that opens with the prompt
            raise BadRecord("prompt_mismatch", f"{name!r} is a string, the other a whole conversation")
        if len(value) < 2:
            raise BadRecord("no_prompt", f"{name!r} is a single turn: nothing before it to be the prompt")
    assert isinstance(chosen, list) and isinstance(rejected, list), (chosen, rejected)
    if chosen[:-1] != rejected[:-1]:
        at = next(
            (i for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1], strict=False)) if a != b),
            min(len(chosen), len(rejected)) - 1,
        )
        raise BadRecord(
            "prompt_mismatch",
            f"{chosen_key!r} and {rejected_key!r} differ before their last turn (at message {at})",
        )
    return chosen[:-1], chosen[-1:], rejected[-1:]


def _pair_columns(columns: list[str], source: PreferenceSourceConfig) -> tuple[str, str] | None:
    missing = [k for k in (source.chosen_key, source.rejected_key) if k not in columns]
    if not missing:
        return None
    return (
        f"no {' nor '.join(repr(k) for k in missing)} column",
        "set `chosen_key`/`rejected_key` on this source to the columns holding the completions",
    )


PREFERENCE_RECORDS = RecordKind(
    noun="preference pair",
    section=SECTION,
    normalize=normalize_pair,
    check_columns=_pair_columns,
    needs="each record needs `chosen` and `rejected` (and `prompt`, unless they are whole conversations)",
)
