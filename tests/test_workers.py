"""Worker pools of the data stages: a killed worker fails the stage promptly (nothing published), and
workers never outlive a parent killed with SIGKILL. Real `llmctl` processes, real signals."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli_env, write_project

from llmctl.threads import available_cores


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory) -> Path:
    """8,000 synthetic documents: enough for dedup, filter and tokenize to start worker pools."""
    from llmctl.data.synthetic import generate_corpus

    folder = tmp_path_factory.mktemp("workers")
    generate_corpus(folder, n_docs=8000, seed=1)
    return folder / "docs.jsonl"


@pytest.fixture
def big_project(tmp_path, big_corpus) -> Path:
    return write_project(tmp_path / "proj", f"data:\n  sources:\n    - path: {big_corpus}\n")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = _children(pid)
    while todo:
        kid = todo.pop()
        if kid not in found:
            found.add(kid)
            todo += _children(kid)
    return found


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie has exited; only its exit status is left


def _start(project: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "llmctl", *args],
        cwd=project,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_workers(proc: subprocess.Popen, n: int, timeout: float = 120) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = _descendants(proc.pid)
        if len(kids) >= n:
            return kids
        assert proc.poll() is None, f"exited before starting workers: {proc.communicate()}"
        time.sleep(0.01)
    raise AssertionError("no worker processes appeared")


pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
    pytest.mark.skipif(
        available_cores() < 2, reason="a pool of 2 workers needs 2 cores (llmctl refuses more)"
    ),
]


def test_a_killed_dedup_worker_fails_the_stage_promptly(big_project):
    proc = _start(big_project, "dedup", "--force", "--set", "dedup.workers=2")
    try:
        victim = min(_wait_for_workers(proc, 2))
        time.sleep(0.5)  # busy on a chunk: multiprocessing.Pool lost that task and waited forever
        assert proc.poll() is None, "dedup finished before the kill"
        os.kill(victim, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=30)  # the bug: waited forever on the lost task
    finally:
        proc.kill()
    assert proc.returncode == 1, stderr
    assert "Error: dedup: a worker process died" in stderr
    assert not list((big_project / "workspace" / "artifacts").glob("dedup/v*"))


@pytest.mark.parametrize(
    ("stage", "workers", "busy_after"),
    # seconds after the workers appear before the kill: short, so that on an idle machine the stage
    # is still running (a worker outlives its parent whether or not it has started a task)
    [("dedup", 2, 0.2), ("filter", 2, 0.2), ("tokenize", 2, 0.3)],
)
def test_workers_die_with_a_parent_killed_by_sigkill(big_project, stage, workers, busy_after):
    proc = _start(big_project, stage, "--force", "--set", f"{stage}.workers={workers}")
    kids: set[int] = set()
    survivors: list[int] = []
    try:
        kids = _wait_for_workers(proc, workers)
        time.sleep(busy_after)
        assert proc.poll() is None, "the stage finished before the kill"
        kids |= _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(_alive(k) for k in kids) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = [k for k in kids if _alive(k)]
    finally:
        proc.kill()
        for k in kids:  # never leave orphans behind, even when the test fails (they hold our pipes)
            if _alive(k):
                os.kill(k, signal.SIGKILL)
        proc.communicate()
    assert not survivors, f"{stage}: workers {survivors} outlived their parent"


def test_sigterm_during_dedup_stops_promptly_with_no_workers_left(big_project):
    """multiprocessing.Pool.terminate() once deadlocked here; the stage must exit 130 and leave nothing."""
    proc = _start(big_project, "dedup", "--force", "--set", "dedup.workers=2")
    kids: set[int] = set()
    try:
        kids = _wait_for_workers(proc, 2)
        time.sleep(0.5)
        assert proc.poll() is None, "dedup finished before the signal"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
        for k in kids:
            if _alive(k):
                os.kill(k, signal.SIGKILL)
    assert proc.returncode == 130, stderr
    assert not [k for k in kids if _alive(k)]
    assert not list((big_project / "workspace" / "artifacts").glob("dedup/v*"))


KILL_MID_SEND = """
import sys, time
from pathlib import Path
from llmctl.data.workers import worker_pool

def big(n):
    return b"x" * n

if __name__ == "__main__":
    pool = worker_pool(2, "fork", stage="dedup")
    futures = [pool.submit(big, 200_000_000) for _ in range(2)]
    pids = list(pool._executor._processes)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until a worker is blocked writing its result into the pipe
        if any(Path(f"/proc/{p}/wchan").read_text().endswith("pipe_write") for p in pids):
            break
        time.sleep(0.001)
    else:
        sys.exit("no worker was seen sending its result")
    pool.close(kill=True)
    print("closed")
"""


def test_killing_workers_while_one_sends_its_result_does_not_hang_the_pool(tmp_path):
    """An interrupt kills the workers; one killed half-way through sending a result used to leave the
    executor's thread waiting for the rest of that message forever (a SIGTERM'd dedup hung)."""
    script = tmp_path / "kill_mid_send.py"
    script.write_text(KILL_MID_SEND)
    proc = subprocess.run(
        [sys.executable, str(script)], env=cli_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "closed", proc.stderr


SWALLOWED_SIGTERM = """
import os, signal
import llmctl.cli.app as app
from llmctl.data.workers import worker_pool
from llmctl.errors import Interrupted

app._MAIN_PID = os.getpid()
signal.signal(signal.SIGTERM, app._raise_interrupted)  # as `llmctl` installs it
fired = []

def after_fork_in_parent():
    if not fired:
        fired.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs here, in a hook whose exceptions Python only prints
            pass

os.register_at_fork(after_in_parent=after_fork_in_parent)

def square(x):
    return x * x

if __name__ == "__main__":
    try:
        with worker_pool(2, "fork", stage="dedup") as pool:
            results = list(pool.ordered(square, [(i,) for i in range(50)], window=4))
        print("finished", len(results))
    except Interrupted as e:
        print("stopped:", e)
"""


def test_a_sigterm_that_arrives_while_a_worker_forks_still_stops_the_pool(tmp_path):
    """Seen: a SIGTERM handled inside a library's at-fork hook was printed as "Exception ignored"
    and dedup went on to publish; the pool must still stop at its next result."""
    script = tmp_path / "swallowed.py"
    script.write_text(SWALLOWED_SIGTERM)
    proc = subprocess.run(
        [sys.executable, str(script)], env=cli_env(), capture_output=True, text=True, timeout=60
    )
    assert "Exception ignored" in proc.stderr  # the handler's exception was lost where it was raised
    assert proc.stdout.strip() == "stopped: interrupted by SIGTERM", (proc.stdout, proc.stderr)
