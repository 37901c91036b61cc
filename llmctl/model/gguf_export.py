"""Export an llmctl model folder as one GGUF file, for llama.cpp (and transformers' GGUF loader).

    export_gguf(Path("model"), Path("model-q8_0.gguf"), "q8_0")
    available_qtypes()   # ("f16", "q8_0", "q4_0", "q4_1") with gguf 0.19; K-quants when it has them

What is written follows llama.cpp's convert_hf_to_gguf.py and llama-quantize, so its runtime reads
the file unchanged:
- architecture `llama` (`qwen2` with q/k/v biases, `qwen3` with QK-norm: the names `ModelConfig`
  exports to HF), its shape metadata under that prefix, and `general.file_type`;
- tensors under llama.cpp's names; for `llama` the q/k rows are permuted into llama.cpp's
  interleaved rope order (the inverse of hf_import.unpermute_rope); tied embeddings are stored once,
  as `token_embd.weight` (llama.cpp then reuses it as the output projection);
- 1-D tensors (norms, biases) in f32; 2-D weights in the chosen type, or f16 where a row is not a
  whole number of quantization blocks (convert_hf_to_gguf's fallback); below 8 bits the output
  projection (token_embd when tied) is q8_0, as llama-quantize keeps it (see _output_type);
- the tokenizer as GPT-2-style byte-level BPE (`tokenizer.ggml.model=gpt2`): tokens, token types,
  merges, the pre-tokenizer's llama.cpp name, BOS/EOS/PAD ids, whether prompts start with BOS, and
  the default chat template.

Quantization is the `gguf` package's own (gguf.quants.quantize, the reference numpy port of ggml's):
SmolLM2-135M's published Q4_1 file, imported and exported again as q4_1, comes back byte for byte in
every tensor (tests/test_gguf_export.py).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmctl.errors import InputError
from llmctl.model.checkpoint import load_safetensors, read_model_config, weight_files
from llmctl.model.config import ModelConfig
from llmctl.model.hf_import import _GGUF_NAMES
from llmctl.model.hf_tokenizer import TOKENIZER_JSON, load_folder_tokenizer

# Type names as llama.cpp's tools spell them -> (GGML tensor type, general.file_type) names.
_QTYPES = {
    "f16": ("F16", "MOSTLY_F16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),  # q4_0 plus a per-block minimum (llama.cpp's own Q4_1 files)
    "q4_k": ("Q4_K", "MOSTLY_Q4_K_S"),  # every weight Q4_K, no Q6_K mix: the _S file type
    "q6_k": ("Q6_K", "MOSTLY_Q6_K"),
}

# HF tensor name pattern -> llama.cpp name: the importer's table, read the other way.
_HF_TO_GGUF = {hf: gguf for gguf, hf in _GGUF_NAMES.items()}

# Pre-token regexes of the byte-level tokenizers llama.cpp knows, by its `tokenizer.ggml.pre` name.
# llama-bpe is GPT-4's cl100k split (llmctl's default); qwen2 is the same with single digits
# (llmctl's split_digits); gpt-2 is what a bare ByteLevel(use_regex=True) pre-tokenizer splits by.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_PRE_TOKENIZERS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2", _GPT2_SPLIT: "gpt-2"}


def available_qtypes() -> tuple[str, ...]:
    """The --type values this machine can write: the K-quants only where the installed gguf
    package implements their quantizer (0.19 does not: it raises NotImplementedError)."""
    return tuple(name for name in _QTYPES if _quantizer_works(name))


@functools.cache
def _quantizer_works(name: str) -> bool:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize

    qtype = GGMLQuantizationType[_QTYPES[name][0]]
    try:
        quantize(np.zeros((1, GGML_QUANT_SIZES[qtype][0]), dtype=np.float32), qtype)
    except NotImplementedError:
        return False
    return True


def export_gguf(model_folder: Path, out_file: Path, qtype: str) -> Path:
    """Write the model folder as a GGUF file of type `qtype` (see available_qtypes); returns out_file.

    The file appears whole or not at all (written beside it, then renamed)."""
    import gguf

    model_folder, out_file = Path(model_folder), Path(out_file)
    if qtype not in _QTYPES:
        raise InputError(
            f"unknown GGUF type {qtype!r}; known: {', '.join(available_qtypes())}",
            hint="pick one of those with --type",
        )
    if not _quantizer_works(qtype):
        raise InputError(
            f"GGUF type {qtype!r} needs a quantizer the installed gguf package ({_gguf_version()}) does "
            f"not have; available: {', '.join(available_qtypes())}",
            hint="use q8_0 (or q4_0/q4_1), or run llama.cpp's llama-quantize on an f16 export",
        )
    cfg, raw_config = read_model_config(model_folder)
    if raw_config.get("quantization_config"):
        raise InputError(
            f"{model_folder}: the model is already quantized "
            f"({raw_config['quantization_config'].get('quant_method', 'quantization_config')})",
            hint="export the unquantized model it was made from (its artifact is the quantize run's input)",
        )
    arch = cfg.hf_model_type()
    if cfg.rope_scaling is not None:
        raise InputError(
            f"{model_folder}: GGUF export of a model with {cfg.rope_scaling.rope_type} rope scaling "
            "is not supported yet"
        )
    tensor_type = gguf.GGMLQuantizationType[_QTYPES[qtype][0]]
    file_type = gguf.LlamaFileType[_QTYPES[qtype][1]]

    tmp = out_file.with_name(f".{out_file.name}.tmp")
    out_file.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer.add_name(out_file.stem)
        _add_architecture(writer, cfg, file_type)
        _add_tokenizer(writer, model_folder, cfg, raw_config)
        tensors = load_safetensors(weight_files(model_folder))
        for hf_name, w in tensors.items():
            name, data, raw_dtype = _encode_tensor(hf_name, w, cfg, arch, tensor_type)
            if name is not None:
                writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(tmp, out_file)
    return out_file


def _gguf_version() -> str:
    from importlib.metadata import version

    return f"gguf {version('gguf')}"


# ---- architecture and weights ------------------------------------------------------------------


def _add_architecture(writer: Any, cfg: ModelConfig, file_type: int) -> None:
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(2)  # ggml's block layout version (GGML_QNT_VERSION)


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's q/k rows (each head's rotary pairs as two halves) -> llama.cpp's (pairs interleaved):
    convert_hf_to_gguf.py LlamaModel.permute; hf_import.unpermute_rope undoes it."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, dim, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf_name: str) -> str:
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"]:
        pattern = ".".join(["model", "layers", "{}", *parts[3:]])
        if pattern in _HF_TO_GGUF:
            return f"blk.{parts[2]}.{_HF_TO_GGUF[pattern]}"
    elif hf_name in _HF_TO_GGUF:
        return _HF_TO_GGUF[hf_name]
    raise InputError(f"tensor {hf_name} has no GGUF name (not a plain Llama-family weight)")


def _encode_tensor(
    hf_name: str, w: torch.Tensor, cfg: ModelConfig, arch: str, tensor_type: Any
) -> tuple[str | None, np.ndarray, Any]:
    """(GGUF name or None to skip, data, raw GGML type or None when numpy's dtype says it)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize

    if hf_name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and hf_name == "lm_head.weight"):
        return None, np.empty(0), None
    name = _gguf_name(hf_name)
    w = w.detach().to(torch.float32)
    # llama.cpp's llama graph rotates interleaved pairs; qwen2/qwen3 use HF's halves unchanged.
    if arch == "llama" and name.endswith("attn_q.weight"):
        w = permute_rope(w, cfg.n_head)
    elif arch == "llama" and name.endswith("attn_k.weight"):
        w = permute_rope(w, cfg.n_kv_head)
    data = w.numpy()
    if data.ndim == 1:
        return name, data, None  # norms and biases stay f32, as llama.cpp's converter keeps them
    if name == "output.weight" or (cfg.tie_embeddings and name == "token_embd.weight"):
        tensor_type = _output_type(tensor_type, data.shape[-1])
    block = GGML_QUANT_SIZES[tensor_type][0]
    if tensor_type == GGMLQuantizationType.F16 or data.shape[-1] % block:
        return name, data.astype(np.float16), None
    return name, quantize(data, tensor_type), tensor_type


