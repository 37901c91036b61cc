"""LoRA: starts at the base model, trains only A and B, merges (on a state dict) to W + (alpha/r) B A,
and writes an adapter that peft loads onto the Hugging Face model with the same outputs."""

from __future__ import annotations

import pytest
import torch

from llmctl.model.config import preset
from llmctl.model.lora import add_lora, lora_layers, save_peft_adapter, split_lora_state
from llmctl.model.transformer import Transformer


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(preset("test-1m", vocab_size=256, n_layer=2, n_embd=64))
    model.init_weights()
    return model


def _randomize_adapters(model: Transformer) -> None:
    torch.manual_seed(1)
    for layer in lora_layers(model).values():
        layer.lora_B.weight.data.normal_(0, 0.05)


def test_lora_starts_at_the_base_model_and_trains_only_the_adapters():
    model = _model()
    x = torch.randint(0, 256, (2, 12))
    # Both forwards without grad, so both run the module path: with grad the base model would run the
    # fused CPU training blocks, whose attention kernel rounds differently (LoRA's hooks opt out).
    with torch.no_grad():
        before = model(x)
    adapted = add_lora(model, rank=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))
    assert len(adapted) == 6
    with torch.no_grad():
        assert torch.equal(model(x), before)  # B = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A.weight", "lora_B.weight")) for n in trainable)
    assert len(trainable) == 12
    # every other name is the HF name it was
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()


def test_merged_weights_equal_w_plus_scaled_b_a():
    model = _model()
    add_lora(model, rank=4, alpha=16, dropout=0.0, targets=("q_proj", "gate_proj"))
    _randomize_adapters(model)
    layers = lora_layers(model)
    expected = {
        name: layer.weight.detach() + (16 / 4) * layer.lora_B.weight.detach() @ layer.lora_A.weight.detach()
        for name, layer in layers.items()
    }
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        adapted_logits = model(x)
    plain, adapter = split_lora_state(model.state_dict(), scaling=16 / 4)
    assert len(adapter) == 2 * len(layers) and all(k.startswith("base_model.model.") for k in adapter)
    for name, weight in expected.items():
        torch.testing.assert_close(plain[f"{name}.weight"], weight, atol=1e-6, rtol=0)
    assert not any("lora" in k for k in plain)
    merged = Transformer(model.config)  # a plain model with the merged weights computes the same
    loaded = merged.load_state_dict(plain, strict=False)
    assert not loaded.unexpected_keys and set(loaded.missing_keys) <= {"lm_head.weight"}  # tied head
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted_logits, atol=1e-5, rtol=1e-5)


def test_peft_loads_the_adapter_onto_the_hf_model(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from llmctl.model.checkpoint import save_model_folder

    model = _model()
    save_model_folder(model, tmp_path / "base")
    add_lora(model, rank=4, alpha=8, dropout=0.1, targets=("q_proj", "k_proj", "up_proj"))
    _randomize_adapters(model)
    _, adapter = split_lora_state(model.state_dict(), scaling=8 / 4)
    save_peft_adapter(tmp_path / "adapter", adapter, rank=4, alpha=8, dropout=0.1, base_model=None)

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    model.eval()
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, model(x), atol=1e-4, rtol=1e-4)
