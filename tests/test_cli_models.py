"""import, generate and eval through the real CLI on a small random model with a real tokenizer."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli, write_project

from llmctl.data.synthetic import iter_documents
from llmctl.data.tokenizer import train_tokenizer
from llmctl.model.checkpoint import save_model_folder
from llmctl.model.config import preset
from llmctl.model.transformer import Transformer


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A plain HF-Llama folder (no manifest): random test-1m weights + a BPE trained on synthetic text."""
    folder = tmp_path_factory.mktemp("hf-model")
    tok = train_tokenizer((d["text"] for d in iter_documents(200, seed=1)), vocab_size=512)
    torch.manual_seed(0)
    model = Transformer(preset("test-1m", vocab_size=tok.vocab_size))
    model.init_weights()
    save_model_folder(model, folder, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    tok.save(folder, model_max_length=model.config.max_seq_len)
    return folder


def test_import_generate_eval(tmp_path, hf_folder):
    project = write_project(tmp_path / "p")
    imported = run_cli("import", str(hf_folder), "--json", cwd=project)
    assert imported.code == 0, imported.stderr
    assert imported.json()["artifact"] == "import:v0001"
    assert imported.json()["metrics"]["architecture"] == "llama"
    assert run_cli("import", str(hf_folder), "--json", cwd=project).json()["reused"] is True

    gen = run_cli("generate", "The capital of", "--ckpt", "import:latest", "-n", "6", "--json", cwd=project)
    assert gen.code == 0, gen.stderr
    doc = gen.json()
    assert 1 <= len(doc["tokens"]) <= 6 and isinstance(doc["text"], str)
    assert len(doc["logprobs"]) == len(doc["tokens"]) and all(lp <= 0 for lp in doc["logprobs"])
    assert doc["time_to_first_token_s"] > 0
    if len(doc["tokens"]) > 1:  # a decode speed needs at least one step after the first token
        assert doc["decode_tokens_per_s"] > 0
    else:
        assert doc["decode_tokens_per_s"] is None
    again = run_cli("generate", "The capital of", "--ckpt", "import:latest", "-n", "6", "--json", cwd=project)
    assert again.json()["tokens"] == doc["tokens"]  # greedy is deterministic

    streamed = run_cli("generate", "The capital of", "--ckpt", str(hf_folder), "-n", "6", cwd=tmp_path)
    assert streamed.code == 0 and streamed.stdout.startswith(
        "The capital of"
    )  # a plain folder, outside a project

    ev = run_cli("eval", "world_mc", "--ckpt", "import:latest", "--limit", "8", "--json", cwd=project)
    assert ev.code == 0, ev.stderr
    result = ev.json()
    assert result["artifact"] == "eval:v0001"
    assert result["tasks"]["world_mc"]["n"] == 8
    assert 0.0 <= result["tasks"]["world_mc"]["metrics"]["acc"] <= 1.0

    gate = run_cli(
        "eval",
        "world_mc",
        "--ckpt",
        "import:latest",
        "--limit",
        "8",
        "--min",
        "world_mc=1.01",
        "--json",
        cwd=project,
    )
    assert gate.code == 1
    assert gate.json()["gate_failures"] and gate.json()["artifact"] == "eval:v0001"  # reused, then gated

    compared = run_cli("eval", "compare", "eval:v1", "--json", cwd=project)
    assert compared.code == 0 and any(row["metric"] == "world_mc/acc" for row in compared.json())


def test_model_reference_errors(tmp_path):
    project = write_project(tmp_path / "p")
    missing = run_cli("generate", "hi", "--ckpt", "pretrain:latest", cwd=project)
    assert missing.code == 2 and "no pretrain artifacts" in missing.stderr
    bad_import = run_cli("import", str(tmp_path / "nothing-here"), cwd=project)
    assert bad_import.code == 2
    bad_min = run_cli("eval", "world_mc", "--min", "world_mc", cwd=project)
    assert bad_min.code == 2 and "bad --min" in bad_min.stderr


def test_chat_uses_the_chat_template_and_quits_on_empty_line(hf_folder):
    import subprocess
    import sys

    from conftest import cli_env

    proc = subprocess.run(
        [sys.executable, "-m", "llmctl", "chat", "--ckpt", str(hf_folder), "-t", "0", "-n", "5"],
        input="hello there\n\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("you> ") == 2 and proc.stdout.count("model> ") == 1
