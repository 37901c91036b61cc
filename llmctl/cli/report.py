"""`llmctl report [REF]`: write a model card (README.md) and a self-contained report.html."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from llmctl.cli.completion import complete_refs
from llmctl.cli.options import JsonOption, state_of


def report(
    ctx: typer.Context,
    ref: Annotated[
        str | None,
        typer.Argument(
            help="The artifact to describe (default: the newest model, as `--ckpt latest` picks it).",
            autocompletion=complete_refs(),
            show_default=False,
        ),
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Folder to write README.md and report.html into (default: <project>/reports/STAGE-vNNNN).",
            show_default=False,
        ),
    ] = None,
    license_: Annotated[
        str, typer.Option("--license", help="The card's license id (hub metadata), e.g. apache-2.0.")
    ] = "other",
    json_: JsonOption = False,
) -> None:
    """Write a model card and an HTML report of an artifact, from the manifests along its lineage.

    README.md is a hub model card (YAML metadata, then data funnel, tokenizer, model shape, training,
    post-training, every eval with its standard errors, quantization deltas, lineage with hashes,
    environment); report.html says the same with plots and needs no network to view. Artifacts are
    immutable, so both go to their own folder; copy README.md beside the weights to publish it.

    [bold]Examples[/]
      llmctl report
      llmctl report sft:v0001 --out card/
      llmctl report quantize:latest --license apache-2.0 --json
    """
    from llmctl.report import collect, write_report
    from llmctl.stages.runner import workspace_for

    state = state_of(ctx)
    out = state.output(json_)
    config, folder = state.load_project()
    ws = workspace_for(config, folder)
    subject = (
        ws.resolve(ref, verify=True) if ref and ref != "latest" else ws.resolve("latest", kinds=("model",))
    )
    summary = collect(ws, subject)
    target = (out_dir or folder / "reports" / subject.id.replace(":", "-")).expanduser().resolve()
    for m in summary.missing:
        out.reporter().warn(f"{m.id} (input of {m.consumer}) is no longer in the workspace; the card says so")
    paths = write_report(summary, target, license=license_)
    data = {
        "artifact": subject.id,
        "out": str(target),
        "card": str(paths["card"]),
        "html": str(paths["html"]),
        "missing": [m.id for m in summary.missing],
        "summary": summary.to_dict(),
    }

    def render(console) -> None:
        console.print(Text.assemble("model card ", (str(paths["card"]), "bold")))
        console.print(Text.assemble("report     ", (str(paths["html"]), "bold")))

    out.result(data, render)


def register(app: typer.Typer) -> None:
    app.command("report")(report)
