"""`llmctl artifacts ls|show|verify|lineage|rm|clean`: look into the workspace of versioned artifacts."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from llmctl.cli.completion import complete_refs, complete_stages
from llmctl.cli.options import JsonOption, YesOption, state_of
from llmctl.errors import InputError, UsageError

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
    stage: Annotated[
        str | None, typer.Argument(help="Only this stage's artifacts.", autocompletion=complete_stages())
    ] = None,
    json_: JsonOption = False,
) -> None:
    """List artifacts (newest last), corrupt ones, and unpublished runs (failed, interrupted, incomplete).

    [bold]Examples[/]
      llmctl artifacts ls
      llmctl artifacts ls pretrain --json
    """
    out = state_of(ctx).output(json_)
    ws = _workspace(ctx)
    artifacts, corrupt = ws.scan(stage)
    artifacts.sort(key=lambda a: (a.manifest.finished_at, a.stage, a.version))
    rows = [_summary(a) for a in artifacts]
    broken = [{"id": c.id, "stage": c.stage, "path": str(c.path), "error": c.error} for c in corrupt]
    runs = [
        {"stage": r.stage, "status": r.status, "started": r.started_at, "path": str(r.path), "error": r.error}
        for r in sorted(ws.runs(stage), key=lambda r: r.started_at)
    ]

    def render(console) -> None:
        table = Table("id", "kind", "created", "size", "inputs")
        for row in rows:
            table.add_row(
                row["id"],
                row["kind"],
                row["created"][:19].replace("T", " "),
                _human_bytes(row["bytes"]),
                Text(", ".join(row["inputs"])),
            )
        console.print(table if rows else "no artifacts yet")
        if broken:
            bad = Table("id", "error", title="corrupt artifacts (`llmctl artifacts rm ID` removes)")
            for row in broken:
                bad.add_row(row["id"], Text(row["error"]))
            console.print(bad)
        if runs:
            runs_table = Table(title="runs (`llmctl artifacts clean` removes)")
            runs_table.add_column("unpublished run", overflow="fold")
            for column in ("status", "started", "error"):
                runs_table.add_column(column)
            for run in runs:
                runs_table.add_row(
                    Text(run["path"]),
                    run["status"],
                    run["started"][:19].replace("T", " "),
                    Text(run["error"] or ""),
                )
            console.print(runs_table)

    out.result({"artifacts": rows, "corrupt": broken, "runs": runs}, render)


@artifacts_app.command("show")
def show(
    ctx: typer.Context,
    ref: Annotated[
        str, typer.Argument(help="latest, STAGE:latest, STAGE:vN or a path.", autocompletion=complete_refs())
    ],
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
    from llmctl.workspace.integrity import verify_files

    out = state_of(ctx).output(json_)
    ws = _workspace(ctx)
    artifact = ws.resolve(ref, verify=False)  # show what changed instead of refusing to show it
    data: dict[str, Any] = artifact.manifest.model_dump(mode="json")
    data["path"] = str(artifact.path)
    problems = verify_files(artifact.path, artifact.manifest.files, ws.hashes)
    extras = artifact_extras(artifact, samples=samples, encode=encode)
    extras["integrity"] = {"ok": not problems, "problems": [p.describe() for p in problems]}
    data.update(extras)

    def render(console) -> None:
        from llmctl.cli.inspect import render_artifact

        render_artifact(console, artifact, extras)

    out.result(data, render)


@artifacts_app.command("verify")
def verify(
    ctx: typer.Context,
    ref: Annotated[
        str | None,
        typer.Argument(help="latest, STAGE:latest, STAGE:vN or a path.", autocompletion=complete_refs()),
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Verify every artifact in the workspace.")] = False,
    json_: JsonOption = False,
) -> None:
    """Rehash an artifact's files and compare them with its manifest; exit 2 on any difference.

    Every command that reads an artifact checks this too (cached by file size and time);
    LLMCTL_NO_VERIFY=1 skips that check for artifacts edited on purpose.

    [bold]Examples[/]
      llmctl artifacts verify pretrain:latest
      llmctl artifacts verify --all --json
    """
    from llmctl.workspace.integrity import verify_files

    if (ref is None) == (not all_):
        raise UsageError("give one artifact reference or --all", hint="llmctl artifacts verify --all")
    out = state_of(ctx).output(json_)
    ws = _workspace(ctx)
    if all_:
        artifacts, corrupt = ws.scan()
    else:
        artifacts, corrupt = [ws.resolve(ref, verify=False)], []
    rows = []
    for artifact in artifacts:
        problems = verify_files(artifact.path, artifact.manifest.files, ws.hashes, rehash=True)
        rows.append(
            {
                "id": artifact.id,
                "path": str(artifact.path),
                "files": len(artifact.manifest.files),
                "ok": not problems,
                "problems": [
                    {"file": str(artifact.path / p.path), "problem": p.problem, "detail": p.describe()}
                    for p in problems
                ],
            }
        )
    rows += [
        {"id": c.id, "path": str(c.path), "files": None, "ok": False, "problems": [], "corrupt": c.error}
        for c in corrupt
    ]
    bad = [row for row in rows if not row["ok"]]

    def render(console) -> None:
        table = Table("id", "files", "status")
        for row in rows:
            if row.get("corrupt"):
                status = Text(f"corrupt manifest: {row['corrupt']}", "red")
            elif row["problems"]:
                status = Text("; ".join(p["detail"] for p in row["problems"]), "red")
            else:
                status = Text("ok", "green")
            table.add_row(row["id"], "-" if row["files"] is None else str(row["files"]), status)
        console.print(table if rows else "no artifacts yet")

    out.result({"ok": not bad, "artifacts": rows}, render)
    if bad and out.json_mode:
        raise typer.Exit(code=2)
    if bad:
        first = bad[0]
        where = first["problems"][0]["file"] if first["problems"] else first["path"]
        raise InputError(
            f"{where}: does not match the manifest of {first['id']}"
            + (f" ({len(bad)} artifacts do not match theirs)" if len(bad) > 1 else ""),
            hint="re-create them by running their stages again, or remove them with `llmctl artifacts rm`",
        )


@artifacts_app.command("lineage")
def lineage(
    ctx: typer.Context,
    ref: Annotated[
        str, typer.Argument(help="latest, STAGE:latest, STAGE:vN or a path.", autocompletion=complete_refs())
    ],
    json_: JsonOption = False,
) -> None:
    """Show the tree of inputs of an artifact, down to the raw data sources.

    [bold]Examples[/]
      llmctl artifacts lineage pretrain:latest
      llmctl artifacts lineage eval:v2 --json
    """
    out = state_of(ctx).output(json_)
    ws = _workspace(ctx)
    tree = ws.lineage(ws.resolve(ref, verify=False))

    def add(branch: Tree, node: dict[str, Any]) -> None:
        for child in node.get("inputs", []):
            label = Text.assemble(child["id"], (f" ({child['kind']}, as {child['slot']})", "dim"))
            label.overflow = "fold"
            if child.get("copy_of"):
                label.append(f" a copy of {child['copy_of']}, ")
                if child["original_missing"]:
                    label.append("original no longer in the workspace", "yellow")
                elif child["matches_original"]:
                    label.append("matches the original", "green")
                else:
                    label.append("differs from the original", "red")
                label.append(f"; from {child['path']}")
            elif child.get("missing"):
                label.append(" missing", "red")
            elif child.get("changed"):
                label.append(" changed since use", "yellow")
            add(branch.add(label), child)
        for source in node.get("sources", []):
            where = str(source.get("path") or source.get("repo") or source)
            branch.add(Text.assemble(("source", "green"), " ", where))

    def render(console) -> None:
        root = Tree(Text.assemble((tree["id"], "bold"), (f" ({tree['kind']})", "dim")))
        add(root, tree)
        console.print(root, soft_wrap=False)

    out.result(tree, render)


@artifacts_app.command("rm")
def rm(
    ctx: typer.Context,
    ref: Annotated[
        str,
        typer.Argument(
            help="STAGE:vN or a path (not `latest`, to avoid surprises).", autocompletion=complete_refs()
        ),
    ],
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
    artifact = ws.find_corrupt(ref) or ws.resolve(ref, verify=False)
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
    stage: Annotated[
        str | None, typer.Argument(help="Only this stage's runs.", autocompletion=complete_stages())
    ] = None,
    resumable: Annotated[
        bool,
        typer.Option("--resumable", help="Also delete unpublished runs that `--resume` could continue."),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be deleted; delete nothing.")
    ] = False,
    yes: YesOption = False,
    json_: JsonOption = False,
) -> None:
    """Delete failed, interrupted and incomplete runs, checkpoints of published runs, and half-deleted
    artifact folders. Never published artifacts, never live runs; runs that `--resume` can continue
    are kept unless --resumable.

    [bold]Examples[/]
      llmctl artifacts clean --dry-run
      llmctl artifacts clean --yes
      llmctl artifacts clean pretrain --resumable --yes
    """
    out = state_of(ctx).output(json_)
    ws = _workspace(ctx)
    doomed = ws.leftovers(stage, resumable=resumable)
    total = sum(item.bytes for item in doomed)
    if doomed and not yes and not dry_run:
        if not sys.stdin.isatty():
            raise UsageError(
                f"would delete {len(doomed)} item(s), {_human_bytes(total)}; confirmation needed",
                hint="add --yes, or --dry-run to list them",
            )
        _render_leftovers(out.stderr, doomed)
        typer.confirm(f"Delete {len(doomed)} item(s), {_human_bytes(total)}?", abort=True)
    removed = [] if dry_run else ws.clean(doomed)
    listed = doomed if dry_run else removed
    data = {
        "dry_run": dry_run,
        "removed": [
            {"path": str(i.path), "what": i.what, "stage": i.stage, "bytes": i.bytes} for i in removed
        ],
        "would_remove": [
            {"path": str(i.path), "what": i.what, "stage": i.stage, "bytes": i.bytes}
            for i in (doomed if dry_run else [])
        ],
        "bytes": sum(i.bytes for i in listed),
    }

    def render(console) -> None:
        if listed:
            _render_leftovers(console, listed)
        verb = "would remove" if dry_run else "removed"
        console.print(f"{verb} {len(listed)} item(s), {_human_bytes(data['bytes'])}")

    out.result(data, render)


def _render_leftovers(console, items) -> None:
    table = Table("what", "size")
    table.add_column("path", overflow="fold")
    for item in items:
        table.add_row(item.what, _human_bytes(item.bytes), Text(str(item.path)))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(artifacts_app, name="artifacts")
