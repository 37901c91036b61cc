"""import, generate and eval through the real CLI on a small random model with a real tokenizer."""

from __future__ import annotations

import pytest
import torch
from conftest import run_cli, write_project, write_random_model_folder

from llmctl.model.checkpoint import save_model_folder
from llmctl.model.config import preset
from llmctl.model.transformer import Transformer


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return write_random_model_folder(tmp_path_factory.mktemp("hf-model"))


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
    assert compared.code == 0 and any(row["metric"] == "world_mc/acc" for row in compared.json()["rows"])


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


@pytest.fixture(scope="module")
def chat_folder(hf_folder, tmp_path_factory):
    """hf_folder with its tokenizer re-saved by transformers: the template is in chat_template.jinja only."""
    import json
    import shutil

    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf-chat") / "model"
    shutil.copytree(hf_folder, folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink()
    transformers.AutoTokenizer.from_pretrained(hf_folder).save_pretrained(folder)
    assert (folder / "chat_template.jinja").is_file()
    assert "chat_template" not in json.loads((folder / "tokenizer_config.json").read_text())
    return folder


def test_chat_on_an_imported_folder_with_chat_template_jinja(tmp_path, chat_folder):
    import subprocess
    import sys

    from conftest import cli_env

    project = write_project(tmp_path / "p")
    assert run_cli("import", str(chat_folder), cwd=project).code == 0
    proc = subprocess.run(
        [sys.executable, "-m", "llmctl", "chat", "--ckpt", "import:latest", "-t", "0", "-n", "4"],
        input="hello there\n\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(),
        cwd=project,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("model> ") == 1
    assert "model: import:v0001" in proc.stderr  # which artifact `import:latest` was


@pytest.mark.parametrize("where", ["root", "command"])
def test_chat_json_reads_turns_from_stdin_and_prints_one_document(tmp_path, chat_folder, where):
    import json
    import subprocess
    import sys

    from conftest import cli_env

    flags = ["--json", "chat"] if where == "root" else ["chat", "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "llmctl", *flags, "--ckpt", str(chat_folder), "-t", "0", "-n", "4"],
        input="hello there\nand again\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # exactly one JSON document, no prompts mixed in
    assert doc["model"] == str(chat_folder)
    assert [m["role"] for m in doc["messages"]] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in doc["messages"][::2]] == ["hello there", "and again"]
    assert [r["text"] for r in doc["replies"]] == [m["content"] for m in doc["messages"][1::2]]
    assert all(1 <= r["tokens"] <= 4 and r["finish_reason"] in ("stop", "length") for r in doc["replies"])


@pytest.fixture(scope="module")
def line_folder(hf_folder, tmp_path_factory):
    """A model that writes "4\\n4\\n4\\n...": every block adds nothing, so the logits follow the last token
    alone (embedding e0 -> "4"; the embedding of "4" is e1 -> newline)."""
    import shutil

    import tokenizers

    folder = tmp_path_factory.mktemp("line-model") / "model"
    shutil.copytree(hf_folder, folder)
    hf = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    [four] = hf.encode("4", add_special_tokens=False).ids
    [newline] = hf.encode("\n", add_special_tokens=False).ids
    model = Transformer(preset("test-1m", vocab_size=hf.get_vocab_size(), tie_embeddings=False))
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    for name in state:
        if name.endswith("norm.weight"):
            state[name].fill_(1.0)
    state["model.embed_tokens.weight"][:, 0] = 1.0
    state["model.embed_tokens.weight"][four] = torch.nn.functional.one_hot(torch.tensor(1), 128).float()
    state["lm_head.weight"][four, 0] = 10.0
    state["lm_head.weight"][newline, 1] = 10.0
    model.load_state_dict(state)
    save_model_folder(model, folder)
    return folder


def test_documented_stop_newline_example_stops_at_the_newline(tmp_path, line_folder):
    """`generate --help`'s example, as typed: the shell passes backslash + n."""
    base = ["generate", "2 + 2 =", "--ckpt", str(line_folder), "-n", "8", "--json"]
    unstopped = run_cli(*base, cwd=tmp_path)
    assert unstopped.code == 0, unstopped.stderr
    assert unstopped.json()["text"].startswith("4\n4\n")
    stopped = run_cli(*base[:4], "--stop", "\\n", *base[4:], cwd=tmp_path)
    assert stopped.code == 0, stopped.stderr
    assert (stopped.json()["text"], stopped.json()["finish_reason"]) == ("4", "stop")
    assert '--stop "\\n"' in run_cli("generate", "--help").stdout
    literal = run_cli(*base[:4], "--stop", "\\\\n", *base[4:], cwd=tmp_path)  # an escaped backslash
    assert literal.json()["text"] == unstopped.json()["text"]


def test_generate_says_which_artifact_latest_resolved_to(tmp_path, hf_folder):
    project = write_project(tmp_path / "p")
    assert run_cli("import", str(hf_folder), cwd=project).code == 0
    gen = run_cli("generate", "The", "--ckpt", "import:latest", "-n", "2", cwd=project)
    assert gen.code == 0 and "model: import:v0001" in gen.stderr.splitlines()
    as_json = run_cli("generate", "The", "-n", "2", "--json", cwd=project)  # default --ckpt latest
    assert as_json.json()["model"] == "import:v0001"
