"""The sft stage on real files: a tiny random base model, synthetic conversations, the real runner.

Covered here: the published folder is a chat model (template and stop token of training), the loss
falls on the trained tokens, LoRA publishes merged weights W + (alpha/r) B A and a PEFT adapter,
a run interrupted mid-step resumes bit-exactly from its checkpoint, the data order is a pure function
of (seed, epoch, position), and bad input fails with a readable error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_random_model_folder

from llmctl.data.synthetic_chat import generate_chat
from llmctl.errors import ConfigError, InputError, Interrupted
from llmctl.model.checkpoint import load_safetensors, weight_files
from llmctl.model.hf_tokenizer import load_folder_tokenizer
from llmctl.stages.registry import project_model


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    return write_random_model_folder(tmp_path_factory.mktemp("base") / "model")


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("chat")
    generate_chat(folder, n_conversations=80, seed=3)
    return folder


def sft_project(tmp_path: Path, chat_dir: Path, **sft: object):
    model = project_model()
    section = {
        "data": {"sources": [{"path": str(chat_dir / "chat.jsonl")}], "val_fraction": 0.1},
        "seq_len": 128,
        "micro_batch_size": 4,
        "batch_size": 8,
        "max_steps": 6,
        "eval_every": 3,
        "checkpoint_every": 3,
        "log_every": 1,
        "optimizer": {"lr": 3e-3, "warmup_steps": 1},
        **sft,
    }
    folder = tmp_path / "proj"
    folder.mkdir(parents=True, exist_ok=True)
    return model.model_validate({"name": "t", "workspace": str(folder / "ws"), "sft": section}), folder


def run_sft(project, folder, base: Path, **kwargs):
    """Import the base folder into the project's workspace (once), then fine-tune it."""
    from llmctl.stages.runner import run_stage

    imported = run_stage("import", project, folder, options={"source": str(base)}).artifact
    return run_stage("sft", project, folder, refs={"model": imported.id}, **kwargs)


def metric_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_sft_publishes_a_chat_model_whose_loss_fell(tmp_path, base_model, chat_dir):
    project, folder = sft_project(tmp_path, chat_dir, max_steps=12, eval_every=6)
    art = run_sft(project, folder, base_model).artifact
    out = art.path
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl", "loss.png"):
        assert (out / name).is_file(), name
    tok = load_folder_tokenizer(out)
    base_tok = load_folder_tokenizer(base_model)
    assert tok.chat_template == base_tok.chat_template  # trained with, published with: the same bytes
    assert tok.tokenizer.token_to_id("<|im_end|>") in tok.stop_ids
    train = [r["loss"] for r in metric_rows(out) if "loss" in r]
    assert len(train) == 12 and sum(train[-3:]) / 3 < sum(train[:3]) / 3 - 0.3, train
    m = art.manifest.metrics
    assert m["trainable_params"] == m["params"] and 0.5 < m["packing_efficiency"] <= 1
    assert 0.5 < m["batch_efficiency"] <= 1
    padded_project, padded_dir = sft_project(tmp_path / "padded", chat_dir, packing="padded", max_steps=2)
    padded = run_sft(padded_project, padded_dir, base_model).artifact.manifest.metrics
    assert padded["packing_efficiency"] is None and 0 < padded["batch_efficiency"] < m["batch_efficiency"]
    assert m["data"]["train"] + m["data"]["val"] == 80 and m["val_loss"] is not None
    assert art.manifest.inputs[0].slot == "model"
    # the newest model, for `--ckpt latest` and eval's default input, is now the chat model
    from llmctl.stages.registry import STAGES
    from llmctl.stages.runner import resolve_inputs, workspace_for

    ws = workspace_for(project, folder)
    assert ws.resolve("latest", kinds=("model",)).id == art.id
    assert resolve_inputs(STAGES["eval"], ws, {})[0]["model"].id == art.id


