"""`llmctl quantize` through the real CLI: the scored and measured artifact, gates (exit 1), bad input
(exit 2), and the quantized artifact used by generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli, write_project, write_random_model_folder

from llmctl.stages.quantize import gate_failures


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Two imported random models (import:v0001 test-1m; import:v0002 with an MLP 352 wide, which
    group size 64 does not divide) and a text file for perplexity and calibration."""
    import json

    from llmctl.data.synthetic import iter_documents

    tmp = tmp_path_factory.mktemp("quantize")
    first = write_random_model_folder(tmp / "model")
    second = write_random_model_folder(tmp / "narrow")
    config = json.loads((second / "config.json").read_text())
    config["intermediate_size"] = 352
    (second / "config.json").write_text(json.dumps(config))
    _narrow_weights(second)
    project = write_project(
        tmp / "p",
        "quantize:\n  text: notes.txt\n  calibration: {path: notes.txt, samples: 4, seq_len: 64}\n"
        "  speed_tokens: 0\n",
    )
    (project / "notes.txt").write_text("\n\n".join(d["text"] for d in iter_documents(40, seed=5)))
    for folder in (first, second):
        imported = run_cli("import", str(folder), cwd=project)
        assert imported.code == 0, imported.stderr
    return project


def _narrow_weights(folder: Path) -> None:
    """Cut the MLP of a saved test-1m folder to 352 columns (to match its config)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    for name in list(tensors):
        if name.endswith(("gate_proj.weight", "up_proj.weight")):
            tensors[name] = tensors[name][:352].contiguous()
        elif name.endswith("down_proj.weight"):
            tensors[name] = tensors[name][:, :352].contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.slow
def test_quantize_scores_both_models_measures_them_and_generate_loads_it(project):
    ran = run_cli(
        "--json", "quantize", "--model", "import:v0001", "--set", "quantize.speed_tokens=4", cwd=project
    )
    assert ran.code == 0, ran.stderr
    doc = ran.json()
    metrics = doc["metrics"]
    assert metrics["method"] == "rtn int8 per-channel sym"
    assert doc["gate_failures"] == []
    for key in ("perplexity/ppl", "perplexity/bits_per_byte"):
        assert metrics[f"delta/{key}"] == pytest.approx(
            metrics[f"quantized/{key}"] - metrics[f"source/{key}"]
        )
    assert abs(metrics["ppl_increase_pct"]) < 1.0  # int8 on a random model: well under a percent
    assert metrics["bytes_on_disk/quantized"] < 0.5 * metrics["bytes_on_disk/source"]
    assert metrics["memory_bytes/quantized"] < metrics["memory_bytes/source"]
    assert metrics["decode_tok_s/b1/quantized"] > 0 and metrics["decode_tok_s/b8/source"] > 0
    folder = Path(doc["path"])
    assert (folder / "tokenizer.json").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    # int8 quantizes the output projection by default (untied), int4 keeps it (QuantizeConfig.lm_head)
    assert config["quantization_config"]["ignore"] == [] and config["tie_word_embeddings"] is False

    generated = run_cli("generate", "The capital of", "--ckpt", "quantize:latest", "-n", "4", cwd=project)
    assert generated.code == 0, generated.stderr

    # The same artifact, now with gates: reused (not quantized again), and a failed gate exits 1.
    gated = run_cli(
        "--json",
        "quantize",
        "--model",
        "import:v0001",
        "--set",
        "quantize.speed_tokens=4",
        "--min",
        "perplexity/ppl=1.0",
        cwd=project,
    )
    assert gated.code == 1, gated.stderr
    assert gated.json()["reused"] is True
    assert gated.json()["gate_failures"] == [
        f"perplexity/ppl = {metrics['quantized/perplexity/ppl']:.4f} > 1.0 (lower is better)"
    ]


def test_the_perplexity_gate():
    metrics = {"ppl_increase_pct": 2.5, "quantized/world_mc/acc": 0.4}
    assert gate_failures(metrics, 3.0, {}) == []
    assert gate_failures(metrics, 2.0, {}) == ["perplexity +2.50% > 2.0%"]
    assert gate_failures(metrics, None, {"world_mc": 0.5}) == ["world_mc/acc = 0.4000 < 0.5"]


@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(project):
    quantized = run_cli("quantize", "--model", "import:v0001", cwd=project)
    assert quantized.code == 0, quantized.stderr
    again = run_cli("quantize", "--model", "quantize:latest", cwd=project)
    assert again.code == 2
    assert "is already quantized (compressed-tensors)" in again.stderr

    narrow = run_cli(
        "quantize",
        "--model",
        "import:v0002",
        "--set",
        "quantize.bits=4",
        "--set",
        "quantize.group_size=64",
        cwd=project,
    )
    assert narrow.code == 2
    assert (
        "group size 64 does not divide the input width 352 of model.layers.0.mlp.down_proj" in narrow.stderr
    )

    too_few = run_cli(
        "quantize",
        "--model",
        "import:v0001",
        "--set",
        "quantize.method=gptq",
        "--set",
        "quantize.calibration.samples=100000",
        cwd=project,
    )
    assert too_few.code == 2
    assert "calibration set too small" in too_few.stderr and "needs 6,400,000" in too_few.stderr
    for result in (again, narrow, too_few):
        assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_gguf_format_writes_the_file_and_scores_its_dequantized_weights(project):
    ran = run_cli("--json", "quantize", "--model", "import:v0001", "--type", "q8_0", cwd=project)
    assert ran.code == 0, ran.stderr
    metrics = ran.json()["metrics"]
    assert metrics["method"] == "gguf q8_0"
    gguf = Path(ran.json()["path"]) / "model-q8_0.gguf"
    assert gguf.is_file() and metrics["bytes_on_disk/quantized"] == gguf.stat().st_size
    assert abs(metrics["ppl_increase_pct"]) < 1.0
