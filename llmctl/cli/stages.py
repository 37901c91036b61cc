"""Stage commands (`llmctl dedup`, `llmctl filter`, ...): parse flags, run the stage, render the result."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from llmctl.cli.options import ForceOption, JsonOption, SetOption, state_of
from llmctl.cli.pipeline import outcome_row

InputOption = Annotated[
    str | None,
    typer.Option(
        "--input", "-i", help="Input artifact reference (default: the newest from the previous stage)."
    ),
]


def _render_outcome(row: dict[str, Any]):
    def render(console) -> None:
        status = "up to date" if row["reused"] else f"published in {row['seconds']:.1f}s"
        console.print(f"[bold]{row['artifact']}[/] {status}  [dim]{row['path']}[/]", highlight=False)
        metrics = {k: v for k, v in row["metrics"].items() if not isinstance(v, dict | list)}
        if metrics:
            table = Table("metric", "value")
            for key, value in metrics.items():
                table.add_row(key, f"{value:,.4g}" if isinstance(value, float) else str(value))
            console.print(table)

    return render


def run_stage_command(
    ctx: typer.Context,
    stage: str,
    *,
    sets: list[str] | None,
    force: bool,
    json_: bool,
    refs: dict[str, str | None] | None = None,
    resume: bool = False,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The body every stage command shares: load config, run (or reuse), print the outcome."""
    from llmctl.stages.runner import run_stage

    state = state_of(ctx)
    out = state.output(json_)
    config, folder = state.load_project(sets)
    outcome = run_stage(
        stage,
        config,
        folder,
        refs={k: v for k, v in (refs or {}).items() if v},
        force=force,
        resume=resume,
        reporter=out.reporter(),
        options=options,
    )
    row = outcome_row(outcome)
    out.result(row, _render_outcome(row))
    return row


def dedup(
    ctx: typer.Context, force: ForceOption = False, sets: SetOption = None, json_: JsonOption = False
) -> None:
    """Remove exact and near-duplicate documents from the project's data sources.

    [bold]Examples[/]
      llmctl dedup
      llmctl dedup --set dedup.engine=datatrove --set dedup.workers=2
      llmctl dedup --force --json
    """
    run_stage_command(ctx, "dedup", sets=sets, force=force, json_=json_)


def filter_(
    ctx: typer.Context,
    input_: InputOption = None,
    force: ForceOption = False,
    sets: SetOption = None,
    json_: JsonOption = False,
) -> None:
    """Drop low-quality documents (Gopher, C4, FineWeb filters, length, URL and regex block-lists).

    [bold]Examples[/]
      llmctl filter
      llmctl filter --input dedup:v2
      llmctl artifacts show filter:latest --samples 3
    """
    run_stage_command(ctx, "filter", sets=sets, force=force, json_=json_, refs={"corpus": input_})


def tokenize(
    ctx: typer.Context,
    input_: InputOption = None,
    inspect: Annotated[
        str | None,
        typer.Option(
            "--inspect", help="Show the tokens of this text with the newest tokenizer (runs nothing)."
        ),
    ] = None,
    force: ForceOption = False,
    sets: SetOption = None,
    json_: JsonOption = False,
) -> None:
    """Train a byte-level BPE tokenizer on the corpus and encode it into train/val token shards.

    [bold]Examples[/]
      llmctl tokenize
      llmctl tokenize --set tokenize.vocab_size=8192
      llmctl tokenize --inspect "Hello, world!"
    """
    if inspect is not None:
        from llmctl.cli.inspect import render_tokens, tokens_of

        state = state_of(ctx)
        out = state.output(json_)
        config, folder = state.load_project(sets)
        from llmctl.stages.runner import workspace_for

        artifact = workspace_for(config, folder).resolve(
            input_ or "tokenize:latest", kinds=("tokens", "model")
        )
        tokens = tokens_of(artifact, inspect)
        out.result(
            {"artifact": artifact.id, "text": inspect, "tokens": tokens},
            lambda console: render_tokens(console, f"{len(tokens)} tokens ({artifact.id})", tokens),
        )
        return
    run_stage_command(ctx, "tokenize", sets=sets, force=force, json_=json_, refs={"corpus": input_})


def register(app: typer.Typer) -> None:
    app.command("dedup")(dedup)
    app.command("filter")(filter_)
    app.command("tokenize")(tokenize)
