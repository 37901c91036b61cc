"""Run one stage: resolve inputs, reuse an up-to-date artifact, or run and publish a new version.

    outcome = run_stage("dedup", project, project_dir, reporter=reporter)
    outcome.artifact.id   # 'dedup:v0002'
    outcome.reused        # True when the same config and inputs already produced an artifact

The stage works in a run folder; only a run that returns normally is published (atomic rename).
An exception marks the run failed, Ctrl-C/SIGTERM marks it interrupted; neither leaves an artifact.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl import __version__
from llmctl.errors import ConfigError, InputError, Interrupted, LlmctlError
from llmctl.reporting import Reporter
from llmctl.stages.context import StageContext
from llmctl.stages.registry import STAGES, Stage
from llmctl.workspace.manifest import (
    MANIFEST_FILE,
    FileRecord,
    InputRecord,
    environment_info,
    file_sha256,
    inputs_key,
    now_iso,
    stable_hash,
)
from llmctl.workspace.store import Artifact, Workspace


@dataclass(frozen=True)
class StageOutcome:
    artifact: Artifact
    reused: bool
    seconds: float


def workspace_for(project: Any, project_dir: Path) -> Workspace:
    root = Path(project.workspace)
    return Workspace(root if root.is_absolute() else project_dir / root)


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise InputError(f"unknown stage {name!r}", hint=f"stages: {', '.join(STAGES)}")
    return STAGES[name]


def resolve_inputs(
    stage: Stage, workspace: Workspace, refs: dict[str, str], section: Any = None
) -> tuple[dict[str, Artifact | None], list[tuple[str, str]]]:
    """Explicit refs win, then a reference in the stage's config section (slot.config_key), then the
    newest artifact of the first default stage that has one."""
    unknown = set(refs) - {slot.name for slot in stage.inputs}
    assert not unknown, f"{stage.name} has no input slot(s) {sorted(unknown)}"
    resolved: dict[str, Artifact | None] = {}
    used_refs: list[tuple[str, str]] = []
    for slot in stage.inputs:
        ref = refs.get(slot.name)
        if ref is None and slot.config_key and section is not None:
            ref = getattr(section, slot.config_key, None)
        if ref is None:
            ref = next((f"{s}:latest" for s in slot.default_stages if workspace.artifacts(s)), None)
        if ref is None:
            if slot.required and not slot.sources_fallback:
                makers = " or ".join(f"`llmctl {s}`" for s in slot.default_stages) or "an earlier stage"
                raise InputError(
                    f"{stage.name} needs a {'/'.join(slot.kinds)} artifact ({slot.name}) and none exists",
                    hint=f"run {makers} first, or pass a reference",
                )
            resolved[slot.name] = None
            continue
        resolved[slot.name] = workspace.resolve(ref, kinds=slot.kinds)
        used_refs.append((slot.name, ref))
    return resolved, used_refs


def _uses_sources(stage: Stage, inputs: dict[str, Artifact | None]) -> bool:
    return stage.reads_sources or any(
        slot.sources_fallback and inputs.get(slot.name) is None for slot in stage.inputs
    )


def config_snapshot(
    stage: Stage, project: Any, uses_sources: bool, options: dict[str, Any] | None
) -> dict[str, Any]:
    """The config a stage's output depends on: its sections, data sources if read, CLI options."""
    sections = list(stage.sections)
    if uses_sources and "data" not in sections:
        sections.append("data")
    snapshot: dict[str, Any] = {}
    for name in sections:
        section = getattr(project, name, None)
        if section is None:
            raise ConfigError(
                f"llmctl.yaml: {stage.name} needs a `{name}:` section",
                hint=f"add `{name}:` to llmctl.yaml (see `llmctl config schema`)",
            )
        snapshot[name] = section.model_dump(mode="json")
    if options:
        snapshot["options"] = options
    return snapshot


