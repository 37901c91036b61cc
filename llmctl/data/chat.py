"""Read chat data sets (the `sft.data` section) into validated, normalized conversations.

    data = load_chat_data(cfg.sft.data, project_dir, reporter)
    data.train[0].messages      # [{"role": "user", "content": "..."}, {"role": "assistant", ...}]
    data.summary()              # counts for the manifest: records read, kept, skipped by reason

Accepted records (one JSON object per JSONL line, or one parquet row):

* OpenAI messages: `{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...]}`;
  every other field of a message (`tool_calls`, `tool_call_id`, `name`, ...) is kept as is;
* prompt/completion pairs, as TRL takes them: `{"prompt": "...", "completion": "..."}` becomes a user
  turn and an assistant turn; in the conversational variant prompt and completion are message lists,
  concatenated. `Conversation.completion_start` says where the completion begins.

Content is a string or a list of text parts (`[{"type": "text", "text": "..."}]`, joined with no
separator, as chat templates render them). Each conversation must hold an assistant turn, and no
assistant turn may be empty (unless it calls tools). A record that breaks a rule stops the read with
`file:line: what` (InputError, exit 2), or with `on_error: skip` is dropped and counted by reason.
Fields that are null are dropped: parquet gives every message every field of its struct column.

Files are found and opened by `llmctl.data.sources` (local paths and globs, .gz/.zst, hub datasets
with their subsets/splits and the offline cache), so chat data reads the same way as pretraining data.
`read_records` is that reading loop for any kind of record (`RecordKind`: how one record is checked and
normalized); `llmctl.data.preference` reads preference pairs with it and with these message rules.
"""

from __future__ import annotations

import gzip
import hashlib
import io
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import orjson

from llmctl.config.data import SourceConfig, SourceLocation
from llmctl.config.sft import ChatDataConfig, ChatSourceConfig
from llmctl.data.sources import (
    _PARQUET_BATCH_ROWS,
    _corrupt,
    _decompressed,
    _File,
    _magic_hint,
    _open_binary,
    _resolve_files,
)
from llmctl.errors import InputError
from llmctl.reporting import Reporter

ROLES = ("system", "user", "assistant", "tool")
SOURCES_KEY = "sft.data.sources"
VAL_SOURCES_KEY = "sft.data.val_sources"  # what load_records names it
T = TypeVar("T")


@dataclass
class Conversation:
    """One validated conversation: messages with string content, where it came from, its other fields."""

    messages: list[dict[str, Any]]
    where: str  # 'file:line' (JSONL) or 'file:row' (parquet), as error messages name it
    extra: dict[str, Any] = field(default_factory=dict)  # the record's other fields (id, metadata, ...)
    completion_start: int | None = None  # prompt/completion records: index of the first completion message


@dataclass
class ChatCounts:
    """What a read saw: files, non-blank records, conversations kept, and records skipped by reason."""

    files: int = 0
    records: int = 0
    conversations: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "records": self.records,
            "conversations": self.conversations,
            "skipped": dict(sorted(self.skipped.items())),
        }


@dataclass
class RecordData(Generic[T]):
    """Train and val records (conversations, preference pairs), with the counts of the reads that made them."""

    train: list[T]
    val: list[T]
    counts: ChatCounts
    val_counts: ChatCounts | None = None  # set when val comes from val_sources

    def summary(self) -> dict[str, Any]:
        out = {**self.counts.to_json(), "train": len(self.train), "val": len(self.val)}
        if self.val_counts is not None:
            out["val_sources"] = self.val_counts.to_json()
        return out


@dataclass
class ChatData(RecordData[Conversation]):
    """Train and val conversations, with the counts of the reads that made them."""


