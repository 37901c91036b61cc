"""The artifact store: versioned, immutable artifacts published atomically, and references to them.

Layout under the workspace folder:
    artifacts/<stage>/v0001/manifest.json   published artifacts (immutable; manifest written last)
    runs/<stage>/<run-name>/run.json        a run in progress, failed, interrupted or kept for resume
    runs/<stage>/<run-name>/output/         what becomes the artifact, renamed into artifacts/ at publish
    .lock                                   flock'd while allocating a version, so two processes
                                            publishing at once never get the same number

A run killed at any moment leaves at most a folder under runs/, which never resolves as an artifact;
`llmctl artifacts ls` shows it as incomplete and `llmctl artifacts clean` removes it.

References: `STAGE:latest`, `STAGE:vN` / `STAGE:N`, `latest` (newest among the kinds a consumer
accepts), or a path to an artifact folder.
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
from llmctl.workspace.manifest import MANIFEST_FILE, Manifest, now_iso

RUN_FILE = "run.json"
_VERSION_DIR = re.compile(r"^v(\d{4,})$")


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
        from llmctl.workspace.manifest import file_sha256

        return file_sha256(self.path / MANIFEST_FILE)


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

    def __init__(self, root: Path):
        self.root = root
        self.artifacts_dir = root / "artifacts"
        self.runs_dir = root / "runs"

    # ----------------------------------------------------------------------------- listing
    def artifacts(self, stage: str | None = None) -> list[Artifact]:
        """Published artifacts, oldest first within a stage; corrupt folders are skipped."""
        if not self.artifacts_dir.is_dir():
            return []
        stages = [stage] if stage else sorted(p.name for p in self.artifacts_dir.iterdir() if p.is_dir())
        found = []
        for name in stages:
            folder = self.artifacts_dir / name
            if not folder.is_dir():
                continue
            for child in sorted(folder.iterdir()):
                if _VERSION_DIR.match(child.name) and (child / MANIFEST_FILE).is_file():
                    with contextlib.suppress(InputError):
                        found.append(load_artifact(child))
        return found

    def runs(self, stage: str | None = None) -> list[RunInfo]:
        """Unpublished runs, oldest first. A 'running' run whose process is gone is 'incomplete'."""
        if not self.runs_dir.is_dir():
            return []
        infos = []
        for run_json in sorted(self.runs_dir.glob(f"{stage or '*'}/*/{RUN_FILE}")):
            try:
                state = json.loads(run_json.read_text())
            except (OSError, ValueError):
                state = {"stage": run_json.parent.parent.name, "status": "incomplete"}
            status = state.get("status", "incomplete")
            if status == "published":
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
        self, ref: str, *, kinds: tuple[str, ...] | None = None, stages: tuple[str, ...] | None = None
    ) -> Artifact:
        """Turn a reference into an artifact, or raise InputError listing what exists."""
        ref = ref.strip()
        if ref == "latest":
            candidates = [
                a
                for a in self.artifacts()
                if (kinds is None or a.kind in kinds) and (stages is None or a.stage in stages)
            ]
            if not candidates:
                wanted = ", ".join(kinds or stages or ("any",))
                raise InputError(
                    f"no artifact of kind {wanted} in {self.root}",
                    hint=self._what_exists_hint(),
                )
            return max(candidates, key=lambda a: (a.manifest.finished_at, a.version))
        match = re.fullmatch(r"([A-Za-z_][\w-]*):(latest|v?\d+)", ref)
        if match and not Path(ref).exists():
            stage, which = match.groups()
            existing = self.artifacts(stage)
            if not existing:
                raise InputError(
                    f"unknown reference {ref!r}: no {stage} artifacts", hint=self._what_exists_hint()
                )
            if which == "latest":
                artifact = existing[-1]
            else:
                number = int(which.lstrip("v"))
                by_version = {a.version: a for a in existing}
                if number not in by_version:
                    have = ", ".join(a.id for a in existing)
                    raise InputError(f"unknown reference {ref!r}", hint=f"{stage} artifacts: {have}")
                artifact = by_version[number]
        elif "/" in ref or ref.startswith(".") or Path(ref).exists():
            artifact = load_artifact(Path(ref).expanduser().resolve())
        else:
            raise InputError(
                f"unknown reference {ref!r}: expected latest, STAGE:latest, STAGE:vN or a path",
                hint=self._what_exists_hint(),
            )
        if kinds is not None and artifact.kind not in kinds:
            raise InputError(
                f"{artifact.id} is a {artifact.kind} artifact; expected {' or '.join(kinds)}",
                hint=self._what_exists_hint(kinds),
            )
        return artifact

    def _what_exists_hint(self, kinds: tuple[str, ...] | None = None) -> str:
        artifacts = [a for a in self.artifacts() if kinds is None or a.kind in kinds]
        if not artifacts:
            return "the workspace has no matching artifacts yet; run the stage that makes one (llmctl run)"
        latest: dict[str, Artifact] = {}
        for a in artifacts:
            latest[a.stage] = a
        listing = ", ".join(f"{stage}:latest (= {a.id})" for stage, a in sorted(latest.items()))
        return f"existing: {listing}; see `llmctl artifacts ls`"

    def find_up_to_date(self, stage: str, config_hash: str, input_key: str) -> Artifact | None:
        """The newest artifact of `stage` made from the same config and the same inputs."""
        for artifact in reversed(self.artifacts(stage)):
            m = artifact.manifest
            if m.config_hash == config_hash and m.input_key() == input_key:
                return artifact
        return None

    # ---------------------------------------------------------------------- runs & publish
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive, process-wide lock on the workspace (flock; released if the process dies)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as handle:
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

    def publish(self, run_dir: Path, manifest_fields: dict[str, Any]) -> Artifact:
        """Allocate the next version under the lock, write the manifest, rename output/ into place."""
        stage = manifest_fields["stage"]
        output = run_dir / "output"
        with self.lock():
            stage_dir = self.artifacts_dir / stage
            stage_dir.mkdir(parents=True, exist_ok=True)
            used = [int(m.group(1)) for p in stage_dir.iterdir() if (m := _VERSION_DIR.match(p.name))]
            version = max(used, default=0) + 1
            manifest = Manifest(**manifest_fields, id=artifact_id(stage, version), version=version)
            tmp = output / (MANIFEST_FILE + ".tmp")
            tmp.write_text(manifest.model_dump_json(indent=2))
            os.replace(tmp, output / MANIFEST_FILE)
            final = stage_dir / version_dir_name(version)
            os.rename(output, final)  # the publish: atomic on one filesystem
        self.write_run_state(run_dir, status="published", artifact=manifest.id)
        return Artifact(final, manifest)

    # ----------------------------------------------------------------- lineage and removal
    def dependents(self, artifact: Artifact) -> list[Artifact]:
        return [a for a in self.artifacts() if any(i.id == artifact.id for i in a.manifest.inputs)]

    def lineage(self, artifact: Artifact) -> dict[str, Any]:
        """The tree of inputs down to raw data sources."""
        by_id = {a.id: a for a in self.artifacts()}

        def node(a: Artifact) -> dict[str, Any]:
            children = []
            for record in a.manifest.inputs:
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

    def remove(self, artifact: Artifact, *, force: bool = False) -> list[str]:
        """Delete an artifact; refuses while others depend on it unless forced. Returns dependents."""
        users = [a.id for a in self.dependents(artifact)]
        if users and not force:
            raise InputError(
                f"{artifact.id} is an input of {', '.join(users)}",
                hint=f"remove those first, or `llmctl artifacts rm {artifact.id} --force`",
            )
        # Rename first so a half-deleted folder never looks like an artifact.
        trash = artifact.path.with_name(f".deleting-{artifact.path.name}-{secrets.token_hex(3)}")
        os.rename(artifact.path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        return users

    def clean_runs(self, stage: str | None = None) -> list[RunInfo]:
        """Remove failed, interrupted and incomplete runs (never one that is still running)."""
        removed = []
        for run in self.runs(stage):
            if run.status in ("running", "running?"):
                continue
            shutil.rmtree(run.path, ignore_errors=True)
            removed.append(run)
        return removed
