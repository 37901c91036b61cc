"""The CLI contract, checked on the real `llmctl` in subprocesses, for every command in the tree.

Every command has a working `--help`; every command and every usage error under `--json` prints
exactly one JSON document on stdout; usage errors are one `Error:` line and a `Hint:` (exit 2, no box);
user text (folder names, keys) is never read as rich markup; environment errors are not "bugs".
"""

from __future__ import annotations

import json
import re
import resource
import shlex
import shutil
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
    leaves = set(leaf_paths())
    for args, result in zip(arg_lists, run_many(arg_lists), strict=True):
        shown = " ".join(args)
        assert result.code == 0, f"llmctl {shown}: exit {result.code}\n{result.stderr}"
        assert result.stderr == "", f"llmctl {shown} wrote to stderr:\n{result.stderr}"
        usage = "Usage: " + " ".join(["llmctl", *[a for a in args[:-1] if a != "compare"]])
        assert usage in result.stdout, f"llmctl {shown}: no {usage!r} in\n{result.stdout}"
        # Flags take no value; typer's default metavar for them would read `<bool>`.
        assert "<bool>" not in result.stdout, f"llmctl {shown} shows a <bool> metavar"
        if tuple(args[:-1]) in leaves:  # usage-error hints quote a command's first example
            assert re.search(r"^\W*llmctl \w", result.stdout, flags=re.M), f"llmctl {shown}: no example"


def test_bare_llmctl_shows_help():
    result = run_cli()
    assert result.code == 0 and "Usage: llmctl" in result.stdout


def _one_error_and_hint(result, code: int = 2) -> tuple[str, str]:
    """The contract for a failure: exit `code`, exactly an `Error:` line and a `Hint:` line, no box."""
    assert result.code == code, (result.code, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("Error: ") and lines[1].startswith("Hint: "), result.stderr
    assert not any(ch in result.stderr for ch in "╭│╰"), result.stderr
    return lines[0], lines[1]


@pytest.mark.parametrize(
    ("args", "error", "hint"),
    [
        (["rnu"], "unknown command 'rnu' for `llmctl`", "did you mean `llmctl run`?"),
        (["frobnicate"], "unknown command 'frobnicate'", "commands: init, run, dedup"),
        (["artifacts", "lsit"], "unknown command 'lsit' for `llmctl artifacts`", "`llmctl artifacts ls`"),
        (["sevre"], "unknown command 'sevre' for `llmctl`", "did you mean `llmctl serve`?"),
        (["pretrain", "--gpu", "2"], "unknown option --gpu for `llmctl pretrain`", "did you mean --gpus?"),
        (["pretrain", "--bogus"], "unknown option --bogus for `llmctl pretrain`", "`llmctl pretrain --help`"),
        (["artifacts", "show"], "missing argument REF for `llmctl artifacts show`", "llmctl artifacts show "),
        (
            ["pretrain", "--gpus", "x"],
            "bad value for --gpus of `llmctl pretrain`",
            "llmctl pretrain --gpus 8",
        ),
        (["config"], "`llmctl config` needs a command", "one of: validate, show, schema"),
        (
            ["eval", "--limit"],
            "--limit needs a value",
            "llmctl eval hellaswag arc_easy --ckpt import:latest --limit 300",
        ),
        (["--show-completion", "tcsh"], "bad value for --show-completion", "`llmctl --help`"),
    ],
)
def test_usage_errors_are_one_error_line_and_a_hint(args, error, hint):
    first, second = _one_error_and_hint(run_cli(*args))
    assert error in first and hint in second, (first, second)
    as_json = run_cli("--json", *args)
    assert as_json.code == 2
    doc = as_json.json()  # exactly one document: json.loads refuses trailing text
    assert doc["ok"] is False and doc["error"]["exit_code"] == 2 and doc["error"]["type"] == "UsageError"
    assert error in doc["error"]["message"] and hint in doc["error"]["hint"]


def test_json_after_the_command_also_turns_usage_errors_into_json():
    result = run_cli("artifacts", "show", "--json")
    assert result.code == 2 and result.json()["error"]["message"].startswith("missing argument REF")


def test_version_as_json():
    for args in (["--json", "--version"], ["--version", "--json"]):
        result = run_cli(*args)
        assert result.code == 0 and result.json() == {"version": __version__}


@pytest.mark.slow  # ~20-50 s: pretrain, eval and run import torch before they find nothing to do
def test_every_command_under_json_prints_exactly_one_document(tmp_path):
    """Each leaf command with only `--json`, in an empty project: a result or an error, one document."""
    project = write_project(tmp_path / "p")
    arg_lists = [["--json", *path] for path in leaf_paths()]
    for args, result in zip(arg_lists, run_many(arg_lists, cwd=project), strict=True):
        shown = " ".join(args)
        try:
            doc = json.loads(result.stdout)
        except ValueError:
            pytest.fail(f"llmctl {shown}: stdout is not one JSON document:\n{result.stdout}\n{result.stderr}")
        if result.code != 0:
            assert doc["ok"] is False and doc["error"]["exit_code"] == result.code, (shown, doc)
            assert "internal error" not in doc["error"]["message"], (shown, doc)


@pytest.mark.parametrize("name", ["br [/x]", "exp [v2]"])
def test_folder_names_are_never_read_as_markup(tmp_path, small_corpus, name):
    made = run_cli("init", name, "--template", "tiny", cwd=tmp_path)
    assert made.code == 0, made.stderr
    assert f"{tmp_path / name}" in made.stdout and f"cd '{name}' && llmctl run" in made.stdout, made.stdout

    project = write_project(
        tmp_path / "runs" / name, f"data:\n  sources:\n    - path: {small_corpus / 'docs.jsonl'}\n"
    )
    folder = str(project / "workspace" / "artifacts" / "dedup" / "v0001")
    dedup = run_cli("dedup", cwd=project)
    assert dedup.code == 0, dedup.stderr
    assert folder in dedup.stdout, dedup.stdout
    for args in (
        ["artifacts", "ls"],
        ["artifacts", "show", "dedup:latest"],
        ["artifacts", "lineage", "dedup:v1"],
    ):
        result = run_cli(*args, cwd=project)
        assert result.code == 0, (args, result.stderr)
        assert "dedup:v0001" in result.stdout, (args, result.stdout)
    shown = run_cli("artifacts", "show", "dedup:latest", cwd=project)
    assert folder in shown.stdout.replace("\n", ""), shown.stdout


def test_data_keys_and_errors_are_never_read_as_markup(tmp_path):
    source = tmp_path / "odd.jsonl"
    source.write_text("".join(json.dumps({"[/x]": f"document {i} [bold]"}) + "\n" for i in range(20)))
    project = write_project(tmp_path / "p", f"data:\n  sources:\n    - path: {source}\n")
    failed = run_cli("dedup", cwd=project)  # no `text` key: the error (and the failed run) names '[/x]'
    assert failed.code == 2 and "keys present: '[/x]'" in failed.stderr, failed.stderr
    listing = run_cli("artifacts", "ls", cwd=project)
    assert listing.code == 0, listing.stderr
    assert "failed" in listing.stdout and "[/x]" in listing.stdout, listing.stdout

    write_project(project, f"data:\n  sources:\n    - path: {source}\n      text_key: '[/x]'\n")
    assert run_cli("dedup", cwd=project).code == 0
    shown = run_cli("artifacts", "show", "dedup:latest", "--samples", "2", cwd=project)
    assert shown.code == 0, shown.stderr
    assert "[bold]" in shown.stdout, shown.stdout


def _can_unshare_mounts() -> bool:
    probe = (
        subprocess.run(["unshare", "-m", "true"], capture_output=True) if shutil.which("unshare") else None
    )
    return probe is not None and probe.returncode == 0


needs_mounts = pytest.mark.skipif(
    not _can_unshare_mounts(), reason="needs `unshare -m` (root in a private mount namespace)"
)


def _in_private_mounts(setup: str, project: Path, *args: str):
    """Run llmctl inside a private mount namespace after `setup` (mounts vanish with the process)."""
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "llmctl", *args])
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"{setup} && cd {shlex.quote(str(project))} && {command}"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
    )
    from conftest import CliResult

    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def _source_project(folder: Path, corpus: Path) -> Path:
    return write_project(folder, f"data:\n  sources:\n    - path: {corpus / 'docs.jsonl'}\n")


