"""`llmctl run`: the project's stages in pipeline order, skipping those that are up to date."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from llmctl.cli.options import ForceOption, JsonOption, SetOption, state_of
from llmctl.errors import UsageError


def outcome_row(outcome) -> dict[str, Any]:
    artifact = outcome.artifact
    return {
        "stage": artifact.stage,
        "artifact": artifact.id,
        "reused": outcome.reused,
        "seconds": round(outcome.seconds, 2),
        "path": str(artifact.path),
        "metrics": artifact.manifest.metrics,
    }


def run(
    ctx: typer.Context,
    from_: Annotated[str | None, typer.Option("--from", help="Start at this stage.")] = None,
    until: Annotated[str | None, typer.Option("--until", help="Stop after this stage.")] = None,
    force: ForceOption = False,
    sets: SetOption = None,
    json_: JsonOption = False,
) -> None:
    """Run the whole pipeline (dedup → filter → tokenize → pretrain → eval), reusing up-to-date stages.

    Stops at the first failing stage with its exit code.

    [bold]Examples[/]
      llmctl run
      llmctl run --until tokenize
      llmctl run --from pretrain --force --set pretrain.max_steps=50
    """
    from llmctl.stages import pipeline_stages
    from llmctl.stages.runner import run_stage

    state = state_of(ctx)
    out = state.output(json_)
    config, folder = state.load_project(sets)
    names = [s.name for s in pipeline_stages()]
    for flag, value in (("--from", from_), ("--until", until)):
        if value is not None and value not in names:
            raise UsageError(f"{flag} {value!r} is not a pipeline stage", hint=f"stages: {', '.join(names)}")
    start = names.index(from_) if from_ else 0
    stop = names.index(until) + 1 if until else len(names)
    if start >= stop:
        raise UsageError(f"--from {from_} comes after --until {until}")
    selected = names[start:stop]
    reporter = out.reporter()
    rows = []
    for i, name in enumerate(selected, 1):
        reporter.log(f"[{i}/{len(selected)}] {name}")
        outcome = run_stage(name, config, folder, force=force, reporter=reporter)
        rows.append(outcome_row(outcome))

    def render(console) -> None:
        table = Table("stage", "artifact", "status", "seconds")
        for row in rows:
            table.add_row(
                row["stage"],
                row["artifact"],
                "up to date" if row["reused"] else "new",
                f"{row['seconds']:.1f}",
            )
        console.print(table)

    out.result({"ok": True, "stages": rows}, render)


def register(app: typer.Typer) -> None:
    app.command("run")(run)
