"""Guarantees tested so that the test fails when the guarantee breaks: publish is atomic under a kill
inside it, versions stay unique when two processes are inside version allocation together, continued
pretraining starts from the init weights, bf16 autocast and activation checkpointing engage, and
loss, perplexity and bits per byte equal a hand computation.

Processes are killed or held at named points through llmctl.faults (test-only, `LLMCTL_TEST_FAULT`).
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import stage_fixtures
import torch
from conftest import cli_env, run_cli, write_project
from test_pretrain import fixed_tokens_dir, losses, one_thread, small_config, tokens_dir, train_direct

from llmctl.config.project import ProjectConfig
from llmctl.errors import InputError
from llmctl.faults import FAULT_DIR_ENV, FAULT_ENV, FAULT_WAIT_ENV
from llmctl.stages.runner import run_stage, workspace_for
from llmctl.workspace.manifest import MANIFEST_FILE

TESTS_DIR = Path(__file__).resolve().parent
__all__ = ["fixed_tokens_dir", "one_thread", "tokens_dir"]  # fixtures shared with test_pretrain


@pytest.fixture(autouse=True)
def _echo_stages(monkeypatch):
    stage_fixtures.install()
    monkeypatch.delenv(FAULT_ENV, raising=False)


@pytest.fixture
def project(tmp_path):
    folder = write_project(tmp_path / "proj", "workspace: ws\n")
    return ProjectConfig(name="t", workspace=str(folder / "ws")), folder


# An echo run in its own process; it waits for a `go` file so that two of them reach publish together.
_ECHO = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import stage_fixtures
    stage_fixtures.install()
    from pathlib import Path
    from llmctl.config.project import ProjectConfig
    from llmctl.stages.runner import run_stage
    folder, text = Path({folder!r}), sys.argv[1]
    config = ProjectConfig(name="t", workspace=str(folder / "ws"))
    (folder / ("ready-" + text)).touch()
    while not (folder / "go").exists():
        time.sleep(0.005)
    print(run_stage("echo", config, folder, options={{"text": text}}).artifact.id)
    """
)


def spawn_echo(folder: Path, text: str, **env: str) -> subprocess.Popen:
    script = _ECHO.format(tests=str(TESTS_DIR), folder=str(folder))
    return subprocess.Popen(
        [sys.executable, "-c", script, text], env=cli_env(**env), stdout=subprocess.PIPE, text=True
    )


def start_together(folder: Path, procs: list[subprocess.Popen], texts: list[str]) -> None:
    deadline = time.monotonic() + 60
    while not all((folder / f"ready-{t}").exists() for t in texts):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    (folder / "go").touch()


# ---- atomic publish ------------------------------------------------------------------------------


def test_a_kill_inside_publish_leaves_nothing_that_resolves_and_the_next_run_publishes(project):
    config, folder = project
    proc = spawn_echo(folder, "a", **{FAULT_ENV: "publish-before-rename"})
    start_together(folder, [proc], ["a"])
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL  # killed at the fault point, not finished

    ws = workspace_for(config, folder)
    assert ws.artifacts() == [] and ws.corrupt() == []
    for ref in ("echo:latest", "echo:v1", "latest"):
        with pytest.raises(InputError):
            ws.resolve(ref)
    listing = run_cli("artifacts", "ls", "--json", cwd=folder).json()
    assert listing["artifacts"] == [] and listing["corrupt"] == []
    assert [(r["stage"], r["status"]) for r in listing["runs"]] == [("echo", "incomplete")]
    [run] = ws.runs()  # killed late: with its files and manifest written
    assert (run.output_dir / MANIFEST_FILE).is_file() and (run.output_dir / "out.txt").is_file()

    again = run_stage("echo", config, folder, options={"text": "a"})
    assert not again.reused and again.artifact.id == "echo:v0002"  # v0001 was allocated: never reused
    assert ws.resolve("echo:latest").id == "echo:v0002"
    assert (again.artifact.path / "out.txt").read_text() == "a"
    verify = run_cli("artifacts", "verify", "--all", "--json", cwd=folder)
    assert verify.code == 0, verify.stdout + verify.stderr


