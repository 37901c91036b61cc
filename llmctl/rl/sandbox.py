"""Run untrusted Python (a model's completion plus its unit tests) in separate, limited processes.

    results = run_programs([source, ...], SandboxLimits(cpu_s=5, memory_mb=512))
    results[0].ok            # True when the program exited 0 (every assert passed)

A hung, crashing or hostile program yields a result, never an exception or a stuck caller. Each program
runs in a fresh temporary directory (its cwd, deleted after) with stdin closed, under these layers:

- time: RLIMIT_CPU (SIGXCPU at `cpu_s`, SIGKILL a second later) and a wall clock in the caller that
  SIGKILLs the program's whole process group at `wall_s` (sleeping or blocked programs use no CPU);
- memory: RLIMIT_AS, so a large allocation raises MemoryError in the program;
- output: stdout/stderr go to files under RLIMIT_FSIZE (SIGXFSZ past `output_bytes`), read back capped;
- network: a new, empty network namespace (`unshare --net`, when this machine allows it) and, always,
  an audit hook in the child that refuses to create sockets;
- processes: the audit hook refuses os.fork/exec/spawn/system, subprocess and ctypes (a fork bomb dies
  at its first fork); when `unshare --pid` works the program also runs in its own PID namespace, so
  whatever it started dies with it, and the caller kills the process group in any case;
- files: the audit hook refuses writing, removing or renaming outside the temporary directory.

Why an audit hook and not RLIMIT_NPROC or a dropped uid: trainers usually run as root in a container,
where RLIMIT_NPROC does not apply, and the interpreter often lives where another uid cannot run it
(/root/.pyenv). The hook guards against the accidents of generated code, not a determined attacker
(a C extension can still call fork(2) or setrlimit(2); the namespaces and the caller's kill bound it).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# Audit events the child refuses outright (https://docs.python.org/3/library/audit_events.html).
BLOCKED_EVENTS = frozenset(
    {
        "socket.__new__",
        "os.fork",
        "os.forkpty",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.system",
        "os.kill",
        "os.killpg",
        "subprocess.Popen",
        "ctypes.dlopen",
        "resource.setrlimit",
        "resource.prlimit",
    }
)
# Modules that fork or load native code without an audit event of their own.
BLOCKED_IMPORTS = frozenset({"_posixsubprocess", "_ctypes"})
# Events whose first argument is a path that must stay inside the temporary directory.
PATH_EVENTS = frozenset(
    {
        "os.remove",
        "os.rmdir",
        "os.rename",
        "os.truncate",
        "os.chmod",
        "os.chown",
        "os.mkdir",
        "os.symlink",
        "os.link",
        "os.utime",
        "shutil.rmtree",
    }
)
# Namespaces tried, best first; the first that runs `true` on this machine is used.
NAMESPACE_PREFIXES = (
    ("unshare", "--net", "--pid", "--fork", "--kill-child"),
    ("unshare", "--net"),
)

PROGRAM_FILE = "program.py"
BOOTSTRAP_FILE = "_sandbox_bootstrap.py"

# Runs in the child before the program: limits first, then the hook, then the program as __main__.
BOOTSTRAP = """\
import os, resource, sys
resource.setrlimit(resource.RLIMIT_CPU, ({cpu}, {cpu} + 1))
resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))
resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize}))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
_BLOCKED, _IMPORTS, _PATHS = {blocked!r}, {imports!r}, {paths!r}
_HOME = os.path.realpath(os.getcwd()) + os.sep
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def _inside(path):
    if isinstance(path, int):
        return True
    return (os.path.realpath(os.fsdecode(path)) + os.sep).startswith(_HOME)

def _hook(event, args):
    if event in _BLOCKED:
        raise PermissionError("sandbox: " + event + " is not allowed")
    if event == "import" and args[0] in _IMPORTS:
        raise ImportError("sandbox: importing " + args[0] + " is not allowed")
    writing = event == "open" and (any(c in str(args[1] or "") for c in "wax+") or (args[2] or 0) & _WRITE)
    if (writing or event in _PATHS) and not _inside(args[0]):
        raise PermissionError("sandbox: " + event + " outside the working directory is not allowed")

sys.addaudithook(_hook)
sys.argv = [{program!r}]
with open({program!r}) as f:
    _code = compile(f.read(), {program!r}, "exec")
