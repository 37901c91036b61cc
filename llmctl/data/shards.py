"""The token shard format: binary files of token ids that training memory-maps.

One shard file, little-endian:

    offset 0   header (HEADER_SIZE = 64 bytes)
                 magic        8s   b"LLMCTOK\\0"
                 version      u32  FORMAT_VERSION
                 header_size  u32  64 (so a later version can grow the header)
                 dtype_code   u32  1 = uint16, 2 = uint32
                 vocab_size   u32  ids are < vocab_size
                 bos_id       i32  the token every document starts with, -1 if none
                 (reserved)   u32
                 n_tokens     u64
                 n_docs       u64
                 index_offset u64  where the document index starts
    64         tokens        n_tokens x dtype
    (pad to a multiple of 8)
    index_offset  doc_starts  n_docs x int64: position of each document's first token

Conventions: BOS is prepended to every document (nanochat), so `tokens[doc_starts] == bos_id`;
documents never straddle shards (a shard may exceed the rotation size by up to one document);
uint16 is used when vocab_size <= 65536, else uint32.

A tokens artifact (a tokenized corpus) is a folder with `tokenizer/` and one sub-folder per split
(`train/`, `val/`) of `shard_000000.bin`, ... and a `shards.json` index (format, vocab size, bos id and
convention, tokenizer id, per-shard counts). The names below are that layout, defined only here.
Shards are written under a temporary name and renamed, so a shard file is either whole or absent.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmctl.errors import InputError

MAGIC = b"LLMCTOK\x00"
FORMAT_VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIIIiIQQQ")
assert _HEADER.size <= HEADER_SIZE, _HEADER.size
_DTYPE_CODES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
INDEX_FILE = "shards.json"
# The tokens artifact's layout: every writer and reader imports these names.
TOKENIZER_DIR = "tokenizer"
TRAIN_DIR, VAL_DIR = "train", "val"
SPLITS = (TRAIN_DIR, VAL_DIR)
SHARD_GLOB = "shard_*.bin"
BOS_CONVENTION = "bos_prepended"  # every document is [bos] + tokens; bos separates documents


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    assert 0 < vocab_size <= 2**32, vocab_size
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def _dtype_code(dtype: np.dtype) -> int:
    for code, dt in _DTYPE_CODES.items():
        if dt == dtype:
            return code
    raise AssertionError(f"unsupported token dtype {dtype}")


def _align8(n: int) -> int:
    return (n + 7) // 8 * 8


@dataclass(frozen=True)
class ShardHeader:
    """The parsed header of one shard file."""

    version: int
    dtype: np.dtype
    vocab_size: int
    bos_id: int | None
    n_tokens: int
    n_docs: int
    index_offset: int

    @property
    def file_size(self) -> int:
        return self.index_offset + 8 * self.n_docs


def read_header(path: str | os.PathLike[str]) -> ShardHeader:
    """Parse and validate a shard header against the file size; InputError names the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
    except OSError as e:
        raise InputError(f"{path}: cannot read token shard ({e.strerror})") from None
    if len(raw) < HEADER_SIZE:
        raise InputError(f"{path}: truncated token shard ({size} bytes, the header alone is {HEADER_SIZE})")
    magic, version, header_size, code, vocab, bos, _, n_tokens, n_docs, index_offset = _HEADER.unpack_from(
        raw
    )
    if magic != MAGIC:
        raise InputError(f"{path}: not an llmctl token shard (bad magic bytes {magic!r})")
    if version != FORMAT_VERSION:
        raise InputError(
            f"{path}: token shard format version {version}; this llmctl reads version {FORMAT_VERSION}",
            hint="re-run the tokenize stage with this llmctl version",
        )
    if header_size != HEADER_SIZE or code not in _DTYPE_CODES:
        raise InputError(f"{path}: corrupt token shard header (header_size={header_size}, dtype code={code})")
    dtype = _DTYPE_CODES[code]
    expected_index = _align8(HEADER_SIZE + n_tokens * dtype.itemsize)
    header = ShardHeader(version, dtype, vocab, None if bos < 0 else bos, n_tokens, n_docs, index_offset)
    if index_offset != expected_index or size != header.file_size:
        raise InputError(
            f"{path}: truncated or corrupt token shard (header promises {n_tokens:,} tokens and "
            f"{n_docs:,} documents = {header.file_size:,} bytes; the file has {size:,})",
            hint="re-run the tokenize stage (`llmctl run tokenize --force`)",
        )
    return header


