"""Project commands: `llmctl init` and `llmctl config validate|show|schema`."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from llmctl.cli.options import JsonOption, SetOption, state_of
from llmctl.errors import UsageError

config_app = typer.Typer(
    help="Validate, show and describe the project file (llmctl.yaml).", no_args_is_help=True
)


def init(
    ctx: typer.Context,
    name: Annotated[
        str | None, typer.Argument(help="Folder to create (its name becomes the project name).")
    ] = None,
    template: Annotated[
        str, typer.Option("--template", "-t", help="Project template (see --list).")
    ] = "tiny",
    list_: Annotated[bool, typer.Option("--list", help="List the templates and exit.")] = False,
    json_: JsonOption = False,
) -> None:
    """Create a project folder from a template: a commented llmctl.yaml and a data/ folder.

    [bold]Examples[/]
      llmctl init demo                      # tiny: CPU, offline, whole pipeline in minutes
      llmctl init gpt2 --template gpt2-fineweb
      llmctl init --list
    """
    from llmctl.project import init_project, list_templates

    out = state_of(ctx).output(json_)
    if list_:
        templates = list_templates()

        def render(console) -> None:
            table = Table("template", "description")
            for t in templates:
                table.add_row(t.name, t.description)
            console.print(table)

        out.result([{"name": t.name, "description": t.description} for t in templates], render)
        return
    if not name:
        raise UsageError("missing project NAME", hint="llmctl init demo")
    dest = Path(name).expanduser().resolve()
    made = init_project(dest, template)
    needs = f"\nNeeds: {made['requires']}" if made.get("requires") else ""
    out.result(
        made,
        lambda console: console.print(
            f"Created {made['project']} from template {made['template']!r}.{needs}\n"
            f"Next: cd {shlex.quote(name)} && {made['next']}",
            highlight=False,
            markup=False,
        ),
    )


@config_app.command("validate")
def config_validate(ctx: typer.Context, sets: SetOption = None, json_: JsonOption = False) -> None:
    """Check llmctl.yaml (and any --set overrides) against the schema; every error at once.

    [bold]Examples[/]
      llmctl config validate
      llmctl config validate --set dedup.bands=20
    """
    state = state_of(ctx)
    out = state.output(json_)
    config, folder = state.load_project(sets)
    out.result(
        {"ok": True, "project": config.name, "path": str(folder / "llmctl.yaml")},
        lambda console: console.print(f"{folder / 'llmctl.yaml'}: OK", highlight=False),
    )


@config_app.command("show")
def config_show(ctx: typer.Context, sets: SetOption = None, json_: JsonOption = False) -> None:
    """Print the resolved config: defaults filled in, overrides applied.

    [bold]Examples[/]
      llmctl config show
      llmctl config show --set pretrain.max_steps=10 --json
    """
    import yaml

    state = state_of(ctx)
    out = state.output(json_)
    config, _ = state.load_project(sets)
    data = config.model_dump(mode="json")
    out.result(
        data,
        lambda console: console.print(yaml.safe_dump(data, sort_keys=False), highlight=False, markup=False),
    )


@config_app.command("schema")
def config_schema(ctx: typer.Context) -> None:
    """Print the JSON Schema of llmctl.yaml (for editor completion and validation).

    [bold]Examples[/]
      llmctl config schema > llmctl.schema.json
    """
    import json

    from llmctl.stages.registry import project_model

    print(json.dumps(project_model().model_json_schema(), indent=2))


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.add_typer(config_app, name="config")
