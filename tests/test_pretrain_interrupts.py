"""Ctrl-C (SIGINT) at any moment of `llmctl pretrain` ends at a step boundary with a checkpoint (exit 130),
and `--resume` goes on from it, falling back past a damaged newest checkpoint."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli_env, run_cli, write_project

# A model whose optimizer step is most of a training step (3.3M parameters, 16 tokens a step), so
# signals often land inside `optimizer.step()`, where an exception would leave half-updated weights.
SETS = [
    "--set", "tokenize.vocab_size=512",
    "--set", "pretrain.model.preset=test-1m",
    "--set", "pretrain.model.n_layer=2",
    "--set", "pretrain.model.n_embd=128",
    "--set", "pretrain.model.intermediate_size=4096",
    "--set", "pretrain.model.max_seq_len=64",
    "--set", "pretrain.seq_len=16",
    "--set", "pretrain.micro_batch_size=1",
    "--set", "pretrain.batch_tokens=16",
    "--set", "pretrain.max_steps=100000",
    "--set", "pretrain.log_every=1",
    "--set", "pretrain.eval_every=0",
    "--set", "pretrain.checkpoint_every=0",
    "--set", "pretrain.keep_checkpoints=3",
]  # fmt: skip


@pytest.fixture
def tokenized(tmp_path, small_corpus) -> Path:
    project = write_project(tmp_path / "p", f"data:\n  sources:\n    - path: {small_corpus / 'docs.jsonl'}\n")
    result = run_cli("tokenize", *SETS, cwd=project)
    assert result.code == 0, result.stderr
    return project


def _steps_logged(project: Path) -> int:
    rows = [p for p in (project / "workspace").rglob("metrics.jsonl") if "runs" in p.parts]
    if not rows:
        return 0
    return len(rows[0].read_text().splitlines())


def _interrupt_pretrain(project: Path, *, resume: bool, delay: float, log: Path) -> tuple[int, str]:
    """Start pretrain, wait until it has done two more steps, wait `delay` more, send SIGINT."""
    start = _steps_logged(project)
    cmd = [sys.executable, "-m", "llmctl", "pretrain", *SETS, *(["--resume"] if resume else [])]
    with log.open("w") as err:
        child = subprocess.Popen(cmd, cwd=project, env=cli_env(), stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 120
            while _steps_logged(project) < start + 2 and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert child.poll() is None, log.read_text()
            time.sleep(delay)
            child.send_signal(signal.SIGINT)
            code = child.wait(120)
        finally:
            if child.poll() is None:
                child.kill()
    return code, log.read_text()


@pytest.mark.slow
def test_sigint_at_any_moment_checkpoints_at_a_step_boundary_and_resume_skips_damage(tokenized, tmp_path):
    from llmctl.train.checkpoint import load_checkpoint

    rng = random.Random(0)
    saved = [0]
    for attempt in range(4):
        code, stderr = _interrupt_pretrain(
            tokenized, resume=attempt > 0, delay=rng.uniform(0.0, 0.1), log=tmp_path / f"try{attempt}.log"
        )
        assert code == 130, stderr
        assert "weight update" not in stderr, stderr
        found = re.search(r"checkpoint saved at step (\d+)", stderr)
        assert found, stderr  # every try, wherever in the step the signal landed
        step = int(found.group(1))
        if attempt:
            assert f"resumed from step_{saved[-1]:06d}" in stderr, stderr
        assert step > saved[-1]
        [folder] = list((tokenized / "workspace").rglob(f"checkpoints/step_{step:06d}"))
        _, _, state = load_checkpoint(folder)
        assert state["step"] == step
        saved.append(step)

    # The newest checkpoint damaged: resume warns and continues from the one before.
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    code, stderr = _interrupt_pretrain(tokenized, resume=True, delay=0.0, log=tmp_path / "damaged.log")
    assert code == 130, stderr
    assert f"checkpoint step_{saved[-1]:06d} is damaged" in stderr and "model.safetensors" in stderr
    assert f"resumed from step_{saved[-2]:06d}" in stderr
    assert "llmctl import" not in stderr

    for path in folder.parent.glob("step_*"):  # every checkpoint damaged: a clear error, no import hint
        (path / "optimizer.pt").write_bytes(b"garbage")
    result = run_cli("pretrain", "--resume", *SETS, cwd=tokenized)
    assert result.code == 2, result.stderr
    assert "no readable checkpoint to resume from" in result.stderr and "optimizer.pt" in result.stderr
    assert "llmctl import" not in result.stderr and "Hint:" in result.stderr


# SIGINT sent from inside the third optimizer.step(): the deterministic form of "a signal lands in the
# middle of a weight update" (the test above finds that moment only by chance).
_SIGINT_IN_OPTIMIZER_STEP = """
import os, signal, sys, torch
update = torch.optim.AdamW.step
calls = 0

def step(self, *args, **kwargs):
    global calls
    calls += 1
    if calls == 3:
        os.kill(os.getpid(), signal.SIGINT)  # delivered before the update below runs
    return update(self, *args, **kwargs)

torch.optim.AdamW.step = step
from llmctl.cli.app import main
sys.argv = ["llmctl", *sys.argv[1:]]
main()
"""


def test_sigint_inside_the_optimizer_step_finishes_the_step_and_checkpoints_it(tokenized):
    from llmctl.train.checkpoint import load_checkpoint

    proc = subprocess.run(
        [sys.executable, "-c", _SIGINT_IN_OPTIMIZER_STEP, "pretrain", *SETS],
        cwd=tokenized,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 130, proc.stderr
    assert "weight update" not in proc.stderr, proc.stderr
    assert "checkpoint saved at step 3" in proc.stderr, proc.stderr
    [folder] = list((tokenized / "workspace").rglob("checkpoints/step_000003"))
    assert load_checkpoint(folder)[2]["step"] == 3
