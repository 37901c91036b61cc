"""The one output sink of the CLI: data to stdout, everything else to stderr.

Data is either rendered for people (rich tables/text) or printed as exactly one JSON document
(`--json`). Logs, warnings, progress and hints go to stderr. Progress is a rich bar on a TTY and
plain, rate-limited lines otherwise (or with --json), so logs of batch jobs stay readable.

Markup is off on every console: paths, keys, document text and model output are printed as they
are (a folder named `br [/x]` is not a closing tag). Styling is explicit, with `Text` and `style=`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from llmctl.errors import ConfigError, LlmctlError
from llmctl.reporting import ProgressTask, Reporter


def console(*, stderr: bool = False, highlight: bool = True) -> Console:
    """A console that never reads markup in what it prints (user data is data)."""
    return Console(stderr=stderr, soft_wrap=True, markup=False, highlight=highlight)


def _fields_text(fields: dict[str, Any]) -> str:
    parts = []
    for key, value in fields.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{key}={value}")
    return " ".join(parts)


class _RateColumn(ProgressColumn):
    """Items per second in the task's own unit (docs/s, tok/s, steps/s)."""

    def render(self, task: Any) -> Text:
        unit = task.fields.get("unit", "it")
        if task.speed is None:
            return Text(f"? {unit}/s", style="progress.data.speed")
        return Text(f"{task.speed:,.1f} {unit}/s", style="progress.data.speed")


class _RichTask(ProgressTask):
    def __init__(
        self, progress: Progress, description: str, total: float | None, unit: str, on_close, completed: float
    ):
        self._progress = progress
        self._on_close = on_close
        self._fields: dict[str, Any] = {}
        # A start value, not an advance: rich's speed counts only later updates.
        self._id = progress.add_task(description, total=total, completed=completed, info="", unit=unit)

    def advance(self, n: float = 1, **fields: Any) -> None:
        self._fields.update(fields)
        self._progress.update(self._id, advance=n, info=_fields_text(self._fields))

    def update(self, completed: float | None = None, total: float | None = None, **fields: Any) -> None:
        self._fields.update(fields)
        self._progress.update(self._id, completed=completed, total=total, info=_fields_text(self._fields))

    def __exit__(self, *exc: object) -> None:
        self._on_close(self._id)


class _PlainTask(ProgressTask):
    """A line every `interval` seconds and a final one: `dedup: 4,000/10,000 docs 812 docs/s eta 7s`.

    The final line is printed only when it says something the last periodic line did not (a task that
    ends right after a periodic line would otherwise print the same count twice), and has no eta.
    """

    def __init__(
        self,
        console: Console,
        description: str,
        total: float | None,
        unit: str,
        interval: float,
        completed: float = 0.0,
    ):
        self._console, self._description, self._total, self._unit = console, description, total, unit
        self._interval = interval
        self._done = self._start_done = completed  # the rate counts only what this process does
        self._fields: dict[str, Any] = {}
        self._start = self._last = time.monotonic()
        self._printed: tuple[Any, ...] | None = None  # the state the last printed line showed

    def _state(self) -> tuple[Any, ...]:
        return (self._done, self._total, tuple(self._fields.items()))

    def _line(self, final: bool = False) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = (self._done - self._start_done) / elapsed
        count = f"{self._done:,.0f}" + (f"/{self._total:,.0f}" if self._total else "")
        eta = ""
        if not final and self._total and rate > 0 and self._done < self._total:
            eta = f" eta {(self._total - self._done) / rate:.0f}s"
        extra = f" {_fields_text(self._fields)}" if self._fields else ""
        return f"{self._description}: {count} {self._unit} {rate:,.1f} {self._unit}/s{eta}{extra}"

    def _print(self, final: bool = False) -> None:
        self._printed = self._state()
        self._console.print(self._line(final), highlight=False, markup=False)

    def _maybe_print(self) -> None:
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._print()

    def advance(self, n: float = 1, **fields: Any) -> None:
        self._done += n
        self._fields.update(fields)
        self._maybe_print()

    def update(self, completed: float | None = None, total: float | None = None, **fields: Any) -> None:
        if completed is not None:
            self._done = completed
        if total is not None:
            self._total = total
        self._fields.update(fields)
        self._maybe_print()

    def __exit__(self, *exc: object) -> None:
        if self._printed != self._state():
            self._print(final=True)


class CliReporter(Reporter):
    """Reporter for the terminal: rich bars on a TTY, plain lines otherwise; silent logs with --quiet."""

    def __init__(self, console: Console, *, quiet: bool, plain: bool, interval: float = 5.0):
        self._console = console
        self._quiet = quiet
        self._plain = plain
        self._interval = interval
        self._progress: Progress | None = None
        self._open = 0

    def log(self, message: str) -> None:
        if not self._quiet:
            self._console.print(message, highlight=False, markup=False)

    def warn(self, message: str) -> None:
        self._console.print(Text.assemble(("Warning: ", "yellow"), message))

    def progress(
        self, description: str, total: float | None = None, unit: str = "it", completed: float = 0
    ) -> ProgressTask:
        if self._quiet:
            return ProgressTask()
        if self._plain:
            return _PlainTask(self._console, description, total, unit, self._interval, completed)
        if self._progress is None:
            self._progress = Progress(
                TextColumn("{task.description}", style="bold", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                _RateColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}", markup=False),
                console=self._console,
                transient=False,
            )
            self._progress.start()
        self._open += 1
        return _RichTask(self._progress, description, total, unit, self._close, completed)

    def _close(self, task_id: Any) -> None:
        self._open -= 1
        if self._open == 0 and self._progress is not None:
            self._progress.stop()
            self._progress = None


class Output:
    """Where every command writes. `json_mode` means: exactly one JSON document on stdout."""

    def __init__(self, *, json_mode: bool = False, quiet: bool = False, verbose: bool = False):
        self.json_mode = json_mode
        self.quiet = quiet
        self.verbose = verbose
        self.stdout = console()
        self.stderr = console(stderr=True)

    def reporter(self) -> CliReporter:
        plain = self.json_mode or not self.stderr.is_terminal
        return CliReporter(self.stderr, quiet=self.quiet, plain=plain)

    def result(self, data: Any, render: Callable[[Console], None] | None = None) -> None:
        """Emit a command's result: JSON with --json, else `render(console)` (or pretty JSON)."""
        if self.json_mode:
            sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
            sys.stdout.flush()
        elif render is not None:
            render(self.stdout)
        else:
            self.stdout.print_json(json.dumps(data, default=str))

    def log(self, message: str) -> None:
        if not self.quiet:
            self.stderr.print(message, highlight=False)

    def error(self, exc: LlmctlError) -> None:
        errors = exc.errors if isinstance(exc, ConfigError) else []
        if self.json_mode:
            doc = {
                "ok": False,
                "error": {
                    "type": type(exc).__name__,
                    "message": exc.message,
                    "errors": errors,
                    "hint": exc.hint,
                    "exit_code": exc.exit_code,
                },
            }
            sys.stdout.write(json.dumps(doc, indent=2) + "\n")
            sys.stdout.flush()
        err = console(stderr=True, highlight=False)
        err.print(Text.assemble(("Error: ", "bold red"), exc.message))
        for line in errors:
            err.print(Text(f"  {line}"))
        if exc.hint:
            err.print(Text.assemble(("Hint: ", "bold"), exc.hint))