def _output_type(tensor_type: Any, row: int) -> Any:
    """The type of the output projection: llama-quantize (llama_tensor_get_type) gives it q6_k, or
    q8_0 where rows are not whole 256-blocks, in every type below 8 bits; q8_0 where this gguf
    package cannot write q6_k. It matters: SmolLM2-135M in q4_1 with a q4_1 output has KL 0.053 to
    its source, with a q8_0 output (the layout of its published Q4_1 file) 0.0, for 12 MB more."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if tensor_type in (GGMLQuantizationType.F16, GGMLQuantizationType.Q8_0):
        return tensor_type
    q6_k = GGMLQuantizationType.Q6_K
    if row % GGML_QUANT_SIZES[q6_k][0] == 0 and _quantizer_works("q6_k"):
        return q6_k
    return GGMLQuantizationType.Q8_0


# ---- tokenizer ---------------------------------------------------------------------------------


def _pre_tokenizer_name(tokenizer_json: dict[str, Any], folder: Path) -> str:
    """llama.cpp's name for how this byte-level BPE splits text before merging."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and steps[0].get("behavior") == "Isolated"
        and not steps[0].get("invert")
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex", True)
        and not steps[1].get("add_prefix_space")
        and steps[0].get("pattern", {}).get("Regex") in _PRE_TOKENIZERS
    ):
        return _PRE_TOKENIZERS[steps[0]["pattern"]["Regex"]]
    raise InputError(
        f"{folder / TOKENIZER_JSON}: its pre-tokenizer is not one llama.cpp knows by name "
        f"(supported: {', '.join(sorted(_PRE_TOKENIZERS.values()))})",
        hint="train the tokenizer with split_pattern gpt4 or gpt2 for a GGUF export",
    )


