"""Turn what the command line parser and the machine raise into llmctl errors with a hint.

Usage errors (unknown command or option, missing argument, bad value) become a `UsageError` whose
hint names the closest command or option (difflib) or a real example from the command's help.
Environment errors (disk full, read-only or forbidden paths, out of memory) become an
`EnvironmentProblem` naming the path or operation, never an "internal error" asking for a report.
"""

from __future__ import annotations

import difflib
import errno
import re
import sys
from pathlib import Path
from typing import Any

from llmctl.errors import LlmctlError, UsageError


class EnvironmentProblem(LlmctlError):
    """The machine refused: no space, read-only or forbidden path, no memory (exit 2, not a bug)."""

    exit_code = 2


def _command_path(ctx: Any) -> str:
    return getattr(ctx, "command_path", None) or "llmctl"


def _subcommands(ctx: Any) -> list[str]:
    command = getattr(ctx, "command", None)
    if command is None or not hasattr(command, "list_commands"):
        return []
    return [name for name in command.list_commands(ctx) if not command.get_command(ctx, name).hidden]


def _option_names(ctx: Any) -> list[str]:
    command = getattr(ctx, "command", None)
    if command is None:
        return []
    names: list[str] = []
    for param in command.get_params(ctx):
        if getattr(param, "param_type_name", "") == "option":
            names += [*param.opts, *param.secondary_opts]
    return names


def first_example(ctx: Any, using: list[str] | None = None) -> str | None:
    """The first `llmctl ...` line of the command's help (every command lists real examples),
    preferring one that uses any of the option names in `using`."""
    command = getattr(ctx, "command", None)
    lines = [line.split("  #")[0].strip() for line in (getattr(command, "help", None) or "").splitlines()]
    examples = [line for line in lines if line.startswith("llmctl ")]
    for line in examples:
        if any(name in line.split() for name in using or []):
            return line
    return examples[0] if examples else None


def _help_hint(ctx: Any, param: Any = None) -> str:
    example = first_example(ctx, list(getattr(param, "opts", None) or []))
    more = f"`{_command_path(ctx)} --help` shows the usage"
    return f"e.g. `{example}`; {more}" if example else more


def _unknown_command(name: str, ctx: Any) -> UsageError:
    where = _command_path(ctx)
    commands = _subcommands(ctx)
    close = difflib.get_close_matches(name, commands, n=1)
    hint = f"did you mean `{where} {close[0]}`?" if close else f"commands: {', '.join(commands)}"
    return UsageError(f"unknown command {name!r} for `{where}`", hint=hint)


def _unknown_option(option: str, ctx: Any) -> UsageError:
    where = _command_path(ctx)
    close = difflib.get_close_matches(option, _option_names(ctx), n=1)
    if close:
        hint = f"did you mean {close[0]}? (`{where} --help` lists the options)"
    else:
        hint = f"`{where} --help` lists the options"
    return UsageError(f"unknown option {option} for `{where}`", hint=hint)


def _option(ctx: Any, name: str) -> Any:
    command = getattr(ctx, "command", None)
    for param in command.get_params(ctx) if command is not None else []:
        if name in getattr(param, "opts", []):
            return param
    return None


def _param_label(param: Any) -> str:
    if getattr(param, "param_type_name", "") == "argument":
        return (param.metavar or param.name or "").upper()
    return "/".join(getattr(param, "opts", []) or [param.name])


def context_from_argv(root: Any, argv: list[str]) -> Any:
    """A context for the deepest command `argv` names, for parser errors raised without one."""
    import typer

    ctx = typer.Context(root, info_name="llmctl")
    for token in argv:
        sub = getattr(ctx.command, "commands", {}).get(token)
        if sub is not None:
            ctx = typer.Context(sub, info_name=token, parent=ctx)
    return ctx


def usage_error(exc: Any, fallback_ctx: Any = None) -> UsageError:
    """A UsageError for one of typer's parser exceptions (exit_code 2); `fallback_ctx` when it has none."""
    ctx = getattr(exc, "ctx", None) or fallback_ctx
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    if hasattr(exc, "possibilities") and getattr(exc, "option_name", None):  # no such option
        return _unknown_option(exc.option_name, ctx)
    unknown = re.match(r"No such command '(.*?)'", message)
    if unknown:
        return _unknown_command(unknown.group(1), ctx)
    if message.startswith("Missing command"):
        return UsageError(
            f"`{_command_path(ctx)}` needs a command",
            hint=f"one of: {', '.join(_subcommands(ctx))} (`{_command_path(ctx)} --help` says more)",
        )
    if getattr(exc, "option_name", None) and "requires an argument" in message:
        return UsageError(
            f"{exc.option_name} needs a value", hint=_help_hint(ctx, _option(ctx, exc.option_name))
        )
    param = getattr(exc, "param", None)
    if param is not None and message.startswith("Missing"):
        kind = "argument" if getattr(param, "param_type_name", "") == "argument" else "option value"
        return UsageError(
            f"missing {kind} {_param_label(param)} for `{_command_path(ctx)}`", hint=_help_hint(ctx, param)
        )
    if param is not None:
        detail = re.sub(r"^Invalid value for [^:]*:\s*", "", message).rstrip(".")
        return UsageError(
            f"bad value for {_param_label(param)} of `{_command_path(ctx)}`: {detail}",
            hint=_help_hint(ctx, param),
        )
    text = message.rstrip(".")
    return UsageError(text[:1].lower() + text[1:], hint=_help_hint(ctx))


_ENV_ERRNOS = {
    errno.ENOSPC: ("no space left on the device", "free disk space, or set `workspace:` to a bigger disk"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota, or set `workspace:` elsewhere"),
    errno.EFBIG: ("file too large for this system's limits", "raise the file size limit (ulimit -f)"),
    errno.EROFS: ("read-only file system", "run in a writable copy of the project, or set `workspace:`"),
    errno.EACCES: ("permission denied", "check the owner and mode of the path"),
    errno.EPERM: ("operation not permitted", "check the owner and mode of the path"),
    errno.ENOTDIR: ("a file is where a folder is expected", "move the file out of the way"),
    errno.EISDIR: ("a folder is where a file is expected", "move the folder out of the way"),
    errno.EMFILE: ("too many open files", "raise the open-file limit (ulimit -n)"),
    errno.ENOMEM: ("out of memory", "free memory, or lower the batch size or model size"),
}


def environment_error(exc: BaseException, project: Path | None) -> EnvironmentProblem | None:
    """An EnvironmentProblem for disk-full, read-only, permission and memory failures, else None."""
    if isinstance(exc, MemoryError) or _is_torch_out_of_memory(exc):
        return EnvironmentProblem(
            f"out of memory ({type(exc).__name__}: {str(exc)[:200] or 'allocation failed'})",
            hint="free memory, or lower the batch size, model size or workers (`--set ...`)",
        )
    if not isinstance(exc, OSError) or exc.errno not in _ENV_ERRNOS:
        return None
    what, hint = _ENV_ERRNOS[exc.errno]
    paths = [str(p) for p in (exc.filename, exc.filename2) if p]
    if paths:
        message = f"{what}: {' -> '.join(paths)}"
    else:
        # write() and flush() don't say which file; the project's workspace is where llmctl writes.
        message = f"{what} (while writing under {project or Path.cwd()})"
    return EnvironmentProblem(message, hint=hint)


def _is_torch_out_of_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    # torch's CPU allocator reports a failed allocation as a RuntimeError with this wording.
    return isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc)