# ---- unique versions -----------------------------------------------------------------------------


def test_two_processes_inside_version_allocation_together_get_distinct_versions(project):
    """Both processes are held inside version allocation until the other arrives (or 5 s pass), so
    without the workspace lock they overlap every time."""
    config, folder = project
    texts = ["a", "b"]  # different configs: the per-config run lock does not serialise them
    hold = {FAULT_ENV: "version-allocated:meet", FAULT_DIR_ENV: str(folder / "meet"), FAULT_WAIT_ENV: "5"}
    procs = [spawn_echo(folder, text, **hold) for text in texts]
    start_together(folder, procs, texts)
    ids = []
    for proc in procs:
        stdout, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        ids.append(stdout.strip())
    assert len(list((folder / "meet").iterdir())) == 2  # both reached the allocation section
    assert sorted(ids) == ["echo:v0001", "echo:v0002"]
    ws = workspace_for(config, folder)
    texts_by_version = {a.version: (a.path / "out.txt").read_text() for a in ws.artifacts("echo")}
    assert sorted(texts_by_version.values()) == texts


# ---- continued pretraining, bf16 autocast, activation checkpointing ------------------------------


def test_continued_pretraining_starts_from_the_init_weights(tmp_path, fixed_tokens_dir):
    """The first logged loss is the init model's loss on the first step's batches, computed here."""
    from llmctl.data.loader import TokenLoader
    from llmctl.model.checkpoint import load_model_folder, save_model_folder
    from llmctl.model.config import preset
    from llmctl.model.transformer import Transformer

    torch.manual_seed(123)  # not the run's seed: a fresh model made by the run would differ
    init = tmp_path / "init"
    save_model_folder(Transformer(preset("test-1m", vocab_size=512, n_layer=1, n_embd=64)), init)
    cfg = small_config(max_steps=1)
    train_direct(cfg, fixed_tokens_dir, tmp_path / "run", init=init)
    [(step, logged)] = losses(tmp_path / "run" / "metrics.jsonl")

    model, _ = load_model_folder(init)
    loader = TokenLoader(
        fixed_tokens_dir / "train",
        batch_size=cfg.micro_batch_size,
        seq_len=cfg.seq_len,
        mode="random",
        seed=cfg.seed,
    )
    accum = cfg.batch_tokens // (cfg.micro_batch_size * cfg.seq_len)
    with torch.no_grad():
        expected = sum(float(model(*loader.next_batch())) for _ in range(accum)) / accum
    assert step == 1 and logged == pytest.approx(expected, rel=1e-5)


def _record(monkeypatch, mlp_calls: list[int], dtypes: list[torch.dtype]):
    """Count MLP forwards under autograd (the recomputation in backward included: it calls forward
    directly, so module hooks do not see it) and record the dtypes Linear layers produce."""
    from llmctl.model.transformer import MLP

    forward = MLP.forward

    def counting_forward(self, x):
        if torch.is_grad_enabled():
            mlp_calls.append(1)
        return forward(self, x)

    def hook(module, args, output):
        if torch.is_grad_enabled() and isinstance(module, torch.nn.Linear):
            dtypes.append(output.dtype)

    monkeypatch.setattr(MLP, "forward", counting_forward)
    return torch.nn.modules.module.register_module_forward_hook(hook)


@pytest.mark.parametrize("engaged", [False, True], ids=["fp32", "bf16+checkpointing"])
def test_bf16_autocast_and_activation_checkpointing_engage(tmp_path, fixed_tokens_dir, monkeypatch, engaged):
    """Under bf16 the Linear layers compute in bfloat16; with activation checkpointing every block's
    forward runs again in backward (2 MLP forwards per layer and micro-batch instead of 1)."""
    extra = dict(dtype="bf16", activation_checkpointing=True) if engaged else dict(dtype="fp32")
    cfg = small_config(max_steps=2, **extra)
    mlp_calls: list[int] = []
    dtypes: list[torch.dtype] = []
    handle = _record(monkeypatch, mlp_calls, dtypes)
    try:
        train_direct(cfg, fixed_tokens_dir, tmp_path / "run")
    finally:
        handle.remove()
    micro_batches = cfg.max_steps * cfg.batch_tokens // (cfg.micro_batch_size * cfg.seq_len)
    forwards_per_block = 2 if engaged else 1
    assert len(mlp_calls) == forwards_per_block * micro_batches * cfg.model.n_layer
    assert dtypes and set(dtypes) == {torch.bfloat16 if engaged else torch.float32}