class TokenShard:
    """A memory-mapped shard: `tokens` (uint16/uint32) and `doc_starts` (int64), both read-only."""

    def __init__(self, path: str | os.PathLike[str], verify: bool = False):
        self.path = Path(path)
        self.header = read_header(self.path)
        h = self.header
        if h.n_tokens:
            self.tokens = np.memmap(
                self.path, dtype=h.dtype, mode="r", offset=HEADER_SIZE, shape=(h.n_tokens,)
            )
        else:
            self.tokens = np.zeros(0, dtype=h.dtype)
        if h.n_docs:
            self.doc_starts = np.memmap(
                self.path, dtype="<i8", mode="r", offset=h.index_offset, shape=(h.n_docs,)
            )
        else:
            self.doc_starts = np.zeros(0, dtype="<i8")
        if h.n_docs and (self.doc_starts[0] != 0 or self.doc_starts[-1] >= h.n_tokens):
            raise InputError(
                f"{self.path}: corrupt document index (starts {self.doc_starts[0]}..{self.doc_starts[-1]})"
            )
        if verify:
            self.verify()

    def __len__(self) -> int:
        return self.header.n_tokens

    @property
    def n_docs(self) -> int:
        return self.header.n_docs

    def check_ids(self) -> None:
        """Every id below vocab_size (one pass over the memory map, ~1 ms per million tokens): an id
        out of range would otherwise surface later, deep in the model, as an index error."""
        h = self.header
        top = int(self.tokens.max()) if h.n_tokens else 0
        if top >= h.vocab_size:
            raise InputError(
                f"{self.path}: corrupt token shard: token id {top:,} >= vocab_size {h.vocab_size:,}",
                hint="the shard was damaged or written by something else; run `llmctl tokenize --force` "
                "to rebuild the tokens",
            )

    def verify(self) -> None:
        """Full scan: ids below vocab_size, increasing document starts, BOS at every start."""
        h = self.header
        self.check_ids()
        if h.n_docs > 1 and not bool(np.all(np.diff(self.doc_starts) > 0)):
            raise InputError(f"{self.path}: document starts are not increasing")
        if h.bos_id is not None and h.n_docs and not bool(np.all(self.tokens[self.doc_starts] == h.bos_id)):
            raise InputError(f"{self.path}: a document does not start with bos id {h.bos_id}")

    def document(self, i: int) -> np.ndarray:
        """Tokens of document `i` (BOS included)."""
        start = int(self.doc_starts[i])
        end = int(self.doc_starts[i + 1]) if i + 1 < self.n_docs else self.header.n_tokens
        return np.asarray(self.tokens[start:end])


def write_shard(
    path: str | os.PathLike[str],
    tokens: np.ndarray,
    doc_starts: np.ndarray,
    *,
    vocab_size: int,
    bos_id: int | None,
) -> Path:
    """Write one shard atomically (temporary name, then rename)."""
    path = Path(path)
    dtype = token_dtype(vocab_size)
    tokens = np.ascontiguousarray(tokens, dtype=dtype)
    doc_starts = np.ascontiguousarray(doc_starts, dtype="<i8")
    n_tokens, n_docs = len(tokens), len(doc_starts)
    index_offset = _align8(HEADER_SIZE + n_tokens * dtype.itemsize)
    header = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        HEADER_SIZE,
        _dtype_code(dtype),
        vocab_size,
        -1 if bos_id is None else bos_id,
        0,
        n_tokens,
        n_docs,
        index_offset,
    )
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(header.ljust(HEADER_SIZE, b"\0"))
        f.write(tokens.tobytes())
        f.write(b"\0" * (index_offset - HEADER_SIZE - n_tokens * dtype.itemsize))
        f.write(doc_starts.tobytes())
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class ShardInfo:
    """One written shard: its file name (relative to its split folder) and counts."""

    file: str
    n_tokens: int
    n_docs: int


