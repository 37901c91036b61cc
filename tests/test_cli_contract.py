"""The CLI contract, checked on the real `llmctl` in subprocesses, for every command in the tree.

Every command has a working `--help`; every command and every usage error under `--json` prints
exactly one JSON document on stdout; usage errors are one `Error:` line and a `Hint:` (exit 2, no box);
user text (folder names, keys) is never read as rich markup; environment errors are not "bugs".
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import cli_env, run_cli, write_project

from llmctl import __version__


def command_paths() -> list[tuple[str, ...]]:
    """Every command and subcommand, walked from the parser's tree (new commands join automatically)."""
    from llmctl.cli.app import build_command

    paths: list[tuple[str, ...]] = []

    def walk(command, path: tuple[str, ...]) -> None:
        paths.append(path)
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, (*path, name))

    walk(build_command(), ())
    return paths


def leaf_paths() -> list[tuple[str, ...]]:
    paths = command_paths()
    return [p for p in paths if not any(q[: len(p)] == p and q != p for q in paths)]


def run_many(arg_lists: list[list[str]], cwd: Path | None = None) -> list:
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda args: run_cli_no_stdin(*args, cwd=cwd), arg_lists))


def run_cli_no_stdin(*args: str, cwd: Path | None = None, env: dict | None = None):
    """run_cli with stdin closed, so an interactive command (chat) can never wait on the terminal."""
    from conftest import CliResult

    proc = subprocess.run(
        [sys.executable, "-m", "llmctl", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env or cli_env(),
        stdin=subprocess.DEVNULL,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def test_the_walk_sees_the_whole_tree():
    paths = command_paths()
    assert {(), ("init",), ("run",), ("eval",), ("config", "show"), ("artifacts", "lineage")} <= set(paths)


def test_every_command_has_a_working_help():
    arg_lists = [[*path, "--help"] for path in command_paths()] + [["eval", "compare", "--help"]]
    for args, result in zip(arg_lists, run_many(arg_lists), strict=True):
        shown = " ".join(args)
        assert result.code == 0, f"llmctl {shown}: exit {result.code}\n{result.stderr}"
        assert result.stderr == "", f"llmctl {shown} wrote to stderr:\n{result.stderr}"
        usage = "Usage: " + " ".join(["llmctl", *[a for a in args[:-1] if a != "compare"]])
        assert usage in result.stdout, f"llmctl {shown}: no {usage!r} in\n{result.stdout}"
        # Flags take no value; typer's default metavar for them would read `<bool>`.
        assert "<bool>" not in result.stdout, f"llmctl {shown} shows a <bool> metavar"


def test_bare_llmctl_shows_help():
    result = run_cli()
    assert result.code == 0 and "Usage: llmctl" in result.stdout
