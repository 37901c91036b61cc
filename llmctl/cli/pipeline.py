"""`llmctl run`: the project's stages in pipeline order, skipping those that are up to date.

Each stage consumes exactly the artifact the previous stage of this run produced or reused (chained
by id, see `llmctl.stages.runner.run_pipeline`); the summary says which.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from llmctl.cli.completion import complete_stages
from llmctl.cli.options import ForceOption, JsonOption, SetOption, state_of
from llmctl.errors import UsageError


def outcome_row(outcome) -> dict[str, Any]:
    artifact = outcome.artifact
    return {
        "stage": artifact.stage,
        "artifact": artifact.id,
        "reused": outcome.reused,
        "seconds": round(outcome.seconds, 2),
        "inputs": dict(outcome.inputs),
        "path": str(artifact.path),
        "metrics": artifact.manifest.metrics,
    }


def run(
    ctx: typer.Context,
    from_: Annotated[
        str | None,
        typer.Option(
            "--from", help="Start at this stage.", autocompletion=complete_stages(pipeline_only=True)
        ),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option(
            "--until", help="Stop after this stage.", autocompletion=complete_stages(pipeline_only=True)
        ),
    ] = None,
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
    from llmctl.stages.runner import run_pipeline

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
    outcomes = run_pipeline(selected, config, folder, force=force, reporter=out.reporter())
    rows = [outcome_row(outcome) for outcome in outcomes]

    def render(console) -> None:
        table = Table("stage", "artifact", "status", "seconds", "input")
        for row in rows:
            table.add_row(
                row["stage"],
                row["artifact"],
                "up to date" if row["reused"] else "new",
                f"{row['seconds']:.1f}",
                Text(", ".join(f"{slot}={ref}" for slot, ref in row["inputs"].items()) or "-"),
            )
        console.print(table)

    out.result({"ok": True, "stages": rows}, render)


def register(app: typer.Typer) -> None:
    app.command("run")(run)