class ShardWriter:
    """Appends documents and rotates to a new shard once `shard_tokens` tokens are buffered.

    with ShardWriter(out / "train", vocab_size=4096, bos_id=0) as w:
        w.add(tokens, doc_lengths)     # many documents, concatenated (each starts with BOS)
    w.shards                           # [ShardInfo(...), ...]
    """

    def __init__(
        self, folder: str | os.PathLike[str], *, vocab_size: int, bos_id: int | None, shard_tokens: int
    ):
        assert shard_tokens > 0, shard_tokens
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.shard_tokens = shard_tokens
        self.dtype = token_dtype(vocab_size)
        self.shards: list[ShardInfo] = []
        self._tokens: list[np.ndarray] = []
        self._lengths: list[np.ndarray] = []
        self._buffered = 0

    def add(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Add documents given as one concatenated token array and each document's length."""
        doc_lengths = np.asarray(doc_lengths, dtype=np.int64)
        assert int(doc_lengths.sum()) == len(tokens), (int(doc_lengths.sum()), len(tokens))
        if not len(doc_lengths):
            return
        self._tokens.append(np.asarray(tokens, dtype=self.dtype))
        self._lengths.append(doc_lengths)
        self._buffered += len(tokens)
        while self._buffered >= self.shard_tokens:
            self._flush(full=True)

    def add_document(self, tokens: Sequence[int] | np.ndarray) -> None:
        self.add(np.asarray(tokens, dtype=self.dtype), np.array([len(tokens)]))

    def _flush(self, full: bool) -> None:
        tokens = np.concatenate(self._tokens) if len(self._tokens) > 1 else self._tokens[0]
        lengths = np.concatenate(self._lengths) if len(self._lengths) > 1 else self._lengths[0]
        ends = np.cumsum(lengths)
        # The first document that reaches the rotation size closes the shard.
        n_docs = int(np.searchsorted(ends, self.shard_tokens)) + 1 if full else len(lengths)
        n_tokens = int(ends[n_docs - 1])
        starts = np.concatenate([[0], ends[: n_docs - 1]])
        name = f"shard_{len(self.shards):06d}.bin"
        write_shard(
            self.folder / name, tokens[:n_tokens], starts, vocab_size=self.vocab_size, bos_id=self.bos_id
        )
        self.shards.append(ShardInfo(name, n_tokens, n_docs))
        self._tokens = [tokens[n_tokens:]] if n_tokens < len(tokens) else []
        self._lengths = [lengths[n_docs:]] if n_docs < len(lengths) else []
        self._buffered = len(tokens) - n_tokens

    def close(self) -> list[ShardInfo]:
        """Write the last partial shard; returns every shard written."""
        if self._buffered:
            self._flush(full=False)
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()


def list_shards(folder: str | os.PathLike[str]) -> list[Path]:
    """The shard files of a split folder, in order (temporary files are ignored)."""
    return sorted(Path(folder).glob(SHARD_GLOB))


def write_index(
    out_dir: str | os.PathLike[str],
    splits: dict[str, list[ShardInfo]],
    *,
    vocab_size: int,
    bos_id: int | None,
    tokenizer_id: str | None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write shards.json describing a tokenized corpus folder (`splits` maps split name -> shards)."""
    out_dir = Path(out_dir)
    data = {
        "format": "llmctl-token-shards",
        "format_version": FORMAT_VERSION,
        "dtype": str(token_dtype(vocab_size)).lstrip("<"),
        "vocab_size": vocab_size,
        "bos_id": bos_id,
        "document_convention": BOS_CONVENTION,
        "tokenizer_id": tokenizer_id,
        "splits": {
            name: {
                "n_tokens": sum(s.n_tokens for s in shards),
                "n_docs": sum(s.n_docs for s in shards),
                "shards": [asdict(s) for s in shards],
            }
            for name, shards in splits.items()
        },
        **(extra or {}),
    }
    path = out_dir / INDEX_FILE
    tmp = path.with_name(f".{INDEX_FILE}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_index(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read shards.json of a tokenized corpus folder."""
    path = Path(out_dir) / INDEX_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: missing; {out_dir} is not a tokenized corpus") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: unreadable ({e})") from None
    if data.get("format") != "llmctl-token-shards":
        raise InputError(f"{path}: not an llmctl token shard index")
    return data
