"""Worker process pools for the data stages (dedup, filter, tokenize).

    with worker_pool(workers, "fork", init_fn, init_args, stage="dedup") as pool:
        for result in pool.ordered(fn, tasks, window=2 * workers):
            ...

Two guarantees the stages rely on:

* A worker that dies (SIGKILL, the out-of-memory killer) fails the stage promptly with StageFailed:
  `concurrent.futures.ProcessPoolExecutor` notices a dead worker and breaks the pool, where
  `multiprocessing.Pool` silently replaces it and leaves the parent waiting forever on a lost task.
* Workers die with their parent, however it ends (kill -9 included): on Linux the kernel sends them
  SIGKILL when the parent exits (PR_SET_PDEATHSIG); everywhere a watchdog thread exits the worker
  once its parent pid changes (the fallback where prctl does not exist).

A pool of one worker runs everything in the calling process (no fork, no pickling).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from llmctl.errors import StageFailed, raise_if_interrupted

_PR_SET_PDEATHSIG = 1
_WATCHDOG_SECONDS = 0.5


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watchdog below still holds
    # The parent may have died before prctl took effect; then this process already has a new parent.
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_WATCHDOG_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="llmctl-parent-watchdog", daemon=True).start()


def _start_worker(parent_pid: int, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    _die_with_parent(parent_pid)
    if initializer is not None:
        initializer(*initargs)


class WorkerPool:
    """A process pool whose results come back in submission order, with bounded work in flight."""

    def __init__(
        self,
        workers: int,
        start_method: str,
        initializer: Callable[..., None] | None,
        initargs: tuple,
        stage: str,
    ) -> None:
        assert workers >= 1, workers
        self.workers = workers
        self.stage = stage
        self._executor: ProcessPoolExecutor | None = None
        if workers == 1:
            if initializer is not None:
                initializer(*initargs)
            return
        methods = multiprocessing.get_all_start_methods()
        # forkserver's workers are not our children: PR_SET_PDEATHSIG would watch the server instead
        method = start_method if start_method in methods and start_method != "forkserver" else "spawn"
        self._executor = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context(method),
            initializer=_start_worker,
            initargs=(os.getpid(), initializer, initargs),
        )

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self._executor is None:
            future: Future = Future()
            future.set_result(fn(*args))
            return future
        try:
            return self._executor.submit(fn, *args)
        except BrokenProcessPool:
            raise self._died() from None

    def result(self, future: Future) -> Any:
        try:
            return future.result()
        except BrokenProcessPool:
            raise self._died() from None

    def ordered(self, fn: Callable[..., Any], tasks: Iterable[tuple], window: int) -> Iterator[Any]:
        """`fn(*task)` for each task, in order, with at most `window` tasks submitted ahead."""
        pending: deque[Future] = deque()
        for task in tasks:
            pending.append(self.submit(fn, *task))
            if len(pending) >= window:
                yield self.result(pending.popleft())
                raise_if_interrupted()
        while pending:
            yield self.result(pending.popleft())
            raise_if_interrupted()

    def _died(self) -> StageFailed:
        return StageFailed(
            f"{self.stage}: a worker process died (killed by a signal, e.g. the out-of-memory killer); "
            "nothing was published",
            hint=f"lower {self.stage}.workers, or check `dmesg` for the out-of-memory killer",
        )

    def close(self, *, kill: bool) -> None:
        """Shut the pool down; `kill` stops running tasks at once (on errors and interrupts)."""
        ex = self._executor
        if ex is None:
            return
        self._executor = None
        if kill:
            # ProcessPoolExecutor has no public way to stop running tasks before Python 3.14
            # (terminate_workers); without this an interrupt would wait for every running task.
            processes = list((getattr(ex, "_processes", None) or {}).values())
            for proc in processes:
                proc.kill()
            for proc in processes:
                proc.join()
            # A worker killed while sending its result leaves half a message in the result pipe,
            # and the executor's thread then waits in recv() forever: this process holds the pipe's
            # write end too (CPython 3.11). Closing that end turns the wait into EOF, which the
            # executor handles as a broken pool (seen: a SIGTERM'd dedup hung in shutdown below).
            writer = getattr(getattr(ex, "_result_queue", None), "_writer", None)
            if writer is not None:
                writer.close()
        ex.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(kill=exc_type is not None)


def worker_pool(
    workers: int,
    start_method: str,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
    *,
    stage: str,
) -> WorkerPool:
    """A WorkerPool (see the module docstring); `stage` names the config section in errors."""
    return WorkerPool(workers, start_method, initializer, initargs, stage)
