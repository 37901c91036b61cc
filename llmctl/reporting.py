"""How library code reports logs and progress without knowing about the terminal.

Stages and long library functions take a `Reporter`; the CLI passes one that draws rich progress
bars (or plain lines when not a TTY / with --json). The base class is a silent no-op, so library
code can be called from scripts and tests with `Reporter()`.

    with reporter.progress("minhash", total=n_docs, unit="docs") as bar:
        for batch in batches:
            ...
            bar.advance(len(batch))
            bar.update(loss=1.23)          # extra fields shown beside the bar
    reporter.log("kept 9,512 of 10,000 documents")
"""

from __future__ import annotations

from typing import Any


class ProgressTask:
    """One progress bar; a no-op unless a subclass draws it."""

    def advance(self, n: float = 1, **fields: Any) -> None:
        pass

    def update(self, completed: float | None = None, total: float | None = None, **fields: Any) -> None:
        pass

    def __enter__(self) -> ProgressTask:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class Reporter:
    """Silent reporter; the CLI subclasses it. `warn` is for things a user should act on."""

    def log(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    def progress(
        self, description: str, total: float | None = None, unit: str = "it", completed: float = 0
    ) -> ProgressTask:
        """A progress bar. `completed` is work done before (a resumed run): shown in the count, never in
        the rate, which counts only what this process does."""
        return ProgressTask()
