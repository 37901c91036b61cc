"""Weight quantization (llmctl.model.quantize): RTN error bounds, GPTQ against RTN, the stored format
(compressed-tensors' packing, transformers loading our folder), and quantized decode on CPU kernels."""

from __future__ import annotations

import copy

import pytest
import torch

from llmctl.model.checkpoint import load_model_folder, save_model_folder
from llmctl.model.config import preset
from llmctl.model.decode import PackedDecoder
from llmctl.model.quantize import (
    KernelWeight,
    QuantizedLinear,
    QuantScheme,
    pack_int32,
    quantization_config,
    quantize_model,
    quantize_rtn,
    unpack_int32,
)
from llmctl.model.transformer import KVCache, Transformer

SCHEMES = [QuantScheme(8), QuantScheme(4, 32), QuantScheme(4, 64, symmetric=False)]


def small_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset("test-1m", vocab_size=256)).eval()


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_rtn_dequantized_weights_are_within_half_a_step_of_the_source(scheme):
    torch.manual_seed(0)
    w = torch.randn(48, 128) * torch.rand(48, 1)  # rows of different scales
    qw = quantize_rtn(w, scheme)
    assert qw.codes.dtype == torch.int8
    assert int(qw.codes.min()) >= scheme.qmin and int(qw.codes.max()) <= scheme.qmax
    step = qw.scale.repeat_interleave(128 // qw.scale.shape[1], dim=1)  # (48, 128)
    err = (qw.dequantize() - w).abs()
    # Round to nearest: at most half a step off, inside the representable range (within one step, as
    # the issue asks, with room to spare).
    assert bool((err <= 0.5 * step * (1 + 1e-5) + 1e-7).all()), float((err / step).max())


def test_gptq_lowers_the_calibration_error_of_rtn_at_the_same_bits():
    model = small_model()
    calibration = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(1))
    scheme = QuantScheme(4, 32)
    rtn = quantize_model(copy.deepcopy(model), scheme, method="rtn", calibration=calibration)
    gptq = quantize_model(copy.deepcopy(model), scheme, method="gptq", calibration=calibration)
    assert rtn.keys() == gptq.keys() and len(rtn) == 2 * 7
    mean_rtn, mean_gptq = sum(rtn.values()) / len(rtn), sum(gptq.values()) / len(gptq)
    assert mean_gptq < 0.8 * mean_rtn, (mean_gptq, mean_rtn)
    assert sum(gptq[k] < rtn[k] for k in rtn) >= len(rtn) - 1  # layer by layer, too


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_is_compressed_tensors_own(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (24, 100), dtype=torch.int8)
    for dim in (0, 1):
        packed = pack_int32(q, bits, dim)
        assert torch.equal(packed, helpers.pack_to_int32(q, bits, packed_dim=dim))
        assert torch.equal(unpack_int32(packed, bits, q.shape[dim], dim), q)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_a_quantized_folder_loads_back_exactly(tmp_path, scheme):
    model = small_model()
    quantize_model(model, scheme, lm_head=scheme.bits == 4)
    config = quantization_config(scheme, [] if scheme.bits == 4 else ["lm_head"])
    save_model_folder(model, tmp_path, quantization_config=config, eos_token_id=0)
    loaded, cfg = load_model_folder(tmp_path)
    assert cfg.tie_embeddings is (scheme.bits == 8)  # a quantized lm_head is untied from the embeddings
    assert isinstance(loaded.lm_head, QuantizedLinear) is (scheme.bits == 4)
    idx = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert torch.equal(model(idx), loaded(idx))


@pytest.mark.parametrize("scheme", SCHEMES[:2], ids=lambda s: s.name)
def test_transformers_loads_our_folder_with_the_same_logits(tmp_path, scheme):
    """transformers (with the compressed-tensors package) decompresses our folder itself; logits agree
    to 1e-4. Asymmetric folders are left out: transformers 5.24 + compressed-tensors 0.20.1 expect the
    zero points unpacked while loading and refuse the packed ones that format (and vLLM) specify."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    model = small_model()
    quantize_model(model, scheme)
    save_model_folder(model, tmp_path, quantization_config=quantization_config(scheme, ["lm_head"]))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    idx = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_kernel_matmul_equals_the_dequantized_weight(scheme):
    torch.manual_seed(0)
    w = torch.randn(40, 128)  # 40 rows: the int4 kernel pads its output width to a multiple of 16
    layer = QuantizedLinear(quantize_rtn(w, scheme))
    x = torch.randn(3, 128)
    ref = x @ layer.dequantize().T
    got = KernelWeight(layer.quantized_weight())(x)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()  # bf16 activations


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_quantized_decode_equals_the_dequantized_forward(scheme):
    """The packed decoder (int8/int4 kernels, bf16 activations) against the model's forward with the
    dequantized fp32 weights: same logits to bf16 rounding, the same greedy tokens."""
    model = small_model()
    quantize_model(model, scheme, lm_head=True)
    dequantized = copy.deepcopy(model)
    for name, m in list(dequantized.named_modules()):
        if isinstance(m, QuantizedLinear):
            linear = torch.nn.Linear(m.in_features, m.out_features, bias=False)
            linear.weight.data = m.dequantize()
            parent, _, attr = name.rpartition(".")
            setattr(dequantized.get_submodule(parent) if parent else dequantized, attr, linear)
    prompt = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(2))
    decoder = PackedDecoder(model)
    ours, ref = KVCache(model.config, 2, 32), KVCache(model.config, 2, 32)
    with torch.inference_mode():
        model(prompt, cache=ours)
        dequantized(prompt, cache=ref)
        ids = prompt[:, -1]
        for _ in range(6):
            got = decoder.step(ids, ours)
            want = dequantized(ids[:, None], cache=ref)[:, -1]
            assert (got - want).abs().max() <= 2e-2 * want.abs().max()
            assert torch.equal(got.argmax(-1), want.argmax(-1))
            ids = want.argmax(-1)
