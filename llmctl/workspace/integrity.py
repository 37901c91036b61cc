"""File integrity: check an artifact's files against the sha256 its manifest recorded at publish.

Every consumer reaches an artifact through `Workspace.resolve`, which calls `check_artifact`, so a
file edited after publishing fails loudly instead of silently changing results. Hashing a model or a
token shard on every load would cost seconds, so hashes are cached per file, keyed by
(size, mtime, ctime, inode): any write changes mtime and ctime, and ctime cannot be set back by
`touch`. The cache lives in `<workspace>/.cache/file-hashes.json` and is seeded at publish, when
the runner has just hashed every file anyway.

    problems = verify_files(artifact.path, artifact.manifest.files, cache)
    check_artifact(artifact.id, artifact.path, artifact.manifest.files, cache)  # raises InputError

`LLMCTL_NO_VERIFY=1` skips the check, for people who edit artifacts on purpose.

An artifact may hold derived caches under `DERIVED_DIR` (e.g. eval's decontamination index of a
corpus), written after publishing: they are not in the manifest, so verification never looks at them,
and content hashes skip them, so a cache never changes what an artifact is. Whoever writes one names
it by the content it was derived from and writes it atomically (temp name, then rename).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from llmctl.errors import InputError
from llmctl.workspace.manifest import FileRecord, file_sha256, stable_hash

NO_VERIFY_ENV = "LLMCTL_NO_VERIFY"
DERIVED_DIR = ".derived"


def verification_disabled() -> bool:
    return os.environ.get(NO_VERIFY_ENV, "").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class FileProblem:
    """One file that does not match its manifest record."""

    path: str  # relative to the artifact folder
    problem: str  # "missing" | "modified"
    expected_sha256: str
    actual_sha256: str | None = None

    def describe(self) -> str:
        if self.problem == "missing":
            return f"{self.path}: missing"
        assert self.actual_sha256 is not None, self
        return (
            f"{self.path}: modified (sha256 {self.actual_sha256[:12]}…, "
            f"manifest says {self.expected_sha256[:12]}…)"
        )


class HashCache:
    """sha256 of files, remembered while a file's (size, mtime, ctime, inode) stay the same."""

    def __init__(self, path: Path):
        self.path = path
        self._entries: dict[str, list] | None = None
        self._dirty = False

    def _load(self) -> dict[str, list]:
        if self._entries is None:
            try:
                loaded = json.loads(self.path.read_text())
                self._entries = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self._entries = {}  # a missing or damaged cache only costs a rehash
        return self._entries

    @staticmethod
    def _stamp(stat: os.stat_result) -> list[int]:
        return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]

    def sha256(self, file: Path, *, rehash: bool = False) -> str:
        key = str(file.absolute())
        stamp = self._stamp(file.stat())
        entry = self._load().get(key)
        if not rehash and isinstance(entry, list) and entry[:4] == stamp:
            return entry[4]
        digest = file_sha256(file)
        self.remember(file, digest, stamp)
        return digest

    def remember(self, file: Path, sha256: str, stamp: list[int] | None = None) -> None:
        stamp = stamp if stamp is not None else self._stamp(file.stat())
        self._load()[str(file.absolute())] = [*stamp, sha256]
        self._dirty = True

    def save(self) -> None:
        """Write the cache (temp file + rename; a concurrent writer's entries may be lost, which only
        costs a rehash). Entries of files that no longer exist are dropped."""
        if not self._dirty or self._entries is None:
            return
        entries = {k: v for k, v in self._entries.items() if os.path.exists(k)}
        with contextlib.suppress(OSError):  # a read-only workspace still verifies, just uncached
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(entries, separators=(",", ":")))
            os.replace(tmp, self.path)
        self._dirty = False


def verify_files(
    folder: Path, records: Iterable[FileRecord], cache: HashCache, *, rehash: bool = False
) -> list[FileProblem]:
    """The files of `folder` that are missing or differ from their records."""
    problems = []
    for record in records:
        file = folder / record.path
        if not file.is_file():
            problems.append(FileProblem(record.path, "missing", record.sha256))
            continue
        actual = cache.sha256(file, rehash=rehash)
        if actual != record.sha256:
            problems.append(FileProblem(record.path, "modified", record.sha256, actual))
    cache.save()
    return problems


def check_artifact(
    artifact_id: str, folder: Path, records: list[FileRecord], cache: HashCache, ref: str | None = None
) -> None:
    """Raise InputError naming the first file that does not match the manifest (unless disabled).
    `ref` is how to name the artifact on the command line (its id, or its folder for a copy)."""
    if verification_disabled():
        return
    problems = verify_files(folder, records, cache)
    if not problems:
        return
    first = problems[0]
    more = f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else ""
    what = "is missing" if first.problem == "missing" else "was modified after publishing"
    raise InputError(
        f"{folder / first.path}: {what}; it no longer matches the manifest of {artifact_id}{more}",
        hint=f"`llmctl artifacts verify {ref or artifact_id}` lists every changed file; re-create the "
        f"artifact by running its stage again, or set {NO_VERIFY_ENV}=1 to use the edited files anyway",
    )


def content_sha256(files: Iterable[tuple[str, str]]) -> str:
    """One hash for a folder's content: its (relative path, sha256) pairs, in path order."""
    return stable_hash(sorted(files))


def records_content_sha256(records: Iterable[FileRecord]) -> str:
    return content_sha256((r.path, r.sha256) for r in records)


def folder_content_sha256(folder: Path, cache: HashCache, skip: tuple[str, ...] = ()) -> str:
    """The content hash of the files actually in `folder` (not what a manifest inside claims)."""
    pairs = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = file.relative_to(folder).as_posix()
        if rel not in skip and not rel.startswith(f"{DERIVED_DIR}/"):
            pairs.append((rel, cache.sha256(file)))
    cache.save()
    return content_sha256(pairs)
