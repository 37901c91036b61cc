"""Read the configured raw sources (`data:` section) into a stream of datatrove `Document`s.

    for doc in read_sources(cfg.data, project_dir, reporter, counters):
        ...

Formats: JSONL (plain, .gz, .zst), parquet, and plain text (one document per .txt file: a file is
the natural unit of a text corpus, and splitting on blank lines would cut documents apart).
Hub datasets (`hf://datasets/<org>/<name>`) are streamed with `HfFileSystem` when online and read
from the local Hugging Face cache when `HF_HUB_OFFLINE=1` or the hub cannot be reached (one quick
connection probe instead of huggingface_hub's retry loop).

Why our own thin readers rather than datatrove's `JsonlReader`/`ParquetReader`: those log and skip
malformed lines, silently skip documents whose text key is missing, and report corrupt files as
warnings. A user pointing llmctl at the wrong file must get an error that names the file and line.
Documents are still datatrove `Document`s, so the rest of the pipeline is plain datatrove.
"""

from __future__ import annotations

import bz2
import fnmatch
import functools
import glob as globlib
import gzip
import io
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import orjson
from datatrove.data import Document

from llmctl.config.data import HF_DATASETS_PREFIX, DataConfig, SourceConfig
from llmctl.errors import ConfigError, InputError
from llmctl.reporting import Reporter

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".jsonl.zstd", ".jsonl.bz2", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt",)
_SUFFIXES = {"jsonl": JSONL_SUFFIXES, "parquet": PARQUET_SUFFIXES, "text": TEXT_SUFFIXES}
_GLOB_CHARS = re.compile(r"[*?\[]")
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_PARQUET_BATCH_ROWS = 1024

# One TCP connect decides whether the hub can be reached: without it, an unreachable hub costs ~25 s
# of huggingface_hub's retries (fingerprint, then listing) before the same error.
_PROBE_SECONDS = 3.0


def _offline_hint(repo: str) -> str:
    """How to get a hub dataset without the hub; HF_HUB_OFFLINE is only mentioned when it is set."""
    hint = (
        f"download it where there is internet (`hf download {repo} --repo-type dataset --local-dir "
        f"data/{repo.split('/')[1]}`) and set `path` to the local files"
    )
    return hint + (", or unset HF_HUB_OFFLINE" if _hub_offline_set() else "")


@dataclass(frozen=True)
class _File:
    """One input file: where to open it and how to name it in ids and error messages."""

    display: str  # relative path (local) or '<repo>/<path in repo>' (hub); stable across machines
    local: Path | None  # set for local files (including files in the HF cache)
    hub_path: str | None  # 'datasets/<org>/<name>@<rev>/<path>' for HfFileSystem streaming
    format: str  # jsonl | parquet | text


# ---------------------------------------------------------------------------------------------
# public API


def read_sources(
    cfg: DataConfig,
    base_dir: Path,
    reporter: Reporter | None = None,
    counters: dict[str, int] | None = None,
) -> Iterator[Document]:
    """Yield every document of every configured source, in order.

    `counters` (when given) is updated in place with: files, documents, skipped_malformed,
    skipped_empty (records whose text is an empty string). Raises InputError for anything the user
    can fix: no files matched, zero documents, malformed records (unless on_error=skip), corrupt files.
    """
    reporter = reporter or Reporter()
    counters = counters if counters is not None else {}
    for key in ("files", "documents", "skipped_malformed", "skipped_empty"):
        counters.setdefault(key, 0)
    for index, source in enumerate(cfg.sources):
        files = _resolve_files(source, Path(base_dir), index)
        reporter.log(f"source {index}: {source.path} ({len(files)} file{'s' if len(files) != 1 else ''})")
        n_source = 0
        for file in files:
            counters["files"] += 1
            for doc in _read_file(file, source, cfg.on_error, counters):
                yield doc
                counters["documents"] += 1
                n_source += 1
                if source.limit is not None and n_source >= source.limit:
                    break
            if source.limit is not None and n_source >= source.limit:
                break
        if n_source == 0:
            raise InputError(
                f"data.sources[{index}]: {source.path} holds no documents ({len(files)} file(s) read, "
                f"{counters['skipped_empty']} empty and {counters['skipped_malformed']} malformed records skipped so far)",
                hint=f"check the files and `text_key` ({source.text_key!r}) of this source",
            )