class BadRecord(ValueError):
    """A record that breaks a rule: `reason` is the key it is counted under when skipped."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


# ---------------------------------------------------------------------------------------------
# public API


def load_chat_data(cfg: ChatDataConfig, base_dir: Path, reporter: Reporter | None = None) -> ChatData:
    """Read every source, validate every record, and split off val (val_sources, or val_fraction by a
    hash of each conversation). Raises InputError for bad records (on_error=error), no conversations,
    or a split that leaves nothing to train on."""
    return ChatData(
        *load_records(
            CHAT_RECORDS, cfg, base_dir, reporter, read_conversations, lambda c: c.messages, ChatCounts
        )
    )


def read_conversations(
    sources: Sequence[ChatSourceConfig],
    base_dir: Path,
    on_error: str = "error",
    counts: ChatCounts | None = None,
    reporter: Reporter | None = None,
    key: str = SOURCES_KEY,
) -> Iterator[Conversation]:
    """Yield the conversations of every source, in order; `counts` is updated as they are read.

    `key` names the sources list in error messages (`sft.data.sources[1]: ...`). A source that
    yields no conversation is an InputError: it is empty, or every record in it was skipped.
    """
    counts = counts if counts is not None else ChatCounts()
    for where, conversation in read_records(CHAT_RECORDS, sources, base_dir, on_error, counts, reporter, key):
        conversation.where = where
        counts.conversations += 1
        yield conversation


def normalize_record(record: Any, messages_key: str = "messages") -> Conversation:
    """One record as a Conversation (with `where` unset), or BadRecord saying what is wrong."""
    if not isinstance(record, dict):
        raise BadRecord("not_an_object", f"expected a JSON object, got {type(record).__name__}")
    record = dict(record)
    completion_start = None
    if record.get(messages_key) is not None:
        messages = _message_list(record.pop(messages_key), messages_key)
    elif record.get("prompt") is not None or record.get("completion") is not None:
        prompt, completion = record.pop("prompt", None), record.pop("completion", None)
        if prompt is None or completion is None:
            missing = "completion" if completion is None else "prompt"
            raise BadRecord(
                "no_messages", f"has {'prompt' if prompt is not None else 'completion'!r} but no {missing!r}"
            )
        head = (
            [{"role": "user", "content": prompt}]
            if isinstance(prompt, str)
            else _message_list(prompt, "prompt")
        )
        tail = (
            [{"role": "assistant", "content": completion}]
            if isinstance(completion, str)
            else _message_list(completion, "completion")
        )
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in tail):
            raise BadRecord("no_assistant_turn", "'completion' holds no assistant message")
        messages, completion_start = head + tail, len(head)
    else:
        keys = ", ".join(repr(k) for k in record) or "none"
        raise BadRecord(
            "no_messages", f"no {messages_key!r} (nor 'prompt' and 'completion') field (keys present: {keys})"
        )
    normalized = normalize_messages(messages)
    if not any(m["role"] == "assistant" for m in normalized):
        raise BadRecord("no_assistant_turn", "no assistant turn (nothing to train on)")
    extra = {k: v for k, v in record.items() if v is not None}
    return Conversation(normalized, where="", extra=extra, completion_start=completion_start)


def load_records(
    kind: RecordKind,
    cfg: Any,
    base_dir: Path,
    reporter: Reporter | None,
    read: Callable[..., Iterator[T]],
    hashed: Callable[[T], Any],
    counts_type: type[ChatCounts],
) -> tuple[list[T], list[T], ChatCounts, ChatCounts | None]:
    """(train, val, counts, val counts) of a data section (`sources`, `on_error`, `val_fraction`,
    `val_sources`) read by `read` (read_conversations' signature): val is read from val_sources, or
    split off by `is_val` of each record's `hashed` part. An InputError when val takes everything."""
    counts = counts_type()
    items = list(read(cfg.sources, base_dir, cfg.on_error, counts, reporter))
    if cfg.val_sources is not None:
        val_counts = counts_type()
        key = f"{kind.section}.val_sources"
        return (
            items,
            list(read(cfg.val_sources, base_dir, cfg.on_error, val_counts, reporter, key)),
            counts,
            val_counts,
        )
    flags = [is_val(hashed(item), cfg.val_fraction) for item in items]
    train = [item for item, held in zip(items, flags, strict=True) if not held]
    val = [item for item, held in zip(items, flags, strict=True) if held]
    if not train:
        raise InputError(
            f"{kind.section}.val_fraction: all {len(val)} {kind.noun}s fell in the val split",
            hint=f"lower {kind.section}.val_fraction, or add {kind.noun}s",
        )
    return train, val, counts, None


def is_val(messages: Any, val_fraction: float) -> bool:
    """Whether a conversation belongs to the val split: a hash of its messages (any JSON value: a
    preference pair's prompt too), so the split does not depend on file order and identical
    conversations never straddle it."""
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(orjson.dumps(messages, option=orjson.OPT_SORT_KEYS), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_fraction


def normalize_messages(messages: list[Any], key: str = "messages") -> list[dict[str, Any]]:
    """Every message checked (role, content) and normalized (content a string, null fields dropped);
    `key` names the list in messages (`chosen[1]: empty assistant message`)."""
    return [_message(m, f"{key}[{i}]") for i, m in enumerate(messages)]


# ---------------------------------------------------------------------------------------------
# validation


def _message_list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        what = "an empty list" if isinstance(value, list) else f"a {type(value).__name__}"
        raise BadRecord("no_messages", f"{key!r} must be a non-empty list of messages, got {what}")
    return value


def _content(value: Any, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            kind = part.get("type", "text") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                got = f"a {kind!r} part" if isinstance(kind, str) else f"{part!r:.40}"
                raise BadRecord(
                    "bad_content",
                    f"{where}.content[{j}] is {got}; only text parts {{type: text, text}} are supported",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise BadRecord(
        "bad_content", f"{where}.content is a {type(value).__name__}, not a string or a list of text parts"
    )


def _message(m: Any, where: str) -> dict[str, Any]:
    if not isinstance(m, dict):
        raise BadRecord(
            "bad_message", f"{where} is a {type(m).__name__}, not an object with role and content"
        )
    role = m.get("role")
    if role not in ROLES:
        raise BadRecord("unknown_role", f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
    content = _content(m.get("content"), where)
    out = {"role": role, "content": content or ""}
    out.update((k, v) for k, v in m.items() if k not in ("role", "content") and v is not None)
    if role == "assistant" and not out["content"].strip() and not out.get("tool_calls"):
        raise BadRecord("empty_assistant", f"{where}: empty assistant message")
    if content is None and role != "assistant":
        raise BadRecord("bad_content", f"{where}: {role} message has no content")
    return out


# ---------------------------------------------------------------------------------------------
# reading records (files found and opened by llmctl.data.sources), for chat data and preference pairs


@dataclass(frozen=True)
class RecordKind:
    """What `read_records` reads: how one record becomes a value, and how messages name things."""

    noun: str  # one record's value, in messages: "conversation", "preference pair"
    section: str  # the config section, for hints: "sft.data" (-> sft.data.on_error=skip)
    normalize: Callable[[Any, Any], Any]  # (record, source) -> value; raises BadRecord
    # (parquet column names, source) -> (what is missing, hint), or None when the columns will do
    check_columns: Callable[[list[str], Any], tuple[str, str] | None]
    needs: str  # hint for a source that yields nothing: what a record needs


def _chat_columns(columns: list[str], source: ChatSourceConfig) -> tuple[str, str] | None:
    if source.messages_key in columns or {"prompt", "completion"} <= set(columns):
        return None
    return (
        f"no {source.messages_key!r} column, nor 'prompt' and 'completion'",
        "set `messages_key` on this source to the column holding the conversations",
    )


CHAT_RECORDS = RecordKind(
    noun="conversation",
    section="sft.data",
    normalize=lambda record, source: normalize_record(record, source.messages_key),
    check_columns=_chat_columns,
    needs="each record needs `messages` (or `prompt` and `completion`) with an assistant turn",
)


def read_records(
    kind: RecordKind,
    sources: Sequence[SourceLocation],
    base_dir: Path,
    on_error: str,
    counts: ChatCounts,
    reporter: Reporter | None,
    key: str,
) -> Iterator[tuple[str, Any]]:
    """Yield `(where, value)` for every good record of every source, in order ('file:line' or
    'file:row'); `counts.files`, `.records` and `.skipped` are updated as they are read (the caller
    counts what it keeps). A source that yields nothing is an InputError naming `key[index]`."""
    reporter = reporter or Reporter()
    for index, source in enumerate(sources):
        files = _record_files(kind, source, Path(base_dir), index, key)
        reporter.log(
            f"{kind.section} source {index}: {source.path} ({len(files)} file{'s' if len(files) != 1 else ''})"
        )
        n_source = 0
        for file in files:
            counts.files += 1
            for item in _read_file(kind, file, source, on_error, counts):
                yield item
                n_source += 1
                if source.limit is not None and n_source >= source.limit:
                    break
            if source.limit is not None and n_source >= source.limit:
                break
        if n_source == 0:
            skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.skipped.items()))
            raise InputError(
                f"{key}[{index}]: {source.path} holds no {kind.noun}s ({len(files)} file(s), "
                f"{counts.records} records read so far, skipped: {skipped or 'none'})",
                hint=kind.needs,
            )


def _as_source(source: Any) -> SourceConfig:
    return SourceConfig(
        path=source.path, format=source.format, subset=source.subset, split=source.split, limit=source.limit
    )


def records_fingerprint(sources: Sequence[SourceLocation], base_dir: Path, tag: str) -> list[dict[str, Any]]:
    """What identifies record sources (files by path, size and mtime; hub datasets by revision), so a
    stage that read them can tell when they changed; the entries pretraining sources give, tagged."""
    from types import SimpleNamespace

    from llmctl.data.sources import source_fingerprint

    converted = SimpleNamespace(sources=[_as_source(s) for s in sources])
    return [{tag: True, **entry} for entry in source_fingerprint(converted, base_dir)]  # type: ignore[arg-type]


def chat_fingerprint(cfg: ChatDataConfig, base_dir: Path) -> list[dict[str, Any]]:
    """What identifies the chat data, so a stage that read it can tell when it changed."""
    return records_fingerprint([*cfg.sources, *(cfg.val_sources or [])], base_dir, "chat")


def _record_files(kind: RecordKind, source: Any, base_dir: Path, index: int, key: str) -> list[_File]:
    files = _resolve_files(_as_source(source), base_dir, index, key)
    record_files = [f for f in files if f.format in ("jsonl", "parquet")]  # .txt files hold no records
    if not record_files:
        raise InputError(
            f"{key}[{index}]: no JSONL or parquet files in {source.path}",
            hint=f"{kind.section} is JSONL (.jsonl, .jsonl.gz, .jsonl.zst) or parquet, one {kind.noun} per record",
        )
    return record_files


def _read_file(
    kind: RecordKind, file: _File, source: Any, on_error: str, counts: ChatCounts
) -> Iterator[tuple[str, Any]]:
    import zstandard

    records = _jsonl_records(file) if file.format == "jsonl" else _parquet_records(kind, file, source)
    try:
        for line_no, record in records:
            counts.records += 1
            try:
                if isinstance(record, BadRecord):
                    raise record
                value = kind.normalize(record, source)
            except BadRecord as bad:
                if on_error == "skip":
                    counts.skipped[bad.reason] += 1
                    continue
                raise InputError(
                    f"{file.display}:{line_no}: {bad.message}",
                    hint=f"fix or remove that record, or set {kind.section}.on_error=skip to skip and count such records",
                ) from None
            yield f"{file.display}:{line_no}", value
    except (gzip.BadGzipFile, EOFError, zstandard.ZstdError, OSError) as e:
        if isinstance(e, FileNotFoundError | PermissionError):
            raise InputError(
                f"{file.display}: {e.strerror}", hint="check the path and its permissions"
            ) from e
        raise _corrupt(file, e) from e


def _jsonl_records(file: _File) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record or BadRecord) for every non-blank line."""
    with _open_binary(file) as raw, _decompressed(raw, file.display) as f:
        for line_no, line in enumerate(io.BufferedReader(f, buffer_size=1 << 20), start=1):  # type: ignore[arg-type]
            if not line.strip():
                continue
            try:
                yield line_no, orjson.loads(line)
            except orjson.JSONDecodeError as e:
                if line_no == 1 and (magic := _magic_hint(file)):
                    raise InputError(f"{file.display}:1: not JSON ({magic})", hint=magic) from e
                yield line_no, BadRecord("malformed_json", f"malformed JSON ({e})")


def _parquet_records(kind: RecordKind, file: _File, source: Any) -> Iterator[tuple[int, Any]]:
    """(row number from 1, row as a dict) for every row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _open_binary(file) as raw:
        try:
            pf = pq.ParquetFile(raw)
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
            raise _corrupt(file, e) from e
        columns = pf.schema_arrow.names
        if (problem := kind.check_columns(columns, source)) is not None:
            missing, hint = problem
            raise InputError(f"{file.display}: {missing} (columns: {', '.join(columns)})", hint=hint)
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
                for record in batch.to_pylist():
                    row += 1
                    yield row, record
        except (pa.ArrowInvalid, pa.ArrowIOError) as e:
            raise _corrupt(file, e) from e
