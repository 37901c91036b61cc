"""A command for every registered stage that has none yet: the entry's `command` (`module:function`)
or a generic one built from the entry itself.

The generic command takes one `--SLOT` option per input (an artifact reference; default: what the
registry's rule picks), `--force`, `--set` and `--json`, and runs the stage like any other; a
distributed stage's also takes `--gpus`, `--nodes`, `--node-rank`, `--master-addr`, `--master-port`
and `--device` (see llmctl/stages/launch.py), and a stage that keeps its run folder (training
stages) `--resume`.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Any

import typer

from llmctl.cli.completion import complete_refs
from llmctl.cli.options import ForceOption, JsonOption, ResumeOption, SetOption
from llmctl.cli.stages import device_option, launch_options, run_stage_command


def generic_command(stage: Any) -> Any:
    """A typer command for `stage`: run it (or reuse its up-to-date artifact) and print the outcome."""
    slots = [slot.name for slot in stage.inputs]
    # A distributed stage's section (its first) holds `device`: --device sets it.
    launch_flags = (
        [*launch_options(), ("device", device_option(stage.sections[0]), None)] if stage.distributed else []
    )

    def command(ctx: typer.Context, **params: Any) -> None:
        refs = {slot: params.get(slot.replace("-", "_")) for slot in slots}
        launch = {name: params[name] for name, _, _ in launch_flags} if launch_flags else None
        run_stage_command(
            ctx,
            stage.name,
            sets=params["sets"],
            force=params["force"],
            json_=params["json_"],
            refs=refs,
            resume=params.get("resume", False),
            launch=launch,
        )

    parameters = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    for slot in stage.inputs:
        option = typer.Option(
            f"--{slot.name}",
            help=f"Input {'/'.join(slot.kinds)} artifact (default: the newest, as the stage registry says).",
            autocompletion=complete_refs(slot.kinds),
        )
        parameters.append(
            inspect.Parameter(
                slot.name.replace("-", "_"),
                inspect.Parameter.KEYWORD_ONLY,
                annotation=Annotated[str | None, option],
                default=None,
            )
        )
    resume = [("resume", ResumeOption, False)] if stage.keeps_run_dir else []
    for name, annotation, default in (
        *launch_flags,
        *resume,
        ("force", ForceOption, False),
        ("sets", SetOption, None),
        ("json_", JsonOption, False),
    ):
        parameters.append(
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
        )
    command.__signature__ = inspect.Signature(parameters)  # what typer reads for the options
    examples = list(stage.examples) or [f"llmctl {stage.name}", f"llmctl {stage.name} --force --json"]
    if stage.distributed and not stage.examples:
        examples.append(f"llmctl {stage.name} --gpus 2 --device cpu")
    command.__doc__ = f"{stage.description}\n\n[bold]Examples[/]\n" + "".join(f"  {e}\n" for e in examples)
    return command


def register(app: typer.Typer) -> None:
    from llmctl.stages import STAGES
    from llmctl.stages.registry import load_object

    taken = {info.name for info in app.registered_commands}
    for stage in STAGES.values():
        if stage.name in taken:
            continue
        app.command(stage.name)(load_object(stage.command) if stage.command else generic_command(stage))