def test_lora_publishes_merged_weights_and_a_peft_adapter(tmp_path, base_model, chat_dir):
    lora = {"enabled": True, "rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}
    project, folder = sft_project(tmp_path, chat_dir, lora=lora, max_steps=3)
    art = run_sft(project, folder, base_model).artifact
    adapter_dir = art.path / "adapter"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["target_modules"] == ["q_proj", "v_proj"]
    adapter = load_safetensors([adapter_dir / "adapter_model.safetensors"])
    base = load_safetensors(weight_files(base_model))
    merged = load_safetensors(weight_files(art.path))
    layer = "model.layers.0.self_attn.q_proj"
    a = adapter[f"base_model.model.{layer}.lora_A.weight"]
    b = adapter[f"base_model.model.{layer}.lora_B.weight"]
    assert b.abs().max() > 0  # trained away from zero
    torch.testing.assert_close(merged[f"{layer}.weight"], base[f"{layer}.weight"] + (8 / 4) * b @ a)
    assert torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    m = art.manifest.metrics
    assert m["trainable_params"] == sum(t.numel() for t in adapter.values()) < m["params"] / 10


def test_an_interrupted_run_resumes_bit_exactly(tmp_path, base_model, chat_dir, monkeypatch):
    import llmctl.stages.sft as sft

    whole_project, whole_dir = sft_project(tmp_path / "whole", chat_dir)
    whole = run_sft(whole_project, whole_dir, base_model).artifact

    # Interrupt the second run inside step 5 (after the step-3 checkpoint): Ctrl-C in the data path.
    project, folder = sft_project(tmp_path / "cut", chat_dir)
    calls = {"n": 0}
    real_next = sft.ChatRows.next_batch

    def next_batch(self):
        calls["n"] += 1
        if calls["n"] == 2 * 4 + 1:  # grad_accum 2: the first micro-batch of step 5
            raise KeyboardInterrupt
        return real_next(self)

    monkeypatch.setattr(sft.ChatRows, "next_batch", next_batch)
    with pytest.raises(Interrupted):
        run_sft(project, folder, base_model)
    monkeypatch.setattr(sft.ChatRows, "next_batch", real_next)

    from llmctl.reporting import Reporter

    class Recorder(Reporter):
        lines: list[str] = []

        def log(self, message: str) -> None:
            self.lines.append(message)

    recorder = Recorder()
    resumed = run_sft(project, folder, base_model, resume=True, reporter=recorder).artifact
    assert "sft: resumed from step_000004 (" in " ".join(recorder.lines), recorder.lines
    rows = metric_rows(resumed.path)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows if "loss" in r] == [
        r["loss"] for r in metric_rows(whole.path) if "loss" in r
    ]
    ours, theirs = load_safetensors(weight_files(resumed.path)), load_safetensors(weight_files(whole.path))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_data_order_is_a_function_of_seed_epoch_and_position(base_model, chat_dir):
    from llmctl.config.sft import SftConfig
    from llmctl.stages.sft import ChatRows
    from llmctl.train.chat_tokens import ChatExample
    from llmctl.train.distributed import DistInfo

    examples = [ChatExample([1, 2, 3, i], [-100, 2, 3, i]) for i in range(10)]
    rows = [[i] for i in range(10)]
    cfg = SftConfig(micro_batch_size=3, batch_size=3, seq_len=8)
    first = ChatRows(examples, rows, cfg, 8, 0, DistInfo())
    seen = [first.next_batch().input_ids[:, 3].tolist() for _ in range(5)]  # crosses an epoch
    assert sorted(sum(seen[:3], []) + seen[3][:1]) == list(range(10))  # each row once per epoch
    again = ChatRows(examples, rows, cfg, 8, 0, DistInfo())
    for _ in range(2):
        again.next_batch()
    state = again.state_dict()
    restored = ChatRows(examples, rows, cfg, 8, 0, DistInfo())
    restored.load_state_dict(state)
    assert [restored.next_batch().input_ids[:, 3].tolist() for _ in range(3)] == seen[2:]
    # two processes split every micro-batch of the global order between them
    halves = [ChatRows(examples, rows, cfg, 8, 0, DistInfo(rank=r, world_size=2)) for r in (0, 1)]
    both = [h.next_batch().input_ids[:, 3].tolist() for h in halves]
    assert both[0] + both[1] == sum(seen[:2], [])