# ---- loss, perplexity and bits per byte by hand --------------------------------------------------


def _val_tokens(tokens_dir: Path) -> np.ndarray:
    from llmctl.data.shards import TokenShard, list_shards

    return np.concatenate(
        [np.asarray(TokenShard(p).tokens, dtype=np.int64) for p in list_shards(tokens_dir / "val")]
    )


def _by_hand(model, tokens: np.ndarray, seq_len: int, windows: int, token_bytes: list[int]) -> dict:
    """Mean nats/token over the first `windows` sequential windows, and bits per byte over the
    tokens that stand for text: a plain log-softmax, one window at a time."""
    nats, n, text_nats, text_bytes, specials = 0.0, 0, 0.0, 0, 0
    with torch.no_grad():
        for w in range(windows):
            chunk = torch.from_numpy(tokens[w * seq_len : (w + 1) * seq_len + 1])
            logits = model(chunk[:-1][None])[0].double()
            logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
            for t, target in enumerate(chunk[1:].tolist()):
                loss = -float(logp[t, target])
                nats, n = nats + loss, n + 1
                if token_bytes[target]:
                    text_nats, text_bytes = text_nats + loss, text_bytes + token_bytes[target]
                else:
                    specials += 1
    assert specials > 0, "the windows should include a special token (BOS) as a target"
    return {"loss": nats / n, "bpb": text_nats / (math.log(2) * text_bytes), "tokens": n}


def _token_bytes(tokens_dir: Path) -> list[int]:
    from llmctl.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokens_dir / "tokenizer")
    specials = set(tok.special_tokens.values())
    return [0 if i in specials else len(tok.token_bytes(i)) for i in range(tok.vocab_size)]


def test_pretrain_val_loss_and_bits_per_byte_equal_a_hand_computation(tmp_path, tokens_dir):
    from llmctl.model.transformer import Transformer

    cfg = small_config(max_steps=1, eval_batches=10)  # 40 windows of 32: past the second document's BOS
    result = train_direct(cfg, tokens_dir, tmp_path / "run")
    model = Transformer(result.model_config)
    model.load_state_dict(result.model_state)
    windows = cfg.eval_batches * cfg.micro_batch_size  # batches of micro_batch_size sequential windows
    hand = _by_hand(model.eval(), _val_tokens(tokens_dir), cfg.seq_len, windows, _token_bytes(tokens_dir))
    assert result.metrics["val_loss"] == pytest.approx(hand["loss"], rel=1e-5)
    assert result.metrics["val_bpb"] == pytest.approx(hand["bpb"], rel=1e-5)


def test_eval_perplexity_and_bits_per_byte_equal_a_hand_computation(tokens_dir):
    from llmctl.evals.evaluate import perplexity_on_tokens
    from llmctl.evals.lm import EvalLM
    from llmctl.model.config import preset
    from llmctl.model.transformer import Transformer
    from llmctl.reporting import Reporter

    torch.manual_seed(5)
    model = Transformer(preset("test-1m", vocab_size=512, n_layer=1, n_embd=64, max_seq_len=32))
    lm = EvalLM(model, None, bos_id=0, eos_id=None, name="tiny")
    got = perplexity_on_tokens(lm, tokens_dir, batch_size=8, limit=5, reporter=Reporter())
    hand = _by_hand(model, _val_tokens(tokens_dir), 32, 40, _token_bytes(tokens_dir))
    assert got["tokens"] == hand["tokens"] == 40 * 32
    assert got["loss"] == pytest.approx(hand["loss"], rel=1e-6)
    assert got["ppl"] == pytest.approx(math.exp(hand["loss"]), rel=1e-6)
    assert got["bits_per_byte"] == pytest.approx(hand["bpb"], rel=1e-6)