exec(_code, {{"__name__": "__main__", "__file__": {program!r}}})
"""


@dataclass(frozen=True)
class SandboxLimits:
    """What one program may use. `wall_s` defaults to `cpu_s` + 1 (startup, and slack on busy machines)."""

    cpu_s: float = 5.0
    memory_mb: int = 512
    wall_s: float | None = None
    output_bytes: int = 64_000

    @property
    def wall_limit(self) -> float:
        return self.wall_s if self.wall_s is not None else self.cpu_s + 1.0


@dataclass(frozen=True)
class SandboxResult:
    """How one program ended. `outcome`: ok, failed, cpu_time, wall_time, memory, output or signal."""

    ok: bool
    outcome: str
    returncode: int | None
    seconds: float
    output: str


@functools.cache
def namespace_prefix() -> tuple[str, ...]:
    """The `unshare` command this machine allows (empty when none: then only the audit hook guards)."""
    if shutil.which("unshare") is None:
        return ()
    for prefix in NAMESPACE_PREFIXES:
        try:
            done = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return prefix
    return ()


def _command(prefix: tuple[str, ...]) -> list[str]:
    python = [sys.executable, "-I", "-B", BOOTSTRAP_FILE]
    if "--pid" in prefix:
        # A shell as the namespace's init: init ignores default-action signals such as SIGXCPU, so the
        # program must not be PID 1. `exit $?` keeps the shell from exec'ing python in its own place.
        return [*prefix, "/bin/sh", "-c", '"$0" "$@"; exit $?', *python]
    return [*prefix, *python]


def _outcome(
    returncode: int | None, output: str, output_size: int, limits: SandboxLimits, timed_out: bool
) -> str:
    if timed_out:
        return "wall_time"
    if returncode == 0:
        return "ok"
    # A shell reports a signal as 128 + its number; Popen as minus the number.
    sig = -returncode if returncode is not None and returncode < 0 else (returncode or 0) - 128
    if sig in (signal.SIGXCPU, signal.SIGKILL):
        return "cpu_time"
    # Python ignores SIGXFSZ: past RLIMIT_FSIZE its writes fail and it exits non-zero.
    if sig == signal.SIGXFSZ or output_size >= limits.output_bytes:
        return "output"
    if "MemoryError" in output:
        return "memory"
    return "signal" if sig > 0 else "failed"


def run_program(source: str, limits: SandboxLimits) -> SandboxResult:
    """Run one program to completion or its limits; never raises for anything the program does."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llmctl-sandbox-") as home:
        work = Path(home)
        (work / PROGRAM_FILE).write_text(source)
        (work / BOOTSTRAP_FILE).write_text(
            BOOTSTRAP.format(
                cpu=max(1, int(limits.cpu_s + 0.999)),
                memory=limits.memory_mb * 2**20,
                fsize=limits.output_bytes,
                blocked=set(BLOCKED_EVENTS),
                imports=set(BLOCKED_IMPORTS),
                paths=set(PATH_EVENTS),
                program=PROGRAM_FILE,
            )
        )
        env = {"PATH": os.defpath, "HOME": home, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
        with open(work / "_output", "w+b") as out:
            child = subprocess.Popen(
                _command(namespace_prefix()),
                cwd=home,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, killed as one below
                close_fds=True,
            )
            timed_out = False
            try:
                child.wait(timeout=limits.wall_limit)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # Whatever the program left behind in its group goes too (already gone in a PID namespace).
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait()
            output_size = out.seek(0, os.SEEK_END)
            out.seek(0)
            output = out.read(limits.output_bytes).decode("utf-8", "replace")
    returncode = None if timed_out else child.returncode
    outcome = _outcome(returncode, output, output_size, limits, timed_out)
    return SandboxResult(outcome == "ok", outcome, returncode, time.monotonic() - start, output)


def run_programs(
    sources: list[str], limits: SandboxLimits, workers: int | None = None
) -> list[SandboxResult]:
    """Run programs in parallel, at most `workers` at a time (default: the CPU cores), in input order."""
    if not sources:
        return []
    workers = max(1, min(len(sources), workers or os.cpu_count() or 1))
    # Threads only wait on child processes, so they cost no CPU and need no pickling.
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llmctl-sandbox") as pool:
        return list(pool.map(lambda source: run_program(source, limits), sources))
