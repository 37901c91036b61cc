"""Run one stage: resolve inputs, reuse an up-to-date artifact, or run and publish a new version.

    outcome = run_stage("dedup", project, project_dir, reporter=reporter)
    outcome.artifact.id   # 'dedup:v0002'
    outcome.reused        # True when the same config and inputs already produced an artifact

The stage works in a run folder; only a run that returns normally is published (atomic rename).
An exception marks the run failed, Ctrl-C/SIGTERM marks it interrupted; neither leaves an artifact.
The up-to-date check, the run and the publish happen under a lock keyed by stage, config and inputs,
so two identical runs started at once publish one artifact. `run_pipeline` chains stages by id: each
consumes exactly what the previous stage of the same pipeline produced or reused.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl import __version__
from llmctl.errors import ConfigError, InputError, Interrupted, LlmctlError, raise_if_interrupted
from llmctl.reporting import Reporter
from llmctl.stages.context import StageContext
from llmctl.stages.limits import check_limits
from llmctl.stages.registry import STAGES, InputSlot, Stage, stage_order
from llmctl.workspace.code import code_identity
from llmctl.workspace.integrity import NO_VERIFY_ENV, verification_disabled
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
from llmctl.workspace.store import Artifact, RunInfo, Workspace

# How llmctl.data.chat.records_fingerprint tags a stage's own record files: sft's chat, dpo's pairs,
# grpo's prompts.
RECORD_TAGS = ("chat", "preferences", "prompts")


@dataclass(frozen=True)
class StageOutcome:
    artifact: Artifact
    reused: bool
    seconds: float
    inputs: dict[str, str] = field(default_factory=dict)  # slot -> consumed artifact id (or data.sources)


def workspace_for(project: Any, project_dir: Path) -> Workspace:
    root = Path(project.workspace)
    # `latest` for a consumer of some kinds follows pipeline order, like a reference-less input.
    return Workspace(root if root.is_absolute() else project_dir / root, stage_order=tuple(stage_order()))


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise InputError(f"unknown stage {name!r}", hint=f"stages: {', '.join(STAGES)}")
    return STAGES[name]


def resolve_inputs(
    stage: Stage, workspace: Workspace, refs: dict[str, str], section: Any = None
) -> tuple[dict[str, Artifact | None], list[tuple[str, str]]]:
    """Explicit refs win, then a reference in the stage's config section (slot.config_key), then the
    newest artifact of the first default stage that has one (for `newest_in_pipeline` slots: the
    last stage in pipeline order that has one, see registry.py)."""
    unknown = set(refs) - {slot.name for slot in stage.inputs}
    assert not unknown, f"{stage.name} has no input slot(s) {sorted(unknown)}"
    resolved: dict[str, Artifact | None] = {}
    used_refs: list[tuple[str, str]] = []
    for slot in stage.inputs:
        ref = refs.get(slot.name)
        if ref is None and slot.config_key and section is not None:
            ref = getattr(section, slot.config_key, None)
        if ref is None:
            ref = _default_ref(stage, slot, workspace)
        if ref is None:
            resolved[slot.name] = None
            continue
        resolved[slot.name] = workspace.resolve(ref, kinds=slot.kinds)
        used_refs.append((slot.name, ref))
    return resolved, used_refs


def _default_ref(stage: Stage, slot: InputSlot, workspace: Workspace) -> str | None:
    """`S:latest` for the first default stage S with an artifact (a corrupt one counts, so resolving
    refuses it). A default stage that was run but never published (failed, interrupted, still
    running) stops the search: silently reading an older stage, or the raw sources, would feed this
    stage data the user did not mean."""
    defaults = slot.defaults(stage.name)
    for name in defaults:
        if workspace.artifacts(name) or workspace.corrupt(name):
            return f"{name}:latest"
        pending = workspace.runs(name)
        if pending:
            run = pending[-1]
            why = f": {run.error}" if run.error else ""
            running = run.status in ("running", "running?")
            raise InputError(
                f"{stage.name} needs the {'/'.join(slot.kinds)} artifact of `{name}`, which has none: "
                f"its last run is {run.status}{why} ({run.path})",
                hint=f"wait for that run to finish, then run `llmctl {stage.name}` again"
                if running
                else f"fix it and run `llmctl {name}` again; `llmctl artifacts clean {name} --yes` "
                f"forgets the unpublished run",
            )
    if slot.required and not slot.sources_fallback:
        makers = " or ".join(f"`llmctl {s}`" for s in defaults) or "an earlier stage"
        raise InputError(
            f"{stage.name} needs a {'/'.join(slot.kinds)} artifact ({slot.name}) and none exists",
            hint=f"run {makers} first, or pass a reference",
        )
    return None


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
    input_key: str  # also covers the code (llmctl's version and source), see workspace/code.py
    code: dict[str, str]

    def up_to_date(self) -> Artifact | None:
        return self.workspace.find_up_to_date(self.stage.name, self.config_hash, self.input_key)

    def resumable_run(self) -> RunInfo | None:
        """The newest unfinished run of this stage with the same config, which --resume continues."""
        runs = [
            r
            for r in self.workspace.runs(self.stage.name)
            if r.status in ("incomplete", "interrupted", "failed") and r.config_hash == self.config_hash
        ]
        return runs[-1] if runs else None

    def consumed(self) -> dict[str, str]:
        """What this stage reads, for run summaries: slot -> artifact id, or data.sources."""
        consumed = {r.slot: r.id for r in self.input_records}
        # A stage's own record files (sft's chat data, dpo's pairs) are tagged by their kind.
        for entry in self.sources:
            kind = next((tag for tag in RECORD_TAGS if entry.get(tag)), None)
            consumed[kind or "sources"] = f"{self.stage.name}.data" if kind else "data.sources"
        return consumed


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
    section = stage.section_of(project)
    inputs, used_refs = resolve_inputs(stage, workspace, refs or {}, section)
    uses_sources = _uses_sources(stage, inputs)
    sources: list[dict[str, Any]] = []
    if uses_sources:
        from llmctl.data.sources import source_fingerprint

        if project.data is None:
            raise ConfigError(
                f"{stage.name} reads the project's data sources, and llmctl.yaml has no `data:` section",
                hint="add `data: {sources: [{path: data/docs.jsonl}]}` to llmctl.yaml (see `llmctl init`)",
            )
        sources = source_fingerprint(project.data, project_dir)
    sources += stage.extra_sources(project, project_dir)
    config = config_snapshot(stage, project, uses_sources, options)
    input_records = [
        workspace.input_record(slot, ref, art) for slot, ref in used_refs if (art := inputs[slot]) is not None
    ]
    code = code_identity()
    return StagePlan(
        stage=stage,
        workspace=workspace,
        inputs=inputs,
        input_records=input_records,
        sources=sources,
        config=config,
        config_hash=stable_hash(config),
        input_key=inputs_key(input_records, sources, code),
        code=code,
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
    """Run stage `name` (or reuse its up-to-date artifact) and return the artifact.

    `resume` continues the newest unfinished run with this config; with none, an up-to-date
    artifact is reused as in a plain run. `force` always starts a new run (with `resume`: start over).
    """
    plan = plan_stage(name, project, project_dir, refs=refs, options=options)
    return run_plan(
        plan, project, project_dir, force=force, resume=resume, reporter=reporter, options=options
    )


def run_plan(
    plan: StagePlan,
    project: Any,
    project_dir: Path,
    *,
    force: bool = False,
    resume: bool = False,
    reporter: Reporter | None = None,
    options: dict[str, Any] | None = None,
    world_size: int = 1,
    on_start: Callable[[StageContext], None] | None = None,
) -> StageOutcome:
    """`run_stage` for a stage already planned. For a distributed stage's rank 0 (launch.py):
    `world_size` goes into the context, and `on_start(ctx)` is called once the run folder exists,
    just before the stage runs (not when the artifact is reused or anything fails before)."""
    reporter = reporter or Reporter()
    name = plan.stage.name

    def execute(resume: bool) -> StageOutcome:
        return _execute(
            plan,
            project,
            project_dir,
            reporter,
            options,
            resume=resume,
            world_size=world_size,
            on_start=on_start,
        )

    if force:
        return execute(resume=False)

    def waiting() -> None:
        reporter.log(f"{name}: an identical {name} run is in progress; waiting for it")

    with plan.workspace.run_lock(name, stable_hash([plan.config_hash, plan.input_key]), waiting):
        reused = reuse_up_to_date(plan, resume=resume, reporter=reporter)
        return reused if reused is not None else execute(resume=resume)


def reuse_up_to_date(plan: StagePlan, *, resume: bool, reporter: Reporter) -> StageOutcome | None:
    """The up-to-date artifact to reuse (and say so), or None when the stage must run: nothing is
    up to date, or `resume` has an unfinished run to continue."""
    if resume and plan.resumable_run():
        return None
    existing = plan.up_to_date()
    if existing is None:
        return None
    name = plan.stage.name
    why = "nothing to resume; " if resume else ""
    reporter.log(f"{name}: {why}up to date ({existing.id}); use --force to run again")
    return StageOutcome(existing, reused=True, seconds=0.0, inputs=plan.consumed())


def _execute(
    plan: StagePlan,
    project: Any,
    project_dir: Path,
    reporter: Reporter,
    options: dict[str, Any] | None,
    *,
    resume: bool,
    world_size: int = 1,
    on_start: Callable[[StageContext], None] | None = None,
) -> StageOutcome:
    """Run the stage in a run folder (new, or reopened for resume) and publish its output."""
    stage, workspace = plan.stage, plan.workspace
    check_limits([stage.name], project, plan.inputs)  # before a run folder or a worker exists
    resumed = False
    run_dir = None
    if resume:
        run = plan.resumable_run()
        if run is not None:
            run_dir = workspace.reopen_run(run)
            resumed = True
            reporter.log(f"{stage.name}: resuming {run_dir}")
        elif any(r.status in ("incomplete", "interrupted", "failed") for r in workspace.runs(stage.name)):
            reporter.warn(f"{stage.name}: unfinished runs exist but none with this config; starting fresh")
        else:
            reporter.log(f"{stage.name}: nothing to resume; starting a new run")
    if run_dir is None:
        run_dir = workspace.begin_run(stage.name, plan.config_hash, {"input_key": plan.input_key})

    ctx = StageContext(
        stage=stage,
        project=project,
        project_dir=project_dir,
        workspace=workspace,
        inputs=plan.inputs,
        run_dir=run_dir,
        reporter=reporter,
        resumed=resumed,
        options=dict(options or {}),
        input_ids={r.slot: r.id for r in plan.input_records},
        world_size=world_size,
    )
    if plan.input_records and verification_disabled():
        ctx.note(f"{stage.name}: input files not checked against their manifests ({NO_VERIFY_ENV}=1)")
    started_at, t0 = now_iso(), time.perf_counter()
    try:
        run = stage.load_run()
        if on_start is not None:
            on_start(ctx)
        metrics = run(ctx)
        raise_if_interrupted()  # a signal whose exception some callback swallowed: never publish
    except (KeyboardInterrupt, Interrupted):
        _record_end(workspace, run_dir, stage, status="interrupted", error="interrupted")
        raise Interrupted(
            f"{stage.name} interrupted; nothing was published",
            hint=f"`llmctl {stage.name} --resume` continues" if stage.keeps_run_dir else None,
        ) from None
    except LlmctlError as exc:
        _record_end(workspace, run_dir, stage, status="failed", error=exc.message)
        raise
    except BaseException as exc:
        _record_end(workspace, run_dir, stage, status="failed", error=f"{type(exc).__name__}: {exc}")
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
            "config": plan.config,
            "config_hash": plan.config_hash,
            "inputs": plan.input_records,
            "sources": plan.sources,
            "files": _file_records(ctx.output_dir),
            "metrics": {**(metrics or {}), "stage_seconds": round(seconds, 3)},
            "environment": environment_info(ctx.device),
            "notes": ctx.notes,
            "code": plan.code,
        },
    )
    if not stage.keeps_run_dir:
        shutil.rmtree(run_dir, ignore_errors=True)
    reporter.log(f"{stage.name}: published {artifact.id} in {seconds:.1f}s")
    return StageOutcome(artifact, reused=False, seconds=seconds, inputs=plan.consumed())


def _record_end(workspace: Workspace, run_dir: Path, stage: Stage, **state: Any) -> None:
    """Mark a run failed or interrupted, even on a full disk (the usual reason a data stage fails
    while writing): then the partial output of a stage that cannot resume is dropped to make room.
    If the state still cannot be written, the run's error is what the user must see, not this one."""
    try:
        workspace.write_run_state(run_dir, **state)
        return
    except OSError:
        if stage.keeps_run_dir:
            return
    shutil.rmtree(run_dir / "output", ignore_errors=True)
    with contextlib.suppress(OSError):
        workspace.write_run_state(run_dir, **state)