def _add_tokenizer(writer: Any, folder: Path, cfg: ModelConfig, raw_config: dict[str, Any]) -> None:
    from gguf import TokenType

    tok = load_folder_tokenizer(folder)
    tokenizer_json = json.loads((folder / TOKENIZER_JSON).read_text(encoding="utf-8"))
    model = tokenizer_json.get("model") or {}
    decoder = (tokenizer_json.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or decoder != "ByteLevel":
        raise InputError(
            f"{folder / TOKENIZER_JSON}: GGUF export supports byte-level BPE tokenizers (GPT-2 style); "
            f"this one is {model.get('type')} with a {decoder} decoder",
        )
    pre = _pre_tokenizer_name(tokenizer_json, folder)
    vocab = tok.tokenizer.get_vocab(with_added_tokens=True)
    if len(vocab) > cfg.vocab_size or max(vocab.values()) >= cfg.vocab_size:
        raise InputError(
            f"{folder}: the tokenizer has {len(vocab)} tokens, more than the model's {cfg.vocab_size} embeddings"
        )
    special = {t["content"]: bool(t.get("special")) for t in tokenizer_json.get("added_tokens", [])}
    # Rows beyond the tokenizer (a vocabulary padded for speed) get placeholder tokens, as
    # convert_hf_to_gguf writes them: llama.cpp needs one token per embedding row.
    tokens = [f"[PAD{i}]" for i in range(cfg.vocab_size)]
    types = [TokenType.UNUSED] * cfg.vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        if text in special:
            types[i] = TokenType.CONTROL if special[text] else TokenType.USER_DEFINED
        else:
            types[i] = TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tok.bos_id is not None:
        writer.add_bos_token_id(tok.bos_id)
    if tok.eos_id is not None:
        writer.add_eos_token_id(tok.eos_id)
    # config.json's pad id is what the model was trained with; the tokenizer's pad token the fallback.
    pad_id = raw_config.get("pad_token_id")
    if not isinstance(pad_id, int) and tok.special_tokens.get("pad_token") in vocab:
        pad_id = vocab[tok.special_tokens["pad_token"]]
    if isinstance(pad_id, int):
        writer.add_pad_token_id(pad_id)
    writer.add_add_bos_token(tok.add_bos)
    writer.add_add_eos_token(False)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)
