"""Stop a training loop at a step boundary on Ctrl-C or SIGTERM, never in the middle of an update.

An exception raised by a signal handler lands between any two bytecodes, including inside
`optimizer.step()` where some parameters are updated and others are not; such weights cannot be
checkpointed (a probe lost the checkpoint in 2 of 5 Ctrl-Cs). While a loop runs under
`StepBoundaryStop`, SIGINT and SIGTERM only set a flag; the loop checks it after each step, saves
a checkpoint and raises `Interrupted` (exit 130).

    with StepBoundaryStop() as stop:      # or stop.install() ... finally: stop.restore()
        while step < max_steps:
            ...one full step...
            if stop.requested:
                save(); raise stop.interrupted()

Further signals are deferred too: launchers (torchrun, SLURM) forward the user's Ctrl-C or send
SIGTERM right after it, so "a second signal stops at once" would stop every worker mid-step. Ctrl-\
(SIGQUIT) or kill -9 still stop a step that hangs.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from llmctl.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StepBoundaryStop:
    """Context manager: defer SIGINT/SIGTERM to the loop's next step boundary (main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def interrupted(self) -> Interrupted:
        name = signal.Signals(self.signum).name if self.signum is not None else "a signal"
        return Interrupted(f"interrupted by {name}")

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    def install(self) -> StepBoundaryStop:
        # Handlers can only be installed from the main thread; elsewhere signals keep their behaviour.
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> StepBoundaryStop:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()