def run_pipeline(
    names: list[str],
    project: Any,
    project_dir: Path,
    *,
    force: bool = False,
    reporter: Reporter | None = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> list[StageOutcome]:
    """Run stages in order, each consuming by id what an earlier stage of this pipeline produced or
    reused, never `STAGE:latest` (which a concurrent run, or an older reused artifact, makes wrong).
    Inputs from stages outside `names` resolve as in a single stage run. `options` maps a stage name
    to its per-invocation options."""
    reporter = reporter or Reporter()
    check_limits(names, project)  # a value this machine cannot hold fails before the first stage starts
    produced: dict[str, Artifact] = {}
    outcomes = []
    for i, name in enumerate(names, 1):
        reporter.log(f"[{i}/{len(names)}] {name}")
        stage = get_stage(name)
        skip = stage.skip_reason(project)
        if skip:
            reporter.log(f"{name}: skipped ({skip})")
            continue
        refs = {}
        for slot in stage.inputs:
            upstream = next((s for s in slot.defaults(stage.name) if s in produced), None)
            if upstream is not None:
                refs[slot.name] = produced[upstream].id
        outcome = run_stage(
            name,
            project,
            project_dir,
            refs=refs,
            force=force,
            reporter=reporter,
            options=(options or {}).get(name),
        )
        produced[name] = outcome.artifact
        outcomes.append(outcome)
    return outcomes
