"""The code sandbox on real processes: every hostile program ends within its limits, scores nothing, and
leaves the test process with no stray processes and no network traffic. Each protection is also checked
alone (the others switched off), so breaking any one of them fails a named test here."""

from __future__ import annotations

import http.server
import shutil
import subprocess
import threading
import time

import psutil
import pytest

from llmctl.rl import sandbox
from llmctl.rl.sandbox import SandboxLimits, run_program, run_programs

FAST = SandboxLimits(cpu_s=1, memory_mb=256)


def _sandbox_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(sandbox.BOOTSTRAP_FILE in part for part in proc.info["cmdline"] or ()):
            found.append(proc)
    return found


@pytest.fixture(autouse=True)
def no_leftovers():
    """After each test: the sandbox left no process behind (killed here so one failure stays one).
    Children the test process had before (a multiprocessing forkserver an earlier test started in the
    same pytest run) are not this test's."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    time.sleep(0.2)  # the kernel reaps a namespace's processes just after its init exits
    leftovers = _sandbox_processes()
    for proc in leftovers:
        proc.kill()
    assert not leftovers, f"sandboxed processes survived: {[p.pid for p in leftovers]}"
    new = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not new, f"the test process has children left: {new}"


@pytest.fixture
def http_server():
    """A real HTTP server on 127.0.0.1 counting the requests it gets."""
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"reached")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], hits
    server.shutdown()


def _fetch(port: int) -> str:
    return f"import urllib.request\nprint(urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=3).read())\n"


def _needs(flag: str) -> None:
    if flag not in sandbox.namespace_prefix():
        pytest.skip(f"`unshare {flag}` is not allowed on this machine")


def test_the_namespaces_this_machine_allows_are_used():
    # Otherwise a lost flag would silently turn the namespace tests below into skips.
    for flags in (["--net"], ["--pid", "--fork"]):
        allowed = shutil.which("unshare") and subprocess.run(["unshare", *flags, "true"]).returncode == 0
        assert not allowed or flags[0] in sandbox.namespace_prefix(), (flags, sandbox.namespace_prefix())


def test_a_passing_program_is_ok_and_a_failing_one_is_not():
    ok, failed = run_programs(["assert sum([1, 2]) == 3\nprint('fine')", "assert 1 == 2"], FAST)
    assert (ok.ok, ok.outcome, ok.output.strip()) == (True, "ok", "fine")
    assert (failed.ok, failed.outcome) == (False, "failed") and "AssertionError" in failed.output


def test_an_infinite_loop_is_stopped_by_the_cpu_limit():
    # The wall clock is far away, so only RLIMIT_CPU can end it early.
    result = run_program("while True:\n    pass\n", SandboxLimits(cpu_s=1, wall_s=20))
    assert (result.ok, result.outcome) == (False, "cpu_time")
    assert result.seconds < 15


def test_a_sleeping_program_is_stopped_by_the_wall_clock():
    start = time.monotonic()
    result = run_program("import time\ntime.sleep(20)\n", FAST)
    assert (result.ok, result.outcome) == (False, "wall_time")
    assert time.monotonic() - start < FAST.wall_limit + 2


def test_a_memory_hog_gets_a_memory_error():
    result = run_program("blob = bytearray(2**30)\nprint('allocated')\n", FAST)
    assert (result.ok, result.outcome) == (False, "memory"), result.output


def test_a_fork_bomb_fails_at_its_first_fork():
    # Bounded at 2**6 processes so that a broken guard cannot take the machine down with it.
    bomb = "import os\nfor _ in range(6):\n    os.fork()\nwhile True:\n    pass\n"
    result = run_program(bomb, FAST)
    assert not result.ok
    assert "os.fork is not allowed" in result.output, result.output
    assert result.seconds < FAST.wall_limit + 2


def test_subprocess_and_ctypes_are_refused():
    for source in ("import subprocess\nsubprocess.run(['true'])", "import ctypes"):
        result = run_program(source, FAST)
        assert not result.ok and "not allowed" in result.output, result.output


def test_a_child_that_leaves_the_process_group_dies_with_the_pid_namespace(monkeypatch):
    _needs("--pid")
    monkeypatch.setattr(sandbox, "BLOCKED_EVENTS", sandbox.BLOCKED_EVENTS - {"os.fork"})
    escape = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
    assert run_program(escape, FAST).ok  # the fixture checks that the child is gone


def test_a_child_left_in_the_process_group_is_killed_without_namespaces(monkeypatch):
    monkeypatch.setattr(sandbox, "namespace_prefix", lambda: ())
    monkeypatch.setattr(sandbox, "BLOCKED_EVENTS", sandbox.BLOCKED_EVENTS - {"os.fork"})
    assert run_program("import os, time\nif os.fork() == 0:\n    time.sleep(60)\n", FAST).ok


def test_a_connection_to_a_local_server_fails(http_server):
    port, hits = http_server
    result = run_program(_fetch(port), FAST)
    assert not result.ok and "reached" not in result.output
    assert hits == []


def test_the_network_namespace_alone_blocks_the_connection(http_server, monkeypatch):
    _needs("--net")
    port, hits = http_server
    monkeypatch.setattr(sandbox, "BLOCKED_EVENTS", sandbox.BLOCKED_EVENTS - {"socket.__new__"})
    result = run_program(_fetch(port), FAST)
    assert not result.ok and hits == [], result.output


def test_the_audit_hook_alone_refuses_sockets(http_server, monkeypatch):
    port, hits = http_server
    monkeypatch.setattr(sandbox, "namespace_prefix", lambda: ())
    result = run_program(_fetch(port), FAST)
    assert "socket.__new__ is not allowed" in result.output and hits == [], result.output


def test_without_any_network_block_the_server_is_reached(http_server, monkeypatch):
    # The control: the server and the client code do work, so the tests above can fail.
    port, hits = http_server
    monkeypatch.setattr(sandbox, "namespace_prefix", lambda: ())
    monkeypatch.setattr(sandbox, "BLOCKED_EVENTS", sandbox.BLOCKED_EVENTS - {"socket.__new__"})
    result = run_program(_fetch(port), FAST)
    assert result.ok and "reached" in result.output and hits == ["/"], result.output


def test_output_is_capped():
    limits = SandboxLimits(cpu_s=1, output_bytes=10_000)
    result = run_program("while True:\n    print('x' * 1000)\n", limits)
    assert (result.ok, result.outcome) == (False, "output")
    assert len(result.output) <= 10_000


def test_writes_outside_the_temporary_directory_are_refused(tmp_path):
    target = tmp_path / "victim.txt"
    target.write_text("keep")
    for source in (f"open({str(target)!r}, 'w')", f"import os\nos.remove({str(target)!r})"):
        result = run_program(source, FAST)
        assert not result.ok and "outside the working directory" in result.output, result.output
    assert target.read_text() == "keep"
    inside = "open('scratch.txt', 'w').write('x')\nimport os\nos.remove('scratch.txt')\n"
    assert run_program(inside, FAST).ok


def test_a_batch_runs_in_parallel_and_keeps_its_order():
    sources = [f"print({i})" for i in range(6)] + ["while True:\n    pass\n"]
    results = run_programs(sources, FAST, workers=2)
    assert [r.output.strip() for r in results[:6]] == [str(i) for i in range(6)]
    assert [r.ok for r in results] == [True] * 6 + [False]
