"""The corpus artifact format: documents as gzip JSONL shards, read and written here.

An artifact that holds documents (ingest, dedup, filter) keeps them in `documents/`:

    documents/00000.jsonl.gz
    documents/00001.jsonl.gz
    ...

one JSON object per line, `{"text": str, "id": str, "metadata": {...}}`, exactly what datatrove's
`JsonlWriter` writes by default (empty fields are left out, so `metadata` may be missing). Any
datatrove `JsonlReader` reads these shards, and so does `iter_corpus`:

    with CorpusWriter(run_dir / DOCUMENTS_DIR) as writer:
        for doc in docs:
            writer.write(doc)
    writer.stats()                      # {"documents": ..., "text_bytes": ..., "shards": ..., ...}
    for doc in iter_corpus(artifact_dir):
        ...

We write shards ourselves rather than through `JsonlWriter` because a shard must appear under its
final name only once complete (temp name, then rename) and a stage needs the counts as it writes.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import orjson
from datatrove.data import Document

from llmctl.errors import InputError

DOCUMENTS_DIR = "documents"
SHARD_SUFFIX = ".jsonl.gz"
DEFAULT_DOCS_PER_SHARD = 10_000
# Measured on English-like JSONL (zlib, one core): level 3 compresses at ~76 MB/s to 29% of the input,
# level 6 (zlib default) at ~19 MB/s to 24%, level 9 (gzip's default) at ~7 MB/s. Writing must not be
# the slowest step of a data stage, so we pay ~18% more disk for 4x the speed.
_GZIP_LEVEL = 3


def shard_name(index: int) -> str:
    return f"{index:05d}{SHARD_SUFFIX}"


def _default(obj: object) -> object:
    # numpy scalars and dates arrive in metadata from parquet sources
    if hasattr(obj, "item"):
        return obj.item()  # type: ignore[union-attr]
    if hasattr(obj, "isoformat"):
        return obj.isoformat()  # type: ignore[union-attr]
    raise TypeError(f"metadata value of type {type(obj).__name__} is not JSON serializable")


def document_to_json(doc: Document) -> bytes:
    """One JSONL line for `doc`, as datatrove's JsonlWriter writes it (falsy fields left out)."""
    return record_to_json(doc.text, doc.id, doc.metadata)


def record_to_json(text: str, doc_id: str | None, metadata: dict | None) -> bytes:
    """`document_to_json` without building a Document (for writers that hold plain tuples)."""
    record: dict[str, object] = {"text": text}
    if doc_id:
        record["id"] = doc_id
    if metadata:
        record["metadata"] = metadata
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE, default=_default)


class CorpusWriter:
    """Writes documents into `folder` as numbered gzip JSONL shards of at most `max_docs_per_shard`.

    Each shard is written under a hidden temporary name and renamed when complete; on an exception
    the unfinished shard is deleted. `start_index` numbers the first shard (for appending).
    """

    def __init__(
        self, folder: Path | str, max_docs_per_shard: int = DEFAULT_DOCS_PER_SHARD, start_index: int = 0
    ):
        assert max_docs_per_shard >= 1, max_docs_per_shard
        self.folder = Path(folder)
        self.max_docs_per_shard = max_docs_per_shard
        self.documents = 0
        self.text_bytes = 0
        self.shards: list[Path] = []
        self._next_index = start_index
        self._file: gzip.GzipFile | None = None
        self._raw = None
        self._tmp: Path | None = None
        self._final: Path | None = None
        self._in_shard = 0

    def __enter__(self) -> CorpusWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def write(self, doc: Document) -> None:
        if self._file is None:
            self._open_shard()
        assert self._file is not None
        line = document_to_json(doc)
        self._file.write(line)
        self.documents += 1
        self.text_bytes += len(doc.text.encode("utf-8"))
        self._in_shard += 1
        if self._in_shard >= self.max_docs_per_shard:
            self._close_shard()

    def close(self) -> None:
        """Finish the current shard; the writer may not be used afterwards."""
        self._close_shard()

    def stats(self) -> dict[str, int]:
        return {
            "documents": self.documents,
            "text_bytes": self.text_bytes,
            "shards": len(self.shards),
            "compressed_bytes": sum(p.stat().st_size for p in self.shards),
        }

    def _open_shard(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._final = self.folder / shard_name(self._next_index)
        self._tmp = self.folder / f".{self._final.name}.tmp"
        self._next_index += 1
        self._raw = open(self._tmp, "wb")  # noqa: SIM115 - closed in _close_shard/_abort
        # mtime=0 keeps shards byte-identical across runs (gzip stores a timestamp otherwise)
        self._file = gzip.GzipFile(fileobj=self._raw, mode="wb", compresslevel=_GZIP_LEVEL, mtime=0)
        self._in_shard = 0

    def _close_shard(self) -> None:
        if self._file is None:
            return
        assert self._raw is not None and self._tmp is not None and self._final is not None
        self._file.close()
        self._raw.close()
        os.replace(self._tmp, self._final)
        self.shards.append(self._final)
        self._file = self._raw = self._tmp = self._final = None

    def _abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._raw.close()  # type: ignore[union-attr]
            self._tmp.unlink(missing_ok=True)  # type: ignore[union-attr]
            self._file = self._raw = self._tmp = self._final = None


def _shard_folder(folder: Path) -> Path:
    """An artifact folder holds its shards in documents/; a shard folder is used as is."""
    sub = folder / DOCUMENTS_DIR
    return sub if sub.is_dir() else folder


def corpus_files(folder: Path | str) -> list[Path]:
    """The shards of a corpus, in order. `folder` is an artifact folder (with documents/) or a shard folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: corpus folder does not exist", hint="check the artifact reference")
    shards = sorted(p for p in _shard_folder(folder).glob(f"*{SHARD_SUFFIX}") if not p.name.startswith("."))
    return shards


def iter_corpus(folder: Path | str) -> Iterator[Document]:
    """Yield every document of a corpus, shard by shard; errors name the shard and line."""
    for shard in corpus_files(folder):
        yield from iter_shard(shard)


def iter_shard(shard: Path) -> Iterator[Document]:
    """Yield the documents of one shard."""
    line_no = 0
    try:
        with gzip.open(shard, "rb") as f:
            for line_no, line in enumerate(f, start=1):  # noqa: B007 - line_no is used in the except
                if not line.strip():
                    continue
                record = orjson.loads(line)
                text = record["text"]
                yield Document(
                    text=text,
                    id=record.get("id", f"{shard.name}/{line_no}"),
                    metadata=record.get("metadata") or {},
                )
    except orjson.JSONDecodeError as e:
        raise InputError(
            f"{shard}:{line_no}: malformed JSON in corpus shard ({e})", hint="re-run the stage that wrote it"
        ) from e
    except (KeyError, TypeError) as e:
        raise InputError(
            f"{shard}:{line_no}: corpus record has no 'text' string", hint="re-run the stage that wrote it"
        ) from e
    except (gzip.BadGzipFile, EOFError, OSError) as e:
        raise InputError(
            f"{shard}: corrupt corpus shard ({type(e).__name__}: {e})", hint="re-run the stage that wrote it"
        ) from e
