"""Options shared by many commands, defined once, and the per-invocation CLI state."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from llmctl.cli.completion import complete_refs
from llmctl.cli.output import Output
from llmctl.errors import UsageError

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        metavar="KEY.PATH=VALUE",
        help="Override a config key (typed by the schema), e.g. --set dedup.bands=20. Repeatable.",
        show_default=False,
    ),
]
ForceOption = Annotated[
    bool, typer.Option("--force", help="Run again even when an up-to-date artifact already exists.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout.")]
ResumeOption = Annotated[bool, typer.Option("--resume", help="Continue the newest unfinished run.")]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


def model_option(help: str) -> Any:
    """`--model/-m REF`, completing model artifact ids, with a command's own help."""
    return Annotated[
        str | None,
        typer.Option("--model", "-m", help=help, autocompletion=complete_refs(("model",))),
    ]


@dataclass
class CliState:
    """Root options, shared by every command through typer's context object."""

    project_option: Path | None = None
    json: bool = False
    quiet: bool = False
    verbose: bool = False
    # The project folder once a command has found it (environment errors name it when the OS doesn't).
    resolved_project: Path | None = None

    def output(self, json_flag: bool = False) -> Output:
        if json_flag:
            self.json = True
        return Output(json_mode=self.json, quiet=self.quiet, verbose=self.verbose)

    def project_dir(self) -> Path:
        self.resolved_project = self._find_project_dir()
        return self.resolved_project

    def _find_project_dir(self) -> Path:
        from llmctl.config.loading import PROJECT_FILE, find_project_dir

        if self.project_option is not None:
            folder = self.project_option.expanduser().resolve()
            if not (folder / PROJECT_FILE).is_file():
                raise UsageError(
                    f"{folder}: no {PROJECT_FILE} here", hint="llmctl init NAME creates a project"
                )
            return folder
        found = find_project_dir(Path.cwd())
        if found is None:
            raise UsageError(
                f"not inside an llmctl project (no {PROJECT_FILE} in {Path.cwd()} or above)",
                hint="cd into a project, pass -C DIR, or create one with `llmctl init NAME`",
            )
        return found

    def load_project(self, sets: list[str] | None = None) -> tuple[Any, Path]:
        """The validated project config (after --set overrides) and the project folder."""
        from llmctl.config.loading import PROJECT_FILE, load_config
        from llmctl.stages.registry import project_model

        folder = self.project_dir()
        return load_config(project_model(), folder / PROJECT_FILE, sets, context={"base_dir": folder}), folder


def state_of(ctx: typer.Context) -> CliState:
    if ctx.obj is None:
        ctx.obj = CliState()
    return ctx.obj
