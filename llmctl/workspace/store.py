"""The artifact store: versioned, immutable artifacts published atomically, and references to them.

Layout under the workspace folder:
    artifacts/<stage>/v0001/manifest.json   published artifacts (immutable; manifest written last)
    runs/<stage>/<run-name>/run.json        a run in progress, failed, interrupted or kept for resume
    runs/<stage>/<run-name>/output/         what becomes the artifact, renamed into artifacts/ at publish
    runs/<stage>/<run-name>/checkpoints/    resumable state (needed by --resume until published)
    artifacts/<stage>/.last_version         the highest version ever allocated: ids are never reused
    .lock                                   flock'd while allocating a version, so two processes
                                            publishing at once never get the same number
    .locks/<stage>-<key>.lock               flock'd from the up-to-date check to publish, so two
                                            identical runs at once publish once
    .cache/file-hashes.json                 sha256 per file, keyed by size/mtime (see integrity.py)

A run killed at any moment leaves at most a folder under runs/, which never resolves as an artifact;
`llmctl artifacts ls` shows it as incomplete and `llmctl artifacts clean` removes it.

References: `STAGE:latest`, `STAGE:vN` / `STAGE:N`, `latest` (for a consumer of some kinds: the
newest of those kinds in pipeline order, i.e. the newest artifact of the last stage that has one;
without kinds: the most recently published), or a path to an artifact folder. Resolving checks the
artifact's files against its manifest (integrity.py). A version folder whose manifest is missing or unreadable is listed as corrupt, and
`latest` refuses to resolve past it rather than silently picking an older artifact.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from llmctl.errors import InputError
from llmctl.faults import fault_point
from llmctl.workspace.integrity import (
    HashCache,
    check_artifact,
    folder_content_sha256,
    records_content_sha256,
)
from llmctl.workspace.manifest import MANIFEST_FILE, InputRecord, Manifest, file_sha256, now_iso

RUN_FILE = "run.json"
# Where a stage keeps resumable state inside its run folder (the same name as train.checkpoint's).
CHECKPOINTS_DIR = "checkpoints"
LAST_VERSION_FILE = ".last_version"
_VERSION_DIR = re.compile(r"^v(\d{4,})$")
_DELETING_DIR = re.compile(r"^\.deleting-v(\d{4,})-")


@dataclass(frozen=True)
class Artifact:
    """A published artifact: its folder and its parsed manifest."""

    path: Path
    manifest: Manifest

    @property
    def id(self) -> str:
        return self.manifest.id

    @property
    def stage(self) -> str:
        return self.manifest.stage

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def version(self) -> int:
        return self.manifest.version

    def manifest_sha256(self) -> str:
        return file_sha256(self.path / MANIFEST_FILE)


@dataclass(frozen=True)
class CorruptArtifact:
    """A version folder under artifacts/ whose manifest is missing or does not parse."""

    path: Path
    stage: str
    version: int
    error: str

    @property
    def id(self) -> str:
        return artifact_id(self.stage, self.version)


@dataclass(frozen=True)
class RunInfo:
    """A run folder that has not been published: running, failed, interrupted or incomplete."""

    path: Path
    stage: str
    status: str
    started_at: str
    config_hash: str | None
    error: str | None

    @property
    def output_dir(self) -> Path:
        return self.path / "output"

    @property
    def resumable(self) -> bool:
        """Holds state `--resume` continues from (a checkpoint)."""
        return any((self.path / CHECKPOINTS_DIR).glob("step_*"))


@dataclass(frozen=True)
class Leftover:
    """Something `artifacts clean` may delete: an unpublished run, the checkpoints of a published
    run, or a half-deleted artifact folder."""

    path: Path
    what: str  # "failed run", "interrupted run", ..., "published run checkpoints", "deleting leftover"
    stage: str
    bytes: int


def version_dir_name(version: int) -> str:
    return f"v{version:04d}"


def artifact_id(stage: str, version: int) -> str:
    return f"{stage}:{version_dir_name(version)}"


def load_artifact(folder: Path) -> Artifact:
    """Read an artifact folder; a folder without a valid manifest is not an artifact."""
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise InputError(
            f"{folder}: not an artifact (no {MANIFEST_FILE})",
            hint="pass a reference such as pretrain:latest, or the folder of a published artifact",
        )
    try:
        manifest = Manifest.model_validate_json(manifest_path.read_bytes())
    except (ValidationError, ValueError) as exc:
        first = str(exc).splitlines()[0]
        raise InputError(f"{manifest_path}: corrupt manifest ({first})") from None
    return Artifact(folder, manifest)


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Workspace:
    """One project's artifact store."""

    def __init__(self, root: Path, stage_order: tuple[str, ...] = ()):
        """`stage_order`: stages in pipeline order; with it, `latest` for a consumer of given kinds
        is the newest artifact of the last stage in that order that has one (see `resolve`)."""
        self.root = root
        self.stage_order = stage_order
        self.artifacts_dir = root / "artifacts"
        self.runs_dir = root / "runs"
        self.hashes = HashCache(root / ".cache" / "file-hashes.json")

    # ----------------------------------------------------------------------------- listing
    def scan(self, stage: str | None = None) -> tuple[list[Artifact], list[CorruptArtifact]]:
        """Published artifacts (oldest first within a stage) and version folders that are corrupt."""
        if not self.artifacts_dir.is_dir():
            return [], []
        stages = [stage] if stage else sorted(p.name for p in self.artifacts_dir.iterdir() if p.is_dir())
        found: list[Artifact] = []
        corrupt: list[CorruptArtifact] = []
        for name in stages:
            folder = self.artifacts_dir / name
            if not folder.is_dir():
                continue
            for child in sorted(folder.iterdir()):
                match = _VERSION_DIR.match(child.name)
                if not match or not child.is_dir():
                    continue
                try:
                    found.append(load_artifact(child))
                except InputError as exc:
                    corrupt.append(CorruptArtifact(child, name, int(match.group(1)), exc.message))
        return found, corrupt

    def artifacts(self, stage: str | None = None) -> list[Artifact]:
        """Published artifacts with a valid manifest, oldest first within a stage."""
        return self.scan(stage)[0]

    def corrupt(self, stage: str | None = None) -> list[CorruptArtifact]:
        return self.scan(stage)[1]

    def runs(self, stage: str | None = None, *, published: bool = False) -> list[RunInfo]:
        """Unpublished runs, oldest first (with `published`, also the run folders of published
        artifacts). A 'running' run whose process is gone is 'incomplete'."""
        if not self.runs_dir.is_dir():
            return []
        infos = []
        for run_json in sorted(self.runs_dir.glob(f"{stage or '*'}/*/{RUN_FILE}")):
            try:
                state = json.loads(run_json.read_text())
            except (OSError, ValueError):
                state = {"stage": run_json.parent.parent.name, "status": "incomplete"}
            status = state.get("status", "incomplete")
            if status == "published" and not published:
                continue
            if status == "running" and not (
                state.get("host") == socket.gethostname() and _pid_alive(int(state.get("pid", -1)))
            ):
                status = "incomplete" if state.get("host") == socket.gethostname() else "running?"
            infos.append(
                RunInfo(
                    path=run_json.parent,
                    stage=state.get("stage", run_json.parent.parent.name),
                    status=status,
                    started_at=state.get("started_at", ""),
                    config_hash=state.get("config_hash"),
                    error=state.get("error"),
                )
            )
        return infos

    # --------------------------------------------------------------------------- resolving
    def resolve(
        self,
        ref: str,
        *,
        kinds: tuple[str, ...] | None = None,
        stages: tuple[str, ...] | None = None,
        verify: bool = True,
    ) -> Artifact:
        """Turn a reference into an artifact, or raise InputError listing what exists.

        With `verify` (every consumer), the artifact's files are checked against its manifest."""
        artifact = self._lookup(ref.strip(), kinds, stages)
        if kinds is not None and artifact.kind not in kinds:
            raise InputError(
                f"{artifact.id} is a {artifact.kind} artifact; expected {' or '.join(kinds)}",
                hint=self._what_exists_hint(kinds),
            )
        if verify:
            self.check(artifact)
        return artifact

    def check(self, artifact: Artifact) -> None:
        """Raise InputError when a file of `artifact` changed since it was published."""
        ref = artifact.id if self.is_member(artifact) else str(artifact.path)
        check_artifact(artifact.id, artifact.path, artifact.manifest.files, self.hashes, ref)

    def _lookup(self, ref: str, kinds: tuple[str, ...] | None, stages: tuple[str, ...] | None) -> Artifact:
        if ref == "latest":
            artifacts, corrupt = self.scan()
            kind_of = {a.stage: a.kind for a in artifacts}
            candidates = [
                a
                for a in artifacts
                if (kinds is None or a.kind in kinds) and (stages is None or a.stage in stages)
            ]
            # A corrupt folder could be the newest of the wanted kind: its stage's kind is unknown
            # when it has no readable artifact, so it counts then too.
            self._refuse_corrupt(
                [
                    c
                    for c in corrupt
                    if (stages is None or c.stage in stages)
                    and (kinds is None or kind_of.get(c.stage) in (*kinds, None))
                ],
                artifacts,
                "latest",
            )
            if not candidates:
                wanted = ", ".join(kinds or stages or ("any",))
                raise InputError(
                    f"no artifact of kind {wanted} in {self.root}",
                    hint=self._what_exists_hint(),
                )
            return max(candidates, key=lambda a: self._latest_rank(a, kinds))
        match = re.fullmatch(r"([A-Za-z_][\w-]*):(latest|v?\d+)", ref)
        if match and not Path(ref).exists():
            stage, which = match.groups()
            existing, corrupt = self.scan(stage)
            if which == "latest":
                self._refuse_corrupt(corrupt, existing, ref)
                if not existing:
                    raise InputError(
                        f"unknown reference {ref!r}: no {stage} artifacts", hint=self._what_exists_hint()
                    )
                return existing[-1]
            number = int(which.lstrip("v"))
            self._refuse_corrupt([c for c in corrupt if c.version == number], [], ref)
            by_version = {a.version: a for a in existing}
            if number not in by_version:
                if not existing:
                    raise InputError(
                        f"unknown reference {ref!r}: no {stage} artifacts", hint=self._what_exists_hint()
                    )
                have = ", ".join(a.id for a in existing)
                raise InputError(f"unknown reference {ref!r}", hint=f"{stage} artifacts: {have}")
            return by_version[number]
        if "/" in ref or ref.startswith(".") or Path(ref).exists():
            return load_artifact(Path(ref).expanduser().resolve())
        raise InputError(
            f"unknown reference {ref!r}: expected latest, STAGE:latest, STAGE:vN or a path",
            hint=self._what_exists_hint(),
        )

    def _latest_rank(self, artifact: Artifact, kinds: tuple[str, ...] | None) -> tuple:
        """A consumer of given kinds takes the newest artifact in pipeline order (the last stage that
        has one, e.g. the newest model whichever training stage made it); with no kinds, `latest`
        is the most recently published artifact. Stages outside `stage_order` come before it."""
        rank = self.stage_order.index(artifact.stage) if artifact.stage in self.stage_order else -1
        by_time = (artifact.manifest.finished_at, artifact.version)
        return (rank, artifact.version) if kinds is not None and self.stage_order else (0, *by_time)

    @staticmethod
    def _refuse_corrupt(corrupt: list[CorruptArtifact], artifacts: list[Artifact], ref: str) -> None:
        """Refuse when a corrupt folder is (or may be) what `ref` means: the newest of its stage."""
        newest = {}
        for a in artifacts:
            newest[a.stage] = max(newest.get(a.stage, 0), a.version)
        blocking = [c for c in corrupt if c.version > newest.get(c.stage, 0)]
        if blocking:
            c = max(blocking, key=lambda c: c.version)
            raise InputError(
                f"{c.id} has a corrupt manifest, so {ref!r} cannot be resolved safely ({c.error})",
                hint=f"name a version explicitly, or remove it with `llmctl artifacts rm {c.id}` "
                f"(its folder: {c.path})",
            )

    def _what_exists_hint(self, kinds: tuple[str, ...] | None = None) -> str:
        artifacts = [a for a in self.artifacts() if kinds is None or a.kind in kinds]
        if not artifacts:
            return "the workspace has no matching artifacts yet; run the stage that makes one (llmctl run)"
        latest: dict[str, Artifact] = {}
        for a in artifacts:
            latest[a.stage] = a
        listing = ", ".join(f"{stage}:latest (= {a.id})" for stage, a in sorted(latest.items()))
        return f"existing: {listing}; see `llmctl artifacts ls`"

    def is_member(self, artifact: Artifact) -> bool:
        """True for an artifact published in this workspace (not a copy found elsewhere)."""
        own = self.artifacts_dir / artifact.stage / version_dir_name(artifact.version)
        return artifact.path.resolve() == own.resolve()

    def input_record(self, slot: str, ref: str, artifact: Artifact) -> InputRecord:
        """How a consumer's manifest records an input. A folder outside this workspace is recorded by
        the hash of the files it actually holds, as a copy of the artifact its manifest names."""
        if self.is_member(artifact):
            return InputRecord(
                slot=slot,
                ref=ref,
                id=artifact.id,
                kind=artifact.kind,
                manifest_sha256=artifact.manifest_sha256(),
                content_sha256=records_content_sha256(artifact.manifest.files),
            )
        content = folder_content_sha256(artifact.path, self.hashes, skip=(MANIFEST_FILE,))
        return InputRecord(
            slot=slot,
            ref=ref,
            id=f"copy:{content[:16]}",
            kind=artifact.kind,
            manifest_sha256=artifact.manifest_sha256(),
            content_sha256=content,
            copy_of=artifact.id,
            path=str(artifact.path),
        )

    def find_up_to_date(self, stage: str, config_hash: str, input_key: str) -> Artifact | None:
        """The newest artifact of `stage` made from the same config and the same inputs."""
        for artifact in reversed(self.artifacts(stage)):
            m = artifact.manifest
            if m.config_hash == config_hash and m.input_key() == input_key:
                return artifact
        return None

    # ---------------------------------------------------------------------- runs & publish
    @contextlib.contextmanager
    def lock(self, name: str = ".lock") -> Iterator[None]:
        """An exclusive, process-wide lock (flock; released if the process dies). The default is the
        workspace lock held while allocating versions; `run_lock` uses named ones."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def run_lock(self, stage: str, key: str, on_wait=None) -> Iterator[None]:
        """Held from the up-to-date check to publish, so that of two identical runs started at once
        one publishes and the other then finds its artifact. `on_wait()` is called before blocking."""
        path = self.root / ".locks" / f"{stage}-{key[:16]}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def begin_run(self, stage: str, config_hash: str, extra: dict[str, Any] | None = None) -> Path:
        """Create a fresh run folder with output/ inside; returns the run folder."""
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(2)}"
        run_dir = self.runs_dir / stage / name
        (run_dir / "output").mkdir(parents=True)
        self.write_run_state(run_dir, stage=stage, status="running", config_hash=config_hash, **(extra or {}))
        return run_dir

    def write_run_state(self, run_dir: Path, **fields: Any) -> None:
        """Update run.json (atomically: temp file + rename)."""
        path = run_dir / RUN_FILE
        state: dict[str, Any] = {}
        if path.is_file():
            with contextlib.suppress(OSError, ValueError):
                state = json.loads(path.read_text())
        state.setdefault("started_at", now_iso())
        state.update(pid=os.getpid(), host=socket.gethostname())
        state.update(fields)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, path)

    def reopen_run(self, run: RunInfo) -> Path:
        """Mark an unfinished run as running again in this process (for --resume)."""
        self.write_run_state(run.path, status="running", error=None)
        return run.path

    def _highest_version(self, stage: str) -> int:
        """The highest version of `stage` ever allocated: the high-water file, the folders (also
        corrupt and half-deleted ones), and ids other manifests name as inputs (workspaces from before
        the high-water file). Called under the workspace lock."""
        stage_dir = self.artifacts_dir / stage
        seen = [0]
        with contextlib.suppress(OSError, ValueError):
            seen.append(int((stage_dir / LAST_VERSION_FILE).read_text().strip()))
        if stage_dir.is_dir():
            for child in stage_dir.iterdir():
                if m := _VERSION_DIR.match(child.name) or _DELETING_DIR.match(child.name):
                    seen.append(int(m.group(1)))
        prefix = f"{stage}:v"
        for a in self.artifacts():
            for record in a.manifest.inputs:
                if record.id.startswith(prefix) and record.id[len(prefix) :].isdigit():
                    seen.append(int(record.id[len(prefix) :]))
        return max(seen)

    def _record_version(self, stage: str, version: int) -> None:
        stage_dir = self.artifacts_dir / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        tmp = stage_dir / f"{LAST_VERSION_FILE}.{os.getpid()}.tmp"
        tmp.write_text(f"{version}\n")
        os.replace(tmp, stage_dir / LAST_VERSION_FILE)

    def publish(self, run_dir: Path, manifest_fields: dict[str, Any]) -> Artifact:
        """Allocate the next version under the lock, write the manifest, rename output/ into place."""
        stage = manifest_fields["stage"]
        output = run_dir / "output"
        with self.lock():
            version = self._highest_version(stage) + 1
            fault_point("version-allocated")
            self._record_version(stage, version)
            manifest = Manifest(**manifest_fields, id=artifact_id(stage, version), version=version)
            tmp = output / (MANIFEST_FILE + ".tmp")
            tmp.write_text(manifest.model_dump_json(indent=2))
            os.replace(tmp, output / MANIFEST_FILE)
            final = self.artifacts_dir / stage / version_dir_name(version)
            fault_point("publish-before-rename")
            os.rename(output, final)  # the publish: atomic on one filesystem
        self.write_run_state(run_dir, status="published", artifact=manifest.id)
        # The runner has just hashed every file: seed the cache so the first consumer does not rehash.
        for record in manifest.files:
            with contextlib.suppress(OSError):
                self.hashes.remember(final / record.path, record.sha256)
        self.hashes.save()
        return Artifact(final, manifest)

    # ----------------------------------------------------------------- lineage and removal
    def dependents(self, artifact: Artifact) -> list[Artifact]:
        return [a for a in self.artifacts() if any(i.id == artifact.id for i in a.manifest.inputs)]

    def lineage(self, artifact: Artifact) -> dict[str, Any]:
        """The tree of inputs down to raw data sources. An input that was a copy given by path says
        which artifact it copied and whether its files matched that artifact's."""
        by_id = {a.id: a for a in self.artifacts()}

        def copy_node(record: InputRecord) -> dict[str, Any]:
            original = by_id.get(record.copy_of or "")
            if original is None:
                matches = None
            else:
                matches = records_content_sha256(original.manifest.files) == record.content_sha256
            return {
                "id": record.id,
                "kind": record.kind,
                "slot": record.slot,
                "copy_of": record.copy_of,
                "path": record.path,
                "original_missing": original is None,
                "matches_original": matches,
                "inputs": [],
                "sources": [],
            }

        def node(a: Artifact) -> dict[str, Any]:
            children = []
            for record in a.manifest.inputs:
                if record.copy_of is not None:
                    children.append(copy_node(record))
                    continue
                parent = by_id.get(record.id)
                if parent is None:
                    children.append(
                        {"id": record.id, "kind": record.kind, "slot": record.slot, "missing": True}
                    )
                else:
                    child = node(parent)
                    child["slot"] = record.slot
                    if parent.manifest_sha256() != record.manifest_sha256:
                        child["changed"] = True
                    children.append(child)
            return {
                "id": a.id,
                "kind": a.kind,
                "created": a.manifest.finished_at,
                "inputs": children,
                "sources": a.manifest.sources,
            }

        return node(artifact)

    def remove(self, artifact: Artifact | CorruptArtifact, *, force: bool = False) -> list[str]:
        """Delete an artifact; refuses while others depend on it unless forced. Returns dependents."""
        users = [a.id for a in self.artifacts() if any(i.id == artifact.id for i in a.manifest.inputs)]
        if users and not force:
            raise InputError(
                f"{artifact.id} is an input of {', '.join(users)}",
                hint=f"remove those first, or `llmctl artifacts rm {artifact.id} --force`",
            )
        stage = artifact.path.parent.name
        version = int(artifact.path.name.lstrip("v"))
        with self.lock():  # workspaces from before the high-water file learn it before the folder goes
            self._record_version(stage, max(self._highest_version(stage), version))
        # Rename first so a half-deleted folder never looks like an artifact.
        trash = artifact.path.with_name(f".deleting-{artifact.path.name}-{secrets.token_hex(3)}")
        os.rename(artifact.path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        return users

    def find_corrupt(self, ref: str) -> CorruptArtifact | None:
        """The corrupt folder a STAGE:vN reference names, if it is one (so it can be removed)."""
        match = re.fullmatch(r"([A-Za-z_][\w-]*):v?(\d+)", ref.strip())
        if not match:
            return None
        stage, number = match.group(1), int(match.group(2))
        return next((c for c in self.corrupt(stage) if c.version == number), None)

    # ----------------------------------------------------------------------------- cleaning
    def leftovers(self, stage: str | None = None, *, resumable: bool = False) -> list[Leftover]:
        """What `artifacts clean` removes: failed, interrupted and incomplete runs (not those `--resume`
        can continue, unless `resumable`), checkpoints of published runs, and half-deleted artifact
        folders. Never a live run, never a published artifact."""
        items = []
        for run in self.runs(stage, published=True):
            if run.status in ("running", "running?"):
                continue
            if run.status == "published":
                for name in (CHECKPOINTS_DIR, "scratch"):
                    if (run.path / name).is_dir():
                        what = (
                            "published run checkpoints"
                            if name == CHECKPOINTS_DIR
                            else "published run scratch"
                        )
                        items.append(
                            Leftover(run.path / name, what, run.stage, folder_bytes(run.path / name))
                        )
            elif resumable or not run.resumable:
                items.append(Leftover(run.path, f"{run.status} run", run.stage, folder_bytes(run.path)))
        if self.artifacts_dir.is_dir():
            for folder in sorted(self.artifacts_dir.glob(f"{stage or '*'}/.deleting-*")):
                items.append(Leftover(folder, "deleting leftover", folder.parent.name, folder_bytes(folder)))
        return items

    def clean(self, items: list[Leftover]) -> list[Leftover]:
        """Remove the given leftovers (as listed by `leftovers`); returns those removed."""
        removed = []
        for item in items:
            if item.path.is_dir():
                shutil.rmtree(item.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    item.path.unlink()
            if not item.path.exists():
                removed.append(item)
        return removed