def _git_commit(project_dir: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(project_dir), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _file_records(folder: Path) -> list[FileRecord]:
    records = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST_FILE:
            continue
        records.append(FileRecord(path=rel, bytes=path.stat().st_size, sha256=file_sha256(path)))
    return records


@dataclass(frozen=True)
class StagePlan:
    """A stage with its inputs resolved and its identity (config hash, input key) computed."""

    stage: Stage
    workspace: Workspace
    inputs: dict[str, Artifact | None]
    input_records: list[InputRecord]
    sources: list[dict[str, Any]]
    config: dict[str, Any]
    config_hash: str
    input_key: str

    def up_to_date(self) -> Artifact | None:
        return self.workspace.find_up_to_date(self.stage.name, self.config_hash, self.input_key)


def plan_stage(
    name: str,
    project: Any,
    project_dir: Path,
    *,
    refs: dict[str, str] | None = None,
    options: dict[str, Any] | None = None,
) -> StagePlan:
    """Resolve a stage's inputs and fingerprint its config and inputs; runs nothing.

    Launchers call it before starting worker processes, so bad references fail once, up front."""
    stage = get_stage(name)
    workspace = workspace_for(project, project_dir)
    section = getattr(project, stage.sections[0], None) if stage.sections else None
    inputs, used_refs = resolve_inputs(stage, workspace, refs or {}, section)
    uses_sources = _uses_sources(stage, inputs)
    sources: list[dict[str, Any]] = []
    if uses_sources:
        from llmctl.data.sources import source_fingerprint

        sources = source_fingerprint(project.data, project_dir)
    config = config_snapshot(stage, project, uses_sources, options)
    input_records = [
        InputRecord(slot=slot, ref=ref, id=art.id, kind=art.kind, manifest_sha256=art.manifest_sha256())
        for slot, ref in used_refs
        if (art := inputs[slot]) is not None
    ]
    return StagePlan(
        stage=stage,
        workspace=workspace,
        inputs=inputs,
        input_records=input_records,
        sources=sources,
        config=config,
        config_hash=stable_hash(config),
        input_key=inputs_key(input_records, sources),
    )


def run_stage(
    name: str,
    project: Any,
    project_dir: Path,
    *,
    refs: dict[str, str] | None = None,
    force: bool = False,
    resume: bool = False,
    reporter: Reporter | None = None,
    options: dict[str, Any] | None = None,
) -> StageOutcome:
    """Run stage `name` (or reuse its up-to-date artifact) and return the artifact."""
    reporter = reporter or Reporter()
    plan = plan_stage(name, project, project_dir, refs=refs, options=options)
    stage, workspace, inputs = plan.stage, plan.workspace, plan.inputs
    config, config_hash, input_key = plan.config, plan.config_hash, plan.input_key
    input_records, sources = plan.input_records, plan.sources

    if not force and not resume:
        existing = plan.up_to_date()
        if existing is not None:
            reporter.log(f"{stage.name}: up to date ({existing.id}); use --force to run again")
            return StageOutcome(existing, reused=True, seconds=0.0)

    resumed = False
    run_dir = None
    if resume:
        candidates = [
            r for r in workspace.runs(stage.name) if r.status in ("incomplete", "interrupted", "failed")
        ]
        matching = [r for r in candidates if r.config_hash == config_hash]
        if candidates and not matching:
            reporter.warn(f"{stage.name}: unfinished runs exist but none with this config; starting fresh")
        if matching:
            run_dir = workspace.reopen_run(matching[-1])
            resumed = True
            reporter.log(f"{stage.name}: resuming {run_dir}")
        else:
            reporter.log(f"{stage.name}: nothing to resume; starting a new run")
    if run_dir is None:
        run_dir = workspace.begin_run(stage.name, config_hash, {"input_key": input_key})

    ctx = StageContext(
        stage=stage,
        project=project,
        project_dir=project_dir,
        workspace=workspace,
        inputs=inputs,
        run_dir=run_dir,
        reporter=reporter,
        resumed=resumed,
        options=dict(options or {}),
    )
    started_at, t0 = now_iso(), time.perf_counter()
    try:
        run = stage.load_run()
        metrics = run(ctx)
    except (KeyboardInterrupt, Interrupted):
        workspace.write_run_state(run_dir, status="interrupted", error="interrupted")
        raise Interrupted(
            f"{stage.name} interrupted; nothing was published",
            hint=f"`llmctl {stage.name} --resume` continues" if stage.keeps_run_dir else None,
        ) from None
    except LlmctlError as exc:
        workspace.write_run_state(run_dir, status="failed", error=exc.message)
        raise
    except BaseException as exc:
        workspace.write_run_state(run_dir, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    seconds = time.perf_counter() - t0
    artifact = workspace.publish(
        run_dir,
        {
            "stage": stage.name,
            "kind": stage.output_kind,
            "started_at": started_at,
            "finished_at": now_iso(),
            "llmctl_version": __version__,
            "project": getattr(project, "name", None),
            "project_git_commit": _git_commit(project_dir),
            "config": config,
            "config_hash": config_hash,
            "inputs": input_records,
            "sources": sources,
            "files": _file_records(ctx.output_dir),
            "metrics": {**(metrics or {}), "stage_seconds": round(seconds, 3)},
            "environment": environment_info(ctx.device),
            "notes": ctx.notes,
        },
    )
    if not stage.keeps_run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
    reporter.log(f"{stage.name}: published {artifact.id} in {seconds:.1f}s")
    return StageOutcome(artifact, reused=False, seconds=seconds)
