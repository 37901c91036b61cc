"""Shell completion: the committed scripts are current, valid in their shell, and complete real ids.

Each script is checked by its own shell (bash, zsh, fish; `.ci/run` installs zsh and fish when it can),
and completion is driven for real: bash through its COMP_WORDS/COMP_CWORD protocol, fish through
`complete -C`, zsh by pressing TAB in an interactive zsh on a pseudo-terminal (zpty).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, cli_env, run_cli, write_project

SCRIPTS = {"bash": "llmctl.bash", "zsh": "_llmctl", "fish": "llmctl.fish"}


def shell_or_skip(shell: str) -> str:
    path = shutil.which(shell)
    if path is None:
        pytest.skip(f"{shell} is not installed (.ci/run installs it with apt-get when it can)")
    return path


def shell_env() -> dict[str, str]:
    # The scripts call `llmctl` itself: the console script installed beside this Python.
    env = cli_env()
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def project_with_artifacts(tmp_path_factory, small_corpus) -> Path:
    project = write_project(
        tmp_path_factory.mktemp("completion") / "p",
        f"data:\n  sources:\n    - path: {small_corpus / 'docs.jsonl'}\n",
    )
    for _ in range(2):
        assert run_cli("dedup", "--force", cwd=project).code == 0
    return project


@pytest.mark.parametrize("shell", sorted(SCRIPTS))
def test_committed_scripts_are_what_this_version_generates(shell):
    fresh = run_cli("--show-completion", shell)
    assert fresh.code == 0, fresh.stderr
    stored = (REPO / "completions" / SCRIPTS[shell]).read_text()
    assert fresh.stdout == stored, f"completions/{SCRIPTS[shell]} is stale: see completions/README.md"


def test_each_shell_gets_its_own_script():
    scripts = {shell: run_cli("--show-completion", shell).stdout for shell in SCRIPTS}
    assert "complete -o default -F _llmctl_completion llmctl" in scripts["bash"]
    assert scripts["zsh"].startswith("#compdef llmctl") and "complete_zsh" in scripts["zsh"]
    assert "complete --command llmctl" in scripts["fish"] and "complete_fish" in scripts["fish"]
    assert len(set(scripts.values())) == 3


@pytest.mark.parametrize(("shell", "check"), [("bash", "-n"), ("zsh", "-n"), ("fish", "--no-execute")])
def test_scripts_parse_in_their_shell(shell, check):
    exe = shell_or_skip(shell)
    result = subprocess.run(
        [exe, check, str(REPO / "completions" / SCRIPTS[shell])], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def _bash_complete(project: Path, *words: str) -> list[str]:
    """Complete the last of `words` as bash does: words split at ':' and '=' (COMP_WORDBREAKS)."""
    exe = shell_or_skip("bash")
    line = " ".join(words)
    script = (
        f"source {REPO / 'completions' / 'llmctl.bash'}\n"
        f"COMP_LINE={line!r}; COMP_POINT=${{#COMP_LINE}}\n"
        f'read -ra COMP_WORDS <<< "$(sed -E \'s/([:=])/ \\1 /g\' <<< "$COMP_LINE")"\n'
        f"[[ $COMP_LINE == *' ' ]] && COMP_WORDS+=('')\n"
        "COMP_CWORD=$((${#COMP_WORDS[@]} - 1))\n"
        "_llmctl_completion llmctl\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(
        [exe, "--norc", "-c", script], cwd=project, capture_output=True, text=True, env=shell_env()
    )
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if line]


def test_bash_completes_commands_stages_and_artifact_ids(project_with_artifacts):
    project = project_with_artifacts
    assert _bash_complete(project, "llmctl", "artif") == ["artifacts"]
    assert _bash_complete(project, "llmctl", "run", "--from", "tok") == ["tokenize"]
    refs = _bash_complete(project, "llmctl", "artifacts", "show", "")
    assert refs == ["latest", "dedup:latest", "dedup:v0001", "dedup:v0002"]
    # After `dedup:` bash replaces only what follows the colon: the candidates come back trimmed.
    assert _bash_complete(project, "llmctl", "artifacts", "show", "dedup:v") == ["v0001", "v0002"]
    assert _bash_complete(project, "llmctl", "filter", "--input=dedup:v000") == ["v0001", "v0002"]
    assert _bash_complete(project, "llmctl", "-C", str(project), "artifacts", "rm", "ded") == [
        "dedup:latest",
        "dedup:v0001",
        "dedup:v0002",
    ]
    # --ckpt takes models only: there are none yet, so only `latest` is offered.
    assert _bash_complete(project, "llmctl", "generate", "hi", "--ckpt", "") == ["latest"]


def test_fish_completes_artifact_ids(project_with_artifacts):
    exe = shell_or_skip("fish")
    script = f"source {REPO / 'completions' / 'llmctl.fish'}; complete -C 'llmctl artifacts lineage dedup:'"
    result = subprocess.run(
        [exe, "--no-config", "-c", script],
        cwd=project_with_artifacts,
        capture_output=True,
        text=True,
        env=shell_env(),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["dedup:latest", "dedup:v0001", "dedup:v0002"]


# An interactive zsh on a pseudo-terminal (zsh's zpty module): compinit, the script, then TAB twice
# after `dedup:v`; everything the terminal shows comes back until `$2` appears (or 30 s pass).
_ZSH_DRIVER = r"""
zmodload zsh/zpty
zpty z 'zsh -f -i'
zpty -w z "autoload -U compinit; compinit -u -D; source ${(q)1}"
zpty -w -n z $'llmctl artifacts show dedup:v\t\t'
screen=""
for i in {1..60}; do
    if zpty -r -t z chunk 2>/dev/null; then screen+=$chunk; else sleep 0.5; fi
    [[ $screen == *$2* ]] && break
done
zpty -d z
print -r -- ${screen//$'\r'/}
"""


def test_zsh_completes_artifact_ids_in_a_terminal(project_with_artifacts):
    exe = shell_or_skip("zsh")
    result = subprocess.run(
        [exe, "-f", "-c", _ZSH_DRIVER, "zsh", str(REPO / "completions" / "_llmctl"), "dedup:v0002"],
        cwd=project_with_artifacts,
        capture_output=True,
        text=True,
        env=shell_env(),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    # The typed line holds only `dedup:v`: full ids on the screen come from the completion listing.
    assert sorted(set(re.findall(r"dedup:v\d{4}", result.stdout))) == ["dedup:v0001", "dedup:v0002"]