def source_fingerprint(cfg: DataConfig, base_dir: Path) -> list[dict[str, Any]]:
    """What identifies the inputs, so a stage can tell when they changed.

    Local sources: one entry per file with path, size and mtime_ns. Hub sources: repo, subset,
    split, limit and the commit sha (`revision`, None when it cannot be resolved).
    """
    out: list[dict[str, Any]] = []
    for index, source in enumerate(cfg.sources):
        if source.is_hub:
            repo, revision, _ = _parse_hub_path(source.path)
            out.append(
                {
                    "repo": repo,
                    "subset": source.subset,
                    "split": source.split,
                    "limit": source.limit,
                    "revision": _resolve_revision(repo, revision),
                }
            )
            continue
        files = _resolve_files(source, Path(base_dir), index)
        entry_files = []
        for f in files:
            assert f.local is not None, f
            st = f.local.stat()
            entry_files.append({"path": f.display, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        out.append({"path": source.path, "limit": source.limit, "files": entry_files})
    return out


def detect_format(name: str) -> str | None:
    """The format implied by a file name's extension, or None."""
    lower = name.lower()
    for fmt, suffixes in _SUFFIXES.items():
        if lower.endswith(suffixes):
            return fmt
    return None


# ---------------------------------------------------------------------------------------------
# finding files


def _file_format(name: str, source: SourceConfig, where: str) -> str:
    if source.format != "auto":
        return source.format
    fmt = detect_format(name)
    if fmt is None:
        raise InputError(
            f"{where}: cannot tell the format of {name} from its extension",
            hint="set `format: jsonl|parquet|text` on this source, or rename the file "
            "(.jsonl, .jsonl.gz, .jsonl.zst, .parquet, .txt)",
        )
    return fmt


def _wanted_in_folder(name: str, source: SourceConfig) -> bool:
    if Path(name).name.startswith("."):
        return False
    fmt = detect_format(name)
    return fmt is not None and (source.format == "auto" or fmt == source.format)


def _resolve_files(
    source: SourceConfig, base_dir: Path, index: int, key: str = "data.sources"
) -> list[_File]:
    """The files of one source; `key` names the sources list in error messages (sft: sft.data.sources)."""
    if source.is_hub:
        return _resolve_hub_files(source, index, key)
    where = f"{key}[{index}].path"
    raw = os.path.expanduser(source.path)
    full = raw if os.path.isabs(raw) else str(base_dir / raw)
    if _GLOB_CHARS.search(raw):
        paths = [Path(p) for p in sorted(globlib.glob(full, recursive=True)) if os.path.isfile(p)]
        explicit = True
    elif os.path.isdir(full):
        paths = sorted(p for p in Path(full).rglob("*") if p.is_file() and _wanted_in_folder(p.name, source))
        explicit = False
    elif os.path.isfile(full):
        paths = [Path(full)]
        explicit = True
    else:
        raise InputError(
            f"{where}: {source.path} does not exist (looked in {base_dir.resolve()})",
            hint="paths are relative to the project folder; check the spelling or use a glob like raw/*.jsonl.gz",
        )
    if not paths:
        what = "no files match" if explicit else "no .jsonl/.jsonl.gz/.jsonl.zst/.parquet/.txt files in"
        raise InputError(f"{where}: {what} {source.path}", hint="check the path and the file extensions")
    files = []
    for p in paths:
        display = _display_path(p, base_dir)
        files.append(_File(display, p, None, _file_format(p.name, source, where)))
    return files


def _display_path(p: Path, base_dir: Path) -> str:
    try:
        return p.resolve().relative_to(base_dir.resolve()).as_posix()
    except ValueError:
        return p.as_posix()


# ---------------------------------------------------------------------------------------------
# hub sources


def _parse_hub_path(path: str) -> tuple[str, str | None, str | None]:
    """'hf://datasets/org/name@rev/some/glob' -> ('org/name', 'rev', 'some/glob')."""
    parts = path[len(HF_DATASETS_PREFIX) :].strip("/").split("/")
    org, name_rev, rest = parts[0], parts[1], "/".join(parts[2:]) or None
    name, _, revision = name_rev.partition("@")
    return f"{org}/{name}", revision or None, rest


def _hub_offline_set() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@functools.cache
def hub_unreachable() -> str | None:
    """Why the hub cannot be reached (one TCP connect to its endpoint), or None when it can. Behind a
    proxy the direct connect proves nothing, so it is not tried there."""
    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=_PROBE_SECONDS).close()
    except OSError as e:
        return f"{host}:{port}: {e.strerror or e}"
    return None


def _offline() -> bool:
    """HF_HUB_OFFLINE=1, or a hub that cannot be reached: either way only the local cache is read."""
    return _hub_offline_set() or hub_unreachable() is not None


def _cached_snapshot(repo: str, revision: str | None) -> tuple[Path, str] | None:
    """(snapshot folder, commit sha) of `repo` in the local HF cache, or None when not cached."""
    from huggingface_hub import constants

    storage = Path(constants.HF_HUB_CACHE) / ("datasets--" + repo.replace("/", "--"))
    revision = revision or "main"
    sha = revision
    ref = storage / "refs" / revision
    if ref.is_file():
        sha = ref.read_text().strip()
    snapshot = storage / "snapshots" / sha
    return (snapshot, sha) if snapshot.is_dir() else None


def _resolve_revision(repo: str, revision: str | None) -> str | None:
    if _offline():
        cached = _cached_snapshot(repo, revision)
        return cached[1] if cached else None
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(repo, revision=revision).sha
    except Exception:  # network trouble must not break fingerprinting; the read reports it properly
        return None


def _select_data_files(
    all_files: list[str], readme: str | None, source: SourceConfig, where: str
) -> list[str]:
    """The repo files for `subset`/`split`, following the README `configs:` convention of the hub."""
    configs = _readme_configs(readme)
    if configs:
        names = [c.get("config_name", "default") for c in configs]
        wanted = source.subset or (
            "default" if "default" in names else (names[0] if len(names) == 1 else None)
        )
        if wanted is None or wanted not in names:
            raise InputError(
                f"{where}: subset {source.subset!r} not found; this dataset has: {', '.join(names)}",
                hint="set `subset:` on this source to one of those names",
            )
        config = configs[names.index(wanted)]
        patterns = _patterns_for_split(config.get("data_files"), source.split, where, wanted)
        return sorted({f for f in all_files for p in patterns if fnmatch.fnmatch(f, p)})
    if source.subset is not None:
        raise InputError(
            f"{where}: this dataset declares no subsets (no `configs:` in its README), got subset {source.subset!r}",
            hint="remove `subset:`, or give the folder inside the repo in `path` (hf://datasets/org/name/<folder>/*)",
        )
    data = [f for f in all_files if detect_format(f) is not None]
    if source.split is not None:
        split_re = re.compile(rf"(^|[/_.-]){re.escape(source.split)}([/_.-]|$)")
        data = [f for f in data if split_re.search(f)]
    return data


def _readme_configs(readme: str | None) -> list[dict[str, Any]]:
    if not readme or not readme.startswith("---"):
        return []
    from llmctl.config.loading import safe_yaml_load

    end = readme.find("\n---", 3)
    try:
        meta = safe_yaml_load(readme[3:end], "README.md") if end > 0 else None
    except ConfigError:  # a dataset card we cannot parse declares no configs
        return []
    configs = meta.get("configs") if isinstance(meta, dict) else None
    return [c for c in configs if isinstance(c, dict)] if isinstance(configs, list) else []


def _patterns_for_split(data_files: Any, split: str | None, where: str, subset: str) -> list[str]:
    if data_files is None:
        return ["**"]
    if isinstance(data_files, str):
        data_files = [data_files]
    entries: dict[str, list[str]] = {}
    for item in data_files:
        if isinstance(item, str):
            entries.setdefault("train", []).append(item)
        elif isinstance(item, dict):
            paths = item.get("path", [])
            entries.setdefault(item.get("split", "train"), []).extend(
                [paths] if isinstance(paths, str) else paths
            )
    if split is None:
        return [p for ps in entries.values() for p in ps]
    if split not in entries:
        raise InputError(
            f"{where}: split {split!r} not in subset {subset!r}; it has: {', '.join(entries)}",
            hint="set `split:` to one of those",
        )
    return entries[split]


def _resolve_hub_files(source: SourceConfig, index: int, key: str = "data.sources") -> list[_File]:
    where = f"{key}[{index}]"
    repo, revision, inner = _parse_hub_path(source.path)
    if _offline():
        cached = _cached_snapshot(repo, revision)
        if cached is None:
            why = (
                "HF_HUB_OFFLINE=1"
                if _hub_offline_set()
                else f"the hub cannot be reached ({hub_unreachable()})"
            )
            raise InputError(
                f"{where}: hub dataset {repo} is not in the local Hugging Face cache and {why}",
                hint=_offline_hint(repo),
            )
        snapshot, _ = cached
        all_files = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
        readme_path = snapshot / "README.md"
        readme = readme_path.read_text(encoding="utf-8", errors="replace") if readme_path.is_file() else None
    else:
        from huggingface_hub import HfApi, hf_hub_download

        try:
            all_files = sorted(HfApi().list_repo_files(repo, repo_type="dataset", revision=revision))
            readme = None
            if "README.md" in all_files:
                readme = Path(
                    hf_hub_download(repo, "README.md", repo_type="dataset", revision=revision)
                ).read_text(encoding="utf-8", errors="replace")
        except (
            Exception
        ) as e:  # the hub client raises many types (HTTP, auth, offline); all mean "cannot list"
            raise InputError(
                f"{where}: cannot list hub dataset {repo}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                hint="check the repo name and your network/token (`hf auth login`); offline: "
                + _offline_hint(repo),
            ) from e
        snapshot = None
    if inner:
        chosen = sorted(
            f for f in all_files if fnmatch.fnmatch(f, inner) or f.startswith(inner.rstrip("/") + "/")
        )
        chosen = [f for f in chosen if detect_format(f) is not None or source.format != "auto"]
    else:
        chosen = _select_data_files(all_files, readme, source, where)
    chosen = [f for f in chosen if detect_format(f) is not None or (inner and source.format != "auto")]
    if not chosen:
        raise InputError(
            f"{where}: no data files in hub dataset {repo} for subset={source.subset!r} split={source.split!r}"
            + (f" path={inner!r}" if inner else ""),
            hint="check subset/split against the dataset card",
        )
    rev = revision or "main"
    return [
        _File(
            display=f"{repo}/{f}",
            local=(snapshot / f) if snapshot is not None else None,
            hub_path=None if snapshot is not None else f"datasets/{repo}@{rev}/{f}",
            format=_file_format(f, source, where),
        )
        for f in chosen
    ]


# ---------------------------------------------------------------------------------------------
# reading files


def _open_binary(file: _File) -> IO[bytes]:
    if file.local is not None:
        return open(file.local, "rb")  # noqa: SIM115 - closed by the caller's `with`
    from huggingface_hub import HfFileSystem

    assert file.hub_path is not None, file
    return HfFileSystem().open(file.hub_path, "rb", block_size=8 * 1024 * 1024)


class _ZstdReader(io.RawIOBase):
    """Streaming zstd decompression that, unlike `ZstdDecompressor.stream_reader`, notices a
    truncated last frame (stream_reader just stops early, which would silently lose documents)."""

    def __init__(self, raw: IO[bytes]):
        import zstandard

        self._zstd = zstandard
        self._raw = raw
        self._obj = zstandard.ZstdDecompressor().decompressobj()
        self._buf = b""
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise EOFError("zstd stream ended in the middle of a frame (truncated file)")
                return 0
            while chunk:
                self._in_frame = True
                self._buf += self._obj.decompress(chunk)
                chunk = b""
                if self._obj.eof:  # a frame ended; more frames may follow (concatenated .zst files)
                    self._in_frame = False
                    chunk = self._obj.unused_data
                    self._obj = self._zstd.ZstdDecompressor().decompressobj()
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def _decompressed(raw: IO[bytes], name: str) -> IO[bytes]:
    lower = name.lower()
    if lower.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    if lower.endswith(".bz2"):
        return bz2.BZ2File(raw)  # type: ignore[return-value]
    if lower.endswith((".zst", ".zstd")):
        return io.BufferedReader(_ZstdReader(raw), buffer_size=1 << 20)  # type: ignore[return-value]
    return raw


def _corrupt(file: _File, e: BaseException) -> InputError:
    return InputError(
        f"{file.display}: cannot read file ({type(e).__name__}: {e}); it is corrupt, truncated or not "
        "compressed the way its extension says",
        hint="re-download or re-create the file"
        + ("; check that .gz files are gzip and .zst files are zstd" if file.format != "parquet" else ""),
    )


def _read_file(
    file: _File, source: SourceConfig, on_error: str, counters: dict[str, int]
) -> Iterator[Document]:
    import zstandard

    try:
        if file.format == "jsonl":
            yield from _read_jsonl(file, source, on_error, counters)
        elif file.format == "parquet":
            yield from _read_parquet(file, source, on_error, counters)
        else:
            yield from _read_text(file, counters)
    except (gzip.BadGzipFile, EOFError, zstandard.ZstdError, OSError) as e:
        if isinstance(e, FileNotFoundError | PermissionError):
            raise InputError(
                f"{file.display}: {e.strerror}", hint="check the path and its permissions"
            ) from e
        raise _corrupt(file, e) from e


def _bad_record(
    file: _File, line_no: int, message: str, on_error: str, counters: dict[str, int], hint: str
) -> None:
    if on_error == "skip":
        counters["skipped_malformed"] += 1
        return
    raise InputError(f"{file.display}:{line_no}: {message}", hint=hint)


def _make_document(
    record: Any,
    file: _File,
    line_no: int,
    source: SourceConfig,
    on_error: str,
    counters: dict[str, int],
    unit: str,
) -> Document | None:
    if not isinstance(record, dict):
        _bad_record(
            file, line_no, f"expected a JSON object, got {type(record).__name__}", on_error, counters,
            hint="each line must be one JSON object like {\"text\": \"...\"}; or set data.on_error=skip",
        )  # fmt: skip
        return None
    text = record.pop(source.text_key, None)
    if text is None:
        keys = ", ".join(repr(k) for k in record) or "none"
        _bad_record(
            file, line_no, f"no text key {source.text_key!r} (keys present: {keys})", on_error, counters,
            hint="set `text_key` on this source to the key holding the text; or set data.on_error=skip",
        )  # fmt: skip
        return None
    if not isinstance(text, str):
        _bad_record(
            file, line_no, f"{source.text_key!r} is a {type(text).__name__}, not a string", on_error, counters,
            hint="point `text_key` at a string field; or set data.on_error=skip",
        )  # fmt: skip
        return None
    if not text:
        counters["skipped_empty"] += 1
        return None
    doc_id = record.pop(source.id_key, None)
    doc_id = f"{file.display}/{unit}{line_no}" if doc_id is None else str(doc_id)
    metadata = record.pop("metadata", None)
    if not isinstance(metadata, dict):
        metadata = {} if metadata is None else {"metadata": metadata}
    # like datatrove's default adapter: every other field travels in metadata (url, language, ...)
    metadata.update(record)
    return Document(text=text, id=doc_id, metadata=metadata)


def _magic_hint(file: _File) -> str | None:
    """A note when a file named plain .jsonl is in fact compressed (a common mix-up)."""
    if file.local is None or file.local.name.lower().endswith((".gz", ".zst", ".zstd")):
        return None
    with open(file.local, "rb") as f:
        head = f.read(4)
    if head.startswith(_GZIP_MAGIC):
        return "the file is gzip-compressed: rename it to .jsonl.gz"
    if head.startswith(_ZSTD_MAGIC):
        return "the file is zstd-compressed: rename it to .jsonl.zst"
    return None


def _read_jsonl(
    file: _File, source: SourceConfig, on_error: str, counters: dict[str, int]
) -> Iterator[Document]:
    with _open_binary(file) as raw, _decompressed(raw, file.display) as f:
        for line_no, line in enumerate(io.BufferedReader(f, buffer_size=1 << 20), start=1):  # type: ignore[arg-type]
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                if line_no == 1 and (magic := _magic_hint(file)):
                    raise InputError(f"{file.display}:1: not JSON ({magic})", hint=magic) from e
                _bad_record(
                    file, line_no, f"malformed JSON ({e})", on_error, counters,
                    hint="fix or remove that line, or set data.on_error=skip to skip and count such lines",
                )  # fmt: skip
                continue
            doc = _make_document(record, file, line_no, source, on_error, counters, unit="")
            if doc is not None:
                yield doc


def _read_parquet(
    file: _File, source: SourceConfig, on_error: str, counters: dict[str, int]
) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _open_binary(file) as raw:
        try:
            pf = pq.ParquetFile(raw)
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
            raise _corrupt(file, e) from e
        columns = pf.schema_arrow.names
        if source.text_key not in columns:
            raise InputError(
                f"{file.display}: no text column {source.text_key!r} (columns: {', '.join(columns)})",
                hint="set `text_key` on this source to the column holding the text",
            )
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
                for record in batch.to_pylist():
                    row += 1
                    doc = _make_document(record, file, row, source, on_error, counters, unit="")
                    if doc is not None:
                        yield doc
        except (pa.ArrowInvalid, pa.ArrowIOError) as e:
            raise _corrupt(file, e) from e


def _read_text(file: _File, counters: dict[str, int]) -> Iterator[Document]:
    with _open_binary(file) as raw, _decompressed(raw, file.display) as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(
            f"{file.display}: not UTF-8 text (byte {e.start})", hint="convert the file to UTF-8"
        ) from e
    if not text.strip():
        counters["skipped_empty"] += 1
        return
    yield Document(text=text, id=file.display, metadata={})
