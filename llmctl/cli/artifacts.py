"""`llmctl artifacts ls|show|lineage|rm|clean`: look into the workspace of versioned artifacts."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.tree import Tree

from llmctl.cli.options import JsonOption, YesOption, state_of
from llmctl.errors import UsageError

artifacts_app = typer.Typer(help="List, inspect, trace and remove artifacts.", no_args_is_help=True)


def _workspace(ctx: typer.Context):
    from llmctl.stages.runner import workspace_for

    config, folder = state_of(ctx).load_project()
    return workspace_for(config, folder)


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _summary(artifact) -> dict[str, Any]:
    m = artifact.manifest
    return {
        "id": m.id,
        "stage": m.stage,
        "kind": m.kind,
        "version": m.version,
        "status": m.status,
        "created": m.finished_at,
        "inputs": [i.id for i in m.inputs],
        "bytes": sum(f.bytes for f in m.files),
        "path": str(artifact.path),
    }


@artifacts_app.command("ls")
def ls(
    ctx: typer.Context,
    stage: Annotated[str | None, typer.Argument(help="Only this stage's artifacts.")] = None,
    json_: JsonOption = False,
) -> None:
    """List artifacts (newest last) and unpublished runs (failed, interrupted, incomplete).

    [bold]Examples[/]
      llmctl artifacts ls
      llmctl artifacts ls pretrain --json
    """
    out = state_of(ctx).output(json_)
    ws = _workspace(ctx)
    rows = [_summary(a) for a in ws.artifacts(stage)]
    runs = [
        {"stage": r.stage, "status": r.status, "started": r.started_at, "path": str(r.path), "error": r.error}
        for r in ws.runs(stage)
    ]

    def render(console) -> None:
        table = Table("id", "kind", "created", "size", "inputs")
        for row in rows:
            table.add_row(
                row["id"], row["kind"], row["created"], _human_bytes(row["bytes"]), ", ".join(row["inputs"])
            )
        console.print(table if rows else "no artifacts yet")
        if runs:
            runs_table = Table(
                "unpublished run",
                "status",
                "started",
                "error",
                title="runs (`llmctl artifacts clean` removes)",
            )
            for run in runs:
                runs_table.add_row(run["path"], run["status"], run["started"], run["error"] or "")
            console.print(runs_table)

    out.result({"artifacts": rows, "runs": runs}, render)


@artifacts_app.command("show")
def show(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="latest, STAGE:latest, STAGE:vN or a path.")],
    samples: Annotated[
        int, typer.Option("--samples", help="Show N example documents (corpus artifacts).")
    ] = 0,
    encode: Annotated[
        str | None, typer.Option("--encode", help="Show the tokens of this text (tokens artifacts).")
    ] = None,
    json_: JsonOption = False,
) -> None:
    """Show an artifact's manifest: config, inputs, files, metrics.

    [bold]Examples[/]
      llmctl artifacts show dedup:latest
      llmctl artifacts show filter:latest --samples 3
      llmctl artifacts show tokenize:v1 --encode "Hello world"
    """
    from llmctl.cli.inspect import artifact_extras

    out = state_of(ctx).output(json_)
    artifact = _workspace(ctx).resolve(ref)
    data: dict[str, Any] = artifact.manifest.model_dump(mode="json")
    data["path"] = str(artifact.path)
    extras = artifact_extras(artifact, samples=samples, encode=encode)
    data.update(extras)

    def render(console) -> None:
        from llmctl.cli.inspect import render_artifact

        render_artifact(console, artifact, extras)

    out.result(data, render)


@artifacts_app.command("lineage")
def lineage(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="latest, STAGE:latest, STAGE:vN or a path.")],
    json_: JsonOption = False,
) -> None:
    """Show the tree of inputs of an artifact, down to the raw data sources.

    [bold]Examples[/]
      llmctl artifacts lineage pretrain:latest
      llmctl artifacts lineage eval:v2 --json
    """
    out = state_of(ctx).output(json_)
    ws = _workspace(ctx)
    tree = ws.lineage(ws.resolve(ref))

    def add(branch: Tree, node: dict[str, Any]) -> None:
        for child in node.get("inputs", []):
            label = f"{child['id']} [dim]({child['kind']}, as {child['slot']})[/]"
            if child.get("missing"):
                label += " [red]missing[/]"
            elif child.get("changed"):
                label += " [yellow]changed since use[/]"
            add(branch.add(label), child)
        for source in node.get("sources", []):
            branch.add(f"[green]source[/] {source.get('path') or source.get('repo') or source}")

    def render(console) -> None:
        root = Tree(f"[bold]{tree['id']}[/] [dim]({tree['kind']})[/]")
        add(root, tree)
        console.print(root)

    out.result(tree, render)


@artifacts_app.command("rm")
def rm(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="STAGE:vN or a path (not `latest`, to avoid surprises).")],
    force: Annotated[
        bool, typer.Option("--force", help="Remove even if other artifacts depend on it.")
    ] = False,
    json_: JsonOption = False,
) -> None:
    """Remove an artifact. Refuses while another artifact depends on it, unless --force.

    [bold]Examples[/]
      llmctl artifacts rm dedup:v1
      llmctl artifacts rm tokenize:v2 --force
    """
    if ref.strip() == "latest" or ref.endswith(":latest"):
        raise UsageError(f"refusing to remove {ref!r}", hint="name the version, e.g. dedup:v3")
    out = state_of(ctx).output(json_)
    ws = _workspace(ctx)
    artifact = ws.resolve(ref)
    users = ws.remove(artifact, force=force)
    out.result(
        {"removed": artifact.id, "dependents": users},
        lambda console: console.print(
            f"removed {artifact.id}" + (f" (still referenced by {', '.join(users)})" if users else ""),
            highlight=False,
        ),
    )


@artifacts_app.command("clean")
def clean(
    ctx: typer.Context,
    stage: Annotated[str | None, typer.Argument(help="Only this stage's runs.")] = None,
    yes: YesOption = False,
    json_: JsonOption = False,
) -> None:
    """Delete failed, interrupted and incomplete runs (never published artifacts, never live runs).

    [bold]Examples[/]
      llmctl artifacts clean --yes
      llmctl artifacts clean pretrain --yes
    """
    out = state_of(ctx).output(json_)
    ws = _workspace(ctx)
    doomed = [r for r in ws.runs(stage) if r.status not in ("running", "running?")]
    if doomed and not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"would delete {len(doomed)} run(s); confirmation needed", hint="add --yes")
        typer.confirm(f"Delete {len(doomed)} unpublished run(s)?", abort=True)
    removed = ws.clean_runs(stage)
    out.result(
        {"removed": [str(r.path) for r in removed]},
        lambda console: console.print(f"removed {len(removed)} run(s)"),
    )


def register(app: typer.Typer) -> None:
    app.add_typer(artifacts_app, name="artifacts")
