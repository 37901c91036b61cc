"""The `llmctl` command tree: root options, command registration, and error-to-exit-code mapping.

Exit codes: 0 ok, 1 failure, 2 usage/config/input/environment error, 130 interrupted. Every error,
including the parser's own (unknown command or option, missing argument, bad value), prints one
`Error:` line (plus one line per config key) and a `Hint:`; with --json, stdout gets exactly one
JSON document, the result or the error. Tracebacks only with LLMCTL_DEBUG=1.
Nothing heavy is imported here: commands import torch/datatrove inside their bodies.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from llmctl import __version__
from llmctl.cli import (
    artifacts,
    evals,
    models,
    pipeline,
    plan,
    project,
    report,
    serve,
    stage_commands,
    stages,
)
from llmctl.cli.completion import COMPLETE_VAR, SHELLS, completion_script, prepare_completion
from llmctl.cli.error_mapping import context_from_argv, environment_error, usage_error
from llmctl.cli.options import CliState
from llmctl.errors import LlmctlError, interrupt
from llmctl.threads import set_thread_budget

HELP_OPTION_NAMES = ["-h", "--help"]

app = typer.Typer(
    name="llmctl",
    help="Build language models end to end: dedup, filter, tokenize, pretrain, eval — one artifact per stage.",
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,  # typer's --show-completion ignores its SHELL argument; ours is below
    context_settings={"help_option_names": HELP_OPTION_NAMES},
)


def _state(ctx: typer.Context) -> CliState:
    if not isinstance(ctx.obj, CliState):
        ctx.obj = CliState()
    return ctx.obj


def _version(ctx: typer.Context, value: bool) -> None:
    if value:
        if _state(ctx).json:
            _state(ctx).output().result({"version": __version__})
        else:
            print(f"llmctl {__version__}")
        raise typer.Exit()


def _show_completion(value: str | None) -> None:
    if value is None:
        return
    if value not in SHELLS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(SHELLS)}")
    sys.stdout.write(completion_script(value))
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
    show_completion: Annotated[
        str | None,
        typer.Option(
            "--show-completion",
            metavar="SHELL",
            callback=_show_completion,
            is_eager=True,
            expose_value=False,
            help="Print the completion script for bash, zsh or fish (see completions/README.md).",
        ),
    ] = None,
) -> None:
    """llmctl: raw documents to an evaluated language model.

    [bold]Start:[/] llmctl init demo && llmctl -C demo run
    """
    state = _state(ctx)
    state.project_option = project_dir
    state.json = state.json or json_
    state.quiet, state.verbose = quiet, verbose


project.register(app)
artifacts.register(app)
pipeline.register(app)
stages.register(app)
models.register(app)
evals.register(app)
serve.register(app)
plan.register(app)
report.register(app)
stage_commands.register(app)  # every other registered stage (see llmctl/stages/registry.py)


def _walk(command: Any) -> Any:
    yield command
    for sub in getattr(command, "commands", {}).values():
        yield from _walk(sub)


def build_command() -> Any:
    """The command tree as the parser sees it, with our contract applied to every node."""
    command = typer.main.get_command(app)
    for node in _walk(command):
        # A group called without a command is a usage error (Error/Hint, or JSON), not a help page
        # on stdout that would break `--json`'s one-document promise.
        node.no_args_is_help = False
        # The help option is made on first use and cached; make it now so its metavar can be fixed.
        help_option = node.get_help_option(typer.Context(node, help_option_names=HELP_OPTION_NAMES))
        for param in [*node.params, help_option]:
            if param is not None and getattr(param, "is_flag", False):
                param.metavar = ""  # a flag takes no value: no `<bool>` beside it in --help
    return command


_MAIN_PID = os.getpid()


def _raise_interrupted(signum: int, frame: object) -> None:
    if os.getpid() != _MAIN_PID:
        # A forked worker (multiprocessing pools) inherits this handler: die as the signal says,
        # quietly; the main process reports the interruption once.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    interrupt(signal.Signals(signum).name)


def json_requested(argv: list[str]) -> bool:
    """`--json` anywhere before `--` (the root's or a command's: errors happen before either parses)."""
    return "--json" in (argv[: argv.index("--")] if "--" in argv else argv)


def _report(exc: LlmctlError, json_mode: bool) -> None:
    from llmctl.cli.output import Output

    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for every rank
        Output(json_mode=json_mode).error(exc)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    argv = list(sys.argv[1:] if argv is None else argv)
    # datatrove logs every step at INFO through loguru; keep stderr for our own progress unless asked.
    if "-v" not in argv and "--verbose" not in argv:
        os.environ.setdefault("LOGURU_LEVEL", "WARNING")
    # Before torch starts its OpenMP pool (commands import it later): no more threads than the cores
    # this process may use (affinity, cgroup quota), here and in every child; --threads narrows it.
    set_thread_budget()
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)
    if os.environ.get(COMPLETE_VAR):
        prepare_completion()
    json_mode = json_requested(argv)
    state = CliState(json=json_mode)
    debug = os.environ.get("LLMCTL_DEBUG") == "1"
    command = build_command()
    try:
        code = command.main(args=argv or ["--help"], prog_name="llmctl", standalone_mode=False, obj=state)
    except LlmctlError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        _report(exc, json_mode)
        sys.exit(exc.exit_code)
    except typer.Abort:
        _report(LlmctlError("aborted"), json_mode)
        sys.exit(1)
    except typer.TyperException as exc:  # the parser's usage errors (typer's vendored click)
        if getattr(exc, "exit_code", 1) == 2:
            _report(usage_error(exc, context_from_argv(command, argv)), json_mode)
            sys.exit(2)
        _report(LlmctlError(exc.format_message()), json_mode)
        sys.exit(exc.exit_code)
    except (OSError, MemoryError, RuntimeError) as exc:
        problem = environment_error(exc, state.resolved_project)
        if problem is None:
            _internal_error(exc, json_mode, debug)
        if debug:
            import traceback

            traceback.print_exc()
        _report(problem, json_mode)
        sys.exit(problem.exit_code)
    except Exception as exc:
        _internal_error(exc, json_mode, debug)
    sys.exit(code if isinstance(code, int) else 0)


def _internal_error(exc: Exception, json_mode: bool, debug: bool) -> None:
    """A bug, not a user error: say so, and how to get the traceback."""
    if debug:
        raise exc
    internal = LlmctlError(
        f"internal error: {type(exc).__name__}: {exc}",
        hint="rerun with LLMCTL_DEBUG=1 for the traceback, and please report it",
    )
    _report(internal, json_mode)
    sys.exit(1)
