"""Run a distributed stage (`Stage.distributed`, e.g. pretrain) on one process or on N under torchrun.

    result = launch_stage("pretrain", project, project_dir, launch=Launch(gpus=2), argv=sys.argv)
    result.outcome     # the artifact (published or reused), on the process that reports it
    result.exit_code   # torchrun's exit code, when this process relaunched the command under it

What the user types (outside torchrun):
  1. the device is checked first (`--gpus N` needs N GPUs unless the stage's device is cpu);
  2. the inputs are resolved and the stage module's `preflight` runs, once: a bad reference or a
     config that cannot work on N processes fails here, before any process starts;
  3. with one process, the stage runs here as any other; with N, an up-to-date artifact is reused
     here (unless --force, or --resume has a run to continue), else the same command line is re-run
     under torchrun and its exit code returned.
Every torchrun child (WORLD_SIZE > 1, whether relaunched or started by the user's own torchrun)
comes back here: all ranks join the process group; rank 0 alone plans, takes the run lock, reuses or
opens the run folder, then tells every other rank what happens, before the stage starts: the `Job`
(run folder, inputs, resumed), or nothing to do (up to date), or failed before start. So ranks > 0
never wait on a rank that has already finished or died. They run the same `run(ctx)` with their
rank in the context and publish nothing, or exit at once: 0 when up to date, rank 0's exit code
when it failed. The process group is shut down on every rank however the stage ends.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.errors import LlmctlError
from llmctl.reporting import Reporter
from llmctl.stages.context import StageContext
from llmctl.stages.registry import Stage
from llmctl.stages.runner import (
    StageOutcome,
    get_stage,
    plan_stage,
    reuse_up_to_date,
    run_plan,
    workspace_for,
)
from llmctl.train import distributed as D
from llmctl.workspace.store import Artifact


@dataclass(frozen=True)
class Launch:
    """How many processes, where: the `--gpus`/`--nodes` flags of a distributed stage's command."""

    gpus: int = 1
    nodes: int = 1
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int = D.DEFAULT_MASTER_PORT

    @property
    def world_size(self) -> int:
        return self.gpus * self.nodes


@dataclass(frozen=True)
class LaunchResult:
    outcome: StageOutcome | None = None  # None on ranks > 0 (rank 0 reports) and after a relaunch
    exit_code: int | None = None  # torchrun's, when this process relaunched the command


@dataclass(frozen=True)
class Job:
    """What rank 0 sends the other ranks when the stage is about to run."""

    run_dir: str
    inputs: dict[str, Artifact | None]
    input_ids: dict[str, str]
    resumed: bool
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UpToDate:
    artifact_id: str


@dataclass(frozen=True)
class FailedBeforeStart:
    message: str
    exit_code: int


class RankZeroFailed(LlmctlError):
    """Raised on ranks > 0 when rank 0 failed before the stage started (it reports the error)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(f"rank 0 failed before the stage started: {message}")
        self.exit_code = exit_code


def launch_stage(
    name: str,
    project: Any,
    project_dir: Path,
    *,
    launch: Launch,
    argv: list[str],
    refs: dict[str, str] | None = None,
    force: bool = False,
    resume: bool = False,
    reporter: Reporter | None = None,
    options: dict[str, Any] | None = None,
) -> LaunchResult:
    """Run distributed stage `name` here, on this torchrun rank, or relaunched on `launch.world_size`
    processes (`argv`, i.e. sys.argv, is the command line torchrun re-runs)."""
    reporter = reporter or Reporter()
    stage = get_stage(name)
    section = stage.section_of(project)
    if D.env_world_size() > 1:
        return LaunchResult(
            _run_on_this_rank(stage, project, project_dir, refs, force, resume, reporter, options)
        )
    device = getattr(section, "device", "auto")
    if not D.in_torchrun():
        D.check_launch(launch.gpus, launch.nodes, device)
    D.resolve_device(device, key=f"{stage.sections[0]}.device")  # a missing device fails before inputs
    world_size = 1 if D.in_torchrun() else launch.world_size
    plan = plan_stage(name, project, project_dir, refs=refs, options=options)
    preflight(stage, section, world_size, plan.inputs)
    if world_size == 1:
        return LaunchResult(
            run_plan(
                plan, project, project_dir, force=force, resume=resume, reporter=reporter, options=options
            )
        )
    if not force:
        # Reused here: under torchrun rank 0 would reuse it too, but only after N processes started.
        reused = reuse_up_to_date(plan, resume=resume, reporter=reporter)
        if reused is not None:
            return LaunchResult(reused)
    options = {
        "gpus": launch.gpus,
        "nodes": launch.nodes,
        "node_rank": launch.node_rank,
        "master_addr": launch.master_addr,
        "master_port": launch.master_port,
        "device": device,
    }
    return LaunchResult(exit_code=D.maybe_relaunch(argv, options))


def preflight(stage: Stage, section: Any, world_size: int, inputs: dict[str, Artifact | None]) -> None:
    """The stage module's `preflight(section, world_size[, inputs])`, when it defines one."""
    check = stage.load_preflight()
    if check is None:
        return
    if "inputs" in inspect.signature(check).parameters:
        check(section, world_size, inputs=inputs)
    else:
        check(section, world_size)


