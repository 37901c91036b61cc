"""Test-only fault points: places where a test can kill or hold the process at a chosen moment.

Only the test suite sets `LLMCTL_TEST_FAULT`; without it `fault_point()` is one environment lookup and
returns. Its value is `POINT[@N][:meet]`:

    LLMCTL_TEST_FAULT=publish-before-rename    SIGKILL the process the first time it reaches the point
    LLMCTL_TEST_FAULT=checkpoint-save@2        ... the second time (e.g. the second checkpoint)
    LLMCTL_TEST_FAULT=version-allocated:meet   wait there until another process arrives too

`meet` makes two processes overlap inside a section: each one touches a file named by its pid in
`LLMCTL_TEST_FAULT_DIR` and waits until two files are there or `LLMCTL_TEST_FAULT_WAIT` seconds
(default 5) have passed. Under a lock that serialises the section, the first waits alone until the
timeout and the second finds it already there.

The points (each named where it is):
    checkpoint-save           llmctl.train.checkpoint.save_checkpoint: weights written, optimizer not yet
    publish-before-rename     Workspace.publish: files and manifest written, output/ not yet renamed
    version-allocated         Workspace.publish: version number chosen, not yet recorded
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

FAULT_ENV = "LLMCTL_TEST_FAULT"
FAULT_DIR_ENV = "LLMCTL_TEST_FAULT_DIR"
FAULT_WAIT_ENV = "LLMCTL_TEST_FAULT_WAIT"

_arrivals: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Act as `LLMCTL_TEST_FAULT` says when it names this point; otherwise do nothing."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, action = spec.partition(":")
    point, _, nth = point.partition("@")
    if point != name:
        return
    _arrivals[name] = _arrivals.get(name, 0) + 1
    if _arrivals[name] != int(nth or 1):
        return
    if action == "meet":
        _meet(Path(os.environ[FAULT_DIR_ENV]), float(os.environ.get(FAULT_WAIT_ENV, "5")))
    else:
        os.kill(os.getpid(), signal.SIGKILL)


def _meet(folder: Path, wait_s: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / str(os.getpid())).touch()
    deadline = time.monotonic() + wait_s
    while len(list(folder.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
