"""The `llmctl` command tree: root options, command registration, and error-to-exit-code mapping.

Exit codes: 0 ok, 1 failure, 2 usage/config/input error, 130 interrupted. Errors print one
`Error:` line (plus one line per config key) and a `Hint:`; tracebacks only with LLMCTL_DEBUG=1.
Nothing heavy is imported here: commands import torch/datatrove inside their bodies.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from llmctl import __version__
from llmctl.cli import artifacts, evals, models, pipeline, project, stages
from llmctl.cli.options import CliState
from llmctl.errors import Interrupted, LlmctlError

app = typer.Typer(
    name="llmctl",
    help="Build language models end to end: dedup, filter, tokenize, pretrain, eval — one artifact per stage.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"llmctl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout.")] = False,
    project_dir: Annotated[
        Path | None,
        typer.Option(
            "-C",
            "--project",
            help="Project folder (default: the nearest folder at or above the current one with llmctl.yaml).",
            show_default=False,
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and results.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More detail in logs.")] = False,
) -> None:
    """llmctl: raw documents to an evaluated language model.

    [bold]Start:[/] llmctl init demo && llmctl -C demo run
    """
    ctx.obj = CliState(project_option=project_dir, json=json_, quiet=quiet, verbose=verbose)


project.register(app)
artifacts.register(app)
pipeline.register(app)
stages.register(app)
models.register(app)
evals.register(app)


_MAIN_PID = os.getpid()


def _raise_interrupted(signum: int, frame: object) -> None:
    if os.getpid() != _MAIN_PID:
        # A forked worker (multiprocessing pools) inherits this handler: die as the signal says,
        # quietly; the main process reports the interruption once.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise Interrupted(f"interrupted by {signal.Signals(signum).name}")


def main() -> None:
    """Console-script entry point."""
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    # datatrove logs every step at INFO through loguru; keep stderr for our own progress unless asked.
    if "-v" not in sys.argv[1:] and "--verbose" not in sys.argv[1:]:
        os.environ.setdefault("LOGURU_LEVEL", "WARNING")
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)
    json_mode = "--json" in sys.argv[1:]
    try:
        app(prog_name="llmctl")
    except LlmctlError as exc:
        from llmctl.cli.output import Output

        if os.environ.get("LLMCTL_DEBUG") == "1":
            import traceback

            traceback.print_exc()
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for every rank
            Output(json_mode=json_mode).error(exc)
        sys.exit(exc.exit_code)
    except Exception as exc:  # a bug, not a user error: say so, and how to get the traceback
        from llmctl.cli.output import Output

        if os.environ.get("LLMCTL_DEBUG") == "1":
            raise
        internal = LlmctlError(
            f"internal error: {type(exc).__name__}: {exc}",
            hint="rerun with LLMCTL_DEBUG=1 for the traceback, and please report it",
        )
        Output(json_mode=json_mode).error(internal)
        sys.exit(1)