def _run_on_this_rank(
    stage: Stage,
    project: Any,
    project_dir: Path,
    refs: dict[str, str] | None,
    force: bool,
    resume: bool,
    reporter: Reporter,
    options: dict[str, Any] | None,
) -> StageOutcome | None:
    """One rank of a torchrun job: rank 0 runs the stage through the runner, the others follow."""
    section = stage.section_of(project)
    info = D.init_distributed(device=getattr(section, "device", "auto"))
    try:
        if info.is_main:
            return _lead(stage, project, project_dir, refs, force, resume, reporter, options, info.world_size)
        _follow(stage, project, project_dir, info.rank, info.world_size)
        return None
    finally:
        D.shutdown()


def _lead(
    stage: Stage,
    project: Any,
    project_dir: Path,
    refs: dict[str, str] | None,
    force: bool,
    resume: bool,
    reporter: Reporter,
    options: dict[str, Any] | None,
    world_size: int,
) -> StageOutcome:
    told = False

    def tell(message: Job | UpToDate | FailedBeforeStart) -> None:
        nonlocal told
        told = True  # once, even if the broadcast itself fails
        D.broadcast_object(message)

    def start(ctx: StageContext) -> None:
        tell(Job(str(ctx.run_dir), dict(ctx.inputs), dict(ctx.input_ids), ctx.resumed, dict(ctx.options)))

    try:
        plan = plan_stage(stage.name, project, project_dir, refs=refs, options=options)
        preflight(stage, stage.section_of(project), world_size, plan.inputs)
        outcome = run_plan(
            plan,
            project,
            project_dir,
            force=force,
            resume=resume,
            reporter=reporter,
            options=options,
            world_size=world_size,
            on_start=start,
        )
    except BaseException as exc:
        if not told:  # the others are waiting to hear what to run: tell them nothing will
            code = 130 if isinstance(exc, KeyboardInterrupt) else getattr(exc, "exit_code", 1)
            tell(FailedBeforeStart(getattr(exc, "message", None) or str(exc) or type(exc).__name__, code))
        raise
    if not told:
        tell(UpToDate(outcome.artifact.id))
    return outcome


def _follow(stage: Stage, project: Any, project_dir: Path, rank: int, world_size: int) -> None:
    message = D.broadcast_object(None)
    if isinstance(message, UpToDate):
        return
    if isinstance(message, FailedBeforeStart):
        raise RankZeroFailed(message.message, message.exit_code)
    assert isinstance(message, Job), message
    ctx = StageContext(
        stage=stage,
        project=project,
        project_dir=project_dir,
        workspace=workspace_for(project, project_dir),
        inputs=message.inputs,
        run_dir=Path(message.run_dir),
        resumed=message.resumed,
        options=message.options,
        input_ids=message.input_ids,
        rank=rank,
        world_size=world_size,
    )
    stage.load_run()(ctx)  # its metrics and files are rank 0's to publish
