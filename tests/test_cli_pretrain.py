"""`llmctl pretrain` through the real CLI: torchrun relaunch on CPU (gloo), reuse, resume, bad input."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli
from test_launch import PROMPT_S, torchrun

SMALL = [
    "--set", "tokenize.vocab_size=512",
    "--set", "pretrain.model.preset=test-1m",
    "--set", "pretrain.seq_len=64",
    "--set", "pretrain.micro_batch_size=4",
    "--set", "pretrain.batch_tokens=512",
    "--set", "pretrain.max_steps=4",
    "--set", "pretrain.eval_every=2",
    "--set", "pretrain.checkpoint_every=2",
]  # fmt: skip


@pytest.mark.slow
def test_pretrain_two_processes_through_torchrun(corpus_project):
    assert run_cli("tokenize", *SMALL, cwd=corpus_project).code == 0
    result = run_cli(
        "pretrain", "--gpus", "2", "--device", "cpu", "--json", *SMALL, cwd=corpus_project, timeout=600
    )
    assert result.code == 0, result.stderr[-3000:]
    doc = result.json()
    assert doc["artifact"] == "pretrain:v0001"
    assert doc["metrics"]["world_size"] == 2 and doc["metrics"]["steps"] == 4
    # Up to date: reused in the parent, no processes started.
    again = run_cli("pretrain", "--gpus", "2", "--device", "cpu", "--json", *SMALL, cwd=corpus_project)
    assert again.code == 0 and again.json()["reused"] is True
    # --resume with nothing to resume reports the up-to-date artifact too, without starting processes.
    resumed = run_cli(
        "pretrain", "--gpus", "2", "--device", "cpu", "--resume", "--json", *SMALL, cwd=corpus_project
    )
    assert resumed.code == 0 and resumed.json()["reused"] is True, resumed.stderr[-2000:]
    assert "nothing to resume; up to date (pretrain:v0001)" in resumed.stderr

    # The user's own torchrun of the up-to-date stage: every rank exits at once (none waits for the
    # 1800 s collective timeout), and only rank 0 reports.
    direct, seconds = torchrun("--json", "pretrain", "--device", "cpu", *SMALL, cwd=corpus_project)
    assert direct.code == 0 and json.loads(direct.stdout)["reused"] is True, direct.stderr[-2000:]
    assert seconds < PROMPT_S
    wrong, seconds = torchrun(
        "pretrain", "--device", "cpu", "--input", "tokenize:v0042", *SMALL, cwd=corpus_project
    )
    assert wrong.code != 0 and "tokenize:v0042" in wrong.stderr and seconds < PROMPT_S

    # A batch that does not split over 3 processes: refused once, before torchrun starts any.
    runs = sorted((corpus_project / "workspace" / "runs" / "pretrain").glob("*"))
    bad = run_cli("pretrain", "--gpus", "3", "--device", "cpu", "--force", *SMALL, cwd=corpus_project)
    assert bad.code == 2 and "not a multiple" in bad.stderr and "Traceback" not in bad.stderr
    assert bad.stderr.count("Error:") == 1 and "torch.distributed" not in bad.stderr
    assert sorted((corpus_project / "workspace" / "runs" / "pretrain").glob("*")) == runs

    # An init model whose vocabulary is not the tokenizer's: refused once, before any process starts.
    other = _model_folder_with_vocab(corpus_project / "other-vocab", 700)
    assert run_cli("import", str(other), cwd=corpus_project).code == 0
    mismatch = run_cli(
        "pretrain", "--gpus", "2", "--device", "cpu", "--init", "import:latest", *SMALL, cwd=corpus_project
    )
    assert mismatch.code == 2 and "vocab_size" in mismatch.stderr, mismatch.stderr[-2000:]
    assert mismatch.stderr.count("Error:") == 1 and "torch.distributed" not in mismatch.stderr
    assert sorted((corpus_project / "workspace" / "runs" / "pretrain").glob("*")) == runs


def _model_folder_with_vocab(folder, vocab_size: int):
    from llmctl.data.synthetic import iter_documents
    from llmctl.data.tokenizer import train_tokenizer
    from llmctl.model.checkpoint import save_model_folder
    from llmctl.model.config import preset
    from llmctl.model.transformer import Transformer

    tok = train_tokenizer((d["text"] for d in iter_documents(300, seed=2)), vocab_size=vocab_size)
    model = Transformer(preset("test-1m", vocab_size=tok.vocab_size))
    save_model_folder(model, folder, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    tok.save(folder, model_max_length=model.config.max_seq_len)
    return folder


def test_pretrain_without_tokens_says_what_to_run(tmp_path):
    from conftest import write_project

    project = write_project(tmp_path / "p")
    result = run_cli("pretrain", cwd=project)
    assert result.code == 2 and "llmctl tokenize" in result.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("json_mode", [False, True])
def test_gpus_without_cuda_is_refused_unless_device_cpu(corpus_project, json_mode):
    flags = ["--json"] if json_mode else []
    refused = run_cli(*flags, "pretrain", "--gpus", "8", *SMALL, cwd=corpus_project, timeout=60)
    assert refused.code == 2
    if json_mode:
        error = refused.json()["error"]
        assert "no CUDA device found" in error["message"] and "--device cpu" in error["hint"]
    else:
        assert "Error: --gpus 8: no CUDA device found" in refused.stderr
        assert "--device cpu" in refused.stderr and "process(es) on cpu" not in refused.stderr
    assert not (corpus_project / "workspace" / "runs").exists() or not any(
        (corpus_project / "workspace" / "runs").glob("pretrain*")
    )
    asked_cuda = run_cli("pretrain", "--device", "cuda", *SMALL, cwd=corpus_project, timeout=60)
    assert asked_cuda.code == 2 and "no CUDA device was found" in asked_cuda.stderr
    bad_value = run_cli("pretrain", "--device", "tpu", *SMALL, cwd=corpus_project, timeout=60)
    assert bad_value.code == 2 and "pretrain.device" in bad_value.stderr
