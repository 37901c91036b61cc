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
"""

from __future__ import annotations

import gzip
import hashlib
import io
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from llmctl.config.data import SourceConfig
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
VAL_SOURCES_KEY = "sft.data.val_sources"


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
class ChatData:
    """Train and val conversations, with the counts of the reads that made them."""

    train: list[Conversation]
    val: list[Conversation]
    counts: ChatCounts
    val_counts: ChatCounts | None = None  # set when val comes from val_sources

    def summary(self) -> dict[str, Any]:
        out = {**self.counts.to_json(), "train": len(self.train), "val": len(self.val)}
        if self.val_counts is not None:
            out["val_sources"] = self.val_counts.to_json()
        return out


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
    counts = ChatCounts()
    conversations = list(read_conversations(cfg.sources, base_dir, cfg.on_error, counts, reporter))
    if cfg.val_sources is not None:
        val_counts = ChatCounts()
        val = list(
            read_conversations(cfg.val_sources, base_dir, cfg.on_error, val_counts, reporter, VAL_SOURCES_KEY)
        )
        return ChatData(conversations, val, counts, val_counts)
    train = [c for c in conversations if not is_val(c.messages, cfg.val_fraction)]
    val = [c for c in conversations if is_val(c.messages, cfg.val_fraction)]
    if not train:
        raise InputError(
            f"sft.data.val_fraction: all {len(val)} conversations fell in the val split",
            hint="lower sft.data.val_fraction, or add conversations",
        )
    return ChatData(train, val, counts)


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
    reporter = reporter or Reporter()
    counts = counts if counts is not None else ChatCounts()
    for index, source in enumerate(sources):
        files = _chat_files(source, Path(base_dir), index, key)
        reporter.log(
            f"chat source {index}: {source.path} ({len(files)} file{'s' if len(files) != 1 else ''})"
        )
        n_source = 0
        for file in files:
            counts.files += 1
            for conversation in _read_file(file, source, on_error, counts):
                yield conversation
                counts.conversations += 1
                n_source += 1
                if source.limit is not None and n_source >= source.limit:
                    break
            if source.limit is not None and n_source >= source.limit:
                break
        if n_source == 0:
            skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.skipped.items()))
            raise InputError(
                f"{key}[{index}]: {source.path} holds no conversations ({len(files)} file(s), "
                f"{counts.records} records read so far, skipped: {skipped or 'none'})",
                hint="each record needs `messages` (or `prompt` and `completion`) with an assistant turn",
            )


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
    normalized = [_message(m, i) for i, m in enumerate(messages)]
    if not any(m["role"] == "assistant" for m in normalized):
        raise BadRecord("no_assistant_turn", "no assistant turn (nothing to train on)")
    extra = {k: v for k, v in record.items() if v is not None}
    return Conversation(normalized, where="", extra=extra, completion_start=completion_start)


def is_val(messages: list[dict[str, Any]], val_fraction: float) -> bool:
    """Whether a conversation belongs to the val split: a hash of its messages, so the split does not
    depend on file order and identical conversations never straddle it."""
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(orjson.dumps(messages, option=orjson.OPT_SORT_KEYS), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < val_fraction


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


def _message(m: Any, i: int) -> dict[str, Any]:
    where = f"messages[{i}]"
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
# reading files (found and opened by llmctl.data.sources)


def _as_source(source: ChatSourceConfig) -> SourceConfig:
    return SourceConfig(
        path=source.path, format=source.format, subset=source.subset, split=source.split, limit=source.limit
    )


def chat_fingerprint(cfg: ChatDataConfig, base_dir: Path) -> list[dict[str, Any]]:
    """What identifies the chat data (files by path, size and mtime; hub datasets by revision), so a
    stage that read it can tell when it changed; the same entries pretraining sources give."""
    from types import SimpleNamespace

    from llmctl.data.sources import source_fingerprint

    sources = [_as_source(s) for s in [*cfg.sources, *(cfg.val_sources or [])]]
    return [
        {"chat": True, **entry} for entry in source_fingerprint(SimpleNamespace(sources=sources), base_dir)
    ]


def _chat_files(source: ChatSourceConfig, base_dir: Path, index: int, key: str) -> list[_File]:
    files = _resolve_files(_as_source(source), base_dir, index, key)
    chat_files = [f for f in files if f.format in ("jsonl", "parquet")]  # .txt files hold no records
    if not chat_files:
        raise InputError(
            f"{key}[{index}]: no JSONL or parquet files in {source.path}",
            hint="chat data is JSONL (.jsonl, .jsonl.gz, .jsonl.zst) or parquet, one conversation per record",
        )
    return chat_files


def _read_file(
    file: _File, source: ChatSourceConfig, on_error: str, counts: ChatCounts
) -> Iterator[Conversation]:
    import zstandard

    records = _jsonl_records(file) if file.format == "jsonl" else _parquet_records(file, source)
    try:
        for line_no, record in records:
            counts.records += 1
            try:
                if isinstance(record, BadRecord):
                    raise record
                conversation = normalize_record(record, source.messages_key)
            except BadRecord as bad:
                if on_error == "skip":
                    counts.skipped[bad.reason] += 1
                    continue
                raise InputError(
                    f"{file.display}:{line_no}: {bad.message}",
                    hint="fix or remove that record, or set sft.data.on_error=skip to skip and count such records",
                ) from None
            conversation.where = f"{file.display}:{line_no}"
            yield conversation
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


def _parquet_records(file: _File, source: ChatSourceConfig) -> Iterator[tuple[int, Any]]:
    """(row number from 1, row as a dict) for every row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _open_binary(file) as raw:
        try:
            pf = pq.ParquetFile(raw)
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
            raise _corrupt(file, e) from e
        columns = pf.schema_arrow.names
        if source.messages_key not in columns and not {"prompt", "completion"} <= set(columns):
            raise InputError(
                f"{file.display}: no {source.messages_key!r} column, nor 'prompt' and 'completion' "
                f"(columns: {', '.join(columns)})",
                hint="set `messages_key` on this source to the column holding the conversations",
            )
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
                for record in batch.to_pylist():
                    row += 1
                    yield row, record
        except (pa.ArrowInvalid, pa.ArrowIOError) as e:
            raise _corrupt(file, e) from e