def test_bad_input_fails_once_with_a_readable_error(tmp_path, base_model, chat_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    project, folder = sft_project(tmp_path, chat_dir, data={"sources": [{"path": str(bad)}]})
    with pytest.raises(InputError, match=r"bad.jsonl:1"):
        run_sft(project, folder, base_model)
    project, folder = sft_project(tmp_path / "b", chat_dir, batch_size=6)
    with pytest.raises(ConfigError, match="sft.batch_size"):
        run_sft(project, folder, base_model)
    project, folder = sft_project(tmp_path / "c", chat_dir, seq_len=100_000)
    with pytest.raises(ConfigError, match="sft.seq_len"):
        run_sft(project, folder, base_model)
    # every conversation longer than seq_len and dropped: nothing to train on
    project, folder = sft_project(tmp_path / "d", chat_dir, seq_len=8, overlong="drop")
    with pytest.raises(InputError, match="no training conversation"):
        run_sft(project, folder, base_model)


def test_run_skips_sft_without_chat_data_and_the_cli_inspects_a_conversation(tmp_path, base_model, chat_dir):
    plain = project_model().model_validate({"name": "t"})
    from llmctl.stages.registry import STAGES

    assert STAGES["sft"].skip_reason(plain) == "no sft.data in llmctl.yaml"
    from llmctl.reporting import Reporter
    from llmctl.stages.runner import run_pipeline

    class Lines(Reporter):
        def __init__(self):
            super().__init__()
            self.lines = []

        def log(self, message: str) -> None:
            self.lines.append(message)

    lines = Lines()
    plain = project_model().model_validate({"name": "t", "workspace": str(tmp_path / "ws")})
    assert run_pipeline(["sft"], plain, tmp_path, reporter=lines) == []  # left out, not failed
    assert "sft: skipped (no sft.data in llmctl.yaml)" in lines.lines

    folder = tmp_path / "cli"
    folder.mkdir()
    (folder / "llmctl.yaml").write_text(
        f"name: t\nsft:\n  data:\n    sources:\n      - path: {chat_dir / 'chat.jsonl'}\n"
    )
    assert run_cli("import", str(base_model), cwd=folder).code == 0
    shown = run_cli("sft", "--inspect", "0", "--json", cwd=folder)
    assert shown.code == 0, shown.stderr
    data = shown.json()
    trained = "".join(t["text"] for t in data["tokens"] if t["trained"])
    untrained = "".join(t["text"] for t in data["tokens"] if not t["trained"])
    assert trained.endswith("<|im_end|>\n") and "<|im_start|>user" in untrained
    assert data["conversation"].endswith("chat.jsonl:1")


@pytest.mark.slow
def test_two_processes_through_the_cli(tmp_path, base_model, chat_dir):
    folder = tmp_path / "two"
    folder.mkdir()
    (folder / "llmctl.yaml").write_text(
        "name: t\n"
        "sft:\n"
        f"  data:\n    sources:\n      - path: {chat_dir / 'chat.jsonl'}\n"
        "  seq_len: 128\n  micro_batch_size: 2\n  batch_size: 8\n  max_steps: 3\n  eval_every: 0\n"
    )
    assert run_cli("import", str(base_model), cwd=folder).code == 0
    result = run_cli("sft", "--gpus", "2", "--device", "cpu", "--json", cwd=folder, timeout=600)
    assert result.code == 0, result.stderr[-3000:]
    doc = result.json()
    assert doc["artifact"] == "sft:v0001" and doc["metrics"]["world_size"] == 2
    assert doc["metrics"]["grad_accum"] == 2 and doc["metrics"]["steps"] == 3
    # a batch that does not split over 3 processes is refused before any starts
    bad = run_cli("sft", "--gpus", "3", "--device", "cpu", "--force", cwd=folder)
    assert bad.code == 2 and "sft.batch_size" in bad.stderr and "torch.distributed" not in bad.stderr


def test_edited_chat_data_makes_sft_run_again(tmp_path, base_model, chat_dir):
    chat = tmp_path / "chat.jsonl"
    chat.write_bytes((chat_dir / "chat.jsonl").read_bytes())
    data = {"sources": [{"path": str(chat)}], "val_fraction": 0.1}
    project, folder = sft_project(tmp_path, chat_dir, data=data, max_steps=1, eval_every=0)
    first = run_sft(project, folder, base_model)
    assert not first.reused and first.inputs["chat"] == "sft.data"
    assert run_sft(project, folder, base_model).reused
    lines = chat.read_text().splitlines()
    chat.write_text("\n".join(lines[:-1]) + "\n")  # one conversation fewer
    again = run_sft(project, folder, base_model)
    assert not again.reused and again.artifact.id == "sft:v0002"