def test_file_size_limit_is_an_environment_error_not_a_bug(tmp_path, small_corpus):
    project = _source_project(tmp_path / "p", small_corpus)

    def limit_file_size():  # as `ulimit -f 40` would; Python ignores SIGXFSZ, so writes fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (40 * 1024, 40 * 1024))

    proc = subprocess.run(
        [sys.executable, "-m", "llmctl", "dedup"],
        cwd=project,
        capture_output=True,
        text=True,
        env=cli_env(),
        preexec_fn=limit_file_size,
        timeout=300,
    )
    error = [line for line in proc.stderr.splitlines() if line.startswith(("Error:", "Hint:"))]
    assert proc.returncode == 2, proc.stderr
    assert error == [
        f"Error: file too large for this system's limits (while writing under {project})",
        "Hint: raise the file size limit (ulimit -f)",
    ], proc.stderr


@needs_mounts
def test_read_only_project_is_an_environment_error(tmp_path, small_corpus):
    project = _source_project(tmp_path / "ro", small_corpus)
    where = shlex.quote(str(project))
    result = _in_private_mounts(
        f"mount --bind {where} {where} && mount -o remount,ro,bind {where}", project, "--json", "dedup"
    )
    assert result.code == 2, result.stderr
    error = result.json()["error"]
    assert error["message"] == f"read-only file system: {project / 'workspace'}"
    assert "please report" not in result.stderr and "writable" in error["hint"]


@needs_mounts
def test_full_disk_is_an_environment_error(tmp_path, small_corpus):
    project = tmp_path / "full"
    project.mkdir()
    yaml_text = f"name: t\ndata:\n  sources:\n    - path: {small_corpus / 'docs.jsonl'}\n"
    where = shlex.quote(str(project))
    setup = f"mount -t tmpfs -o size=64k tmpfs {where} && printf %s {shlex.quote(yaml_text)} > {where}/llmctl.yaml"
    result = _in_private_mounts(setup, project, "dedup")
    assert result.code == 2, result.stderr
    assert f"Error: no space left on the device (while writing under {project})" in result.stderr
    assert "Hint: free disk space" in result.stderr and "please report" not in result.stderr


def test_memory_errors_are_environment_errors():
    from llmctl.cli.error_mapping import environment_error

    problem = environment_error(MemoryError(), None)
    assert problem is not None and problem.exit_code == 2 and problem.message.startswith("out of memory")
    assert environment_error(ValueError("bug"), None) is None  # a bare bug stays a bug


def test_only_the_output_layer_makes_consoles():
    """Every console comes from llmctl/cli/output.py, where markup is off; a stray Console() would
    read `[/x]` in a folder name as a closing tag again."""
    cli = Path(__file__).resolve().parent.parent / "llmctl" / "cli"
    offenders = [p.name for p in cli.glob("*.py") if p.name != "output.py" and "Console(" in p.read_text()]
    assert offenders == []
