"""Error types a user can cause or meet, each carrying its exit code and an optional hint.

Library code raises these; only the CLI turns them into `Error:`/`Hint:` lines and an exit code.
Exit codes are a contract: 0 ok, 1 failure, 2 usage/config/input error, 130 interrupted.
"""

from __future__ import annotations

from typing import NoReturn


class LlmctlError(Exception):
    """Base class: a message for people, an exit code for scripts, an optional fix."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(LlmctlError):
    """Bad command-line usage: unknown option value, bad --set syntax, outside a project."""

    exit_code = 2


class ConfigError(LlmctlError):
    """llmctl.yaml (or an override) does not validate; `errors` holds one line per key path."""

    exit_code = 2

    def __init__(self, message: str, errors: list[str] | None = None, hint: str | None = None):
        super().__init__(message, hint)
        self.errors = errors or []


class InputError(LlmctlError):
    """Input data or an artifact reference is wrong: missing/corrupt/empty file, unknown reference."""

    exit_code = 2


class StageFailed(LlmctlError):
    """A stage started and failed for a reason that is not the user's input (exit 1)."""

    exit_code = 1


class Interrupted(LlmctlError):
    """The run was interrupted (SIGINT/SIGTERM); resumable state was saved where possible."""

    exit_code = 130


_signals_received: list[str] = []


def interrupt(signal_name: str) -> NoReturn:
    """Raise Interrupted for a signal (from the main thread's signal handler) and remember it.

    Python runs a signal handler wherever the main thread happens to be; when that is a callback
    whose exceptions Python only prints ("Exception ignored in": an at-fork hook, __del__), the
    Interrupted is lost and the run would go on to publish. `raise_if_interrupted` raises it again
    at the next safe point (a worker result, the end of a stage before publishing)."""
    _signals_received.append(signal_name)
    raise Interrupted(f"interrupted by {signal_name}")


def raise_if_interrupted() -> None:
    """Raise Interrupted if a signal arrived in this process (see `interrupt`)."""
    if _signals_received:
        raise Interrupted(f"interrupted by {_signals_received[0]}")
