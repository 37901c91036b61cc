"""Model folders on disk, in the Hugging Face Llama layout (so `transformers` loads them unchanged).

A model folder holds `config.json`, `generation_config.json`, the weights as `model.safetensors`
(or `model-0000K-of-0000N.safetensors` shards plus `model.safetensors.index.json` above
`max_shard_bytes`) and, copied in by the caller, tokenizer files (`TOKENIZER_FILES`).

A quantized model (QuantizedLinear layers, llmctl/model/quantize.py) is saved in compressed-tensors'
`pack-quantized` format: config.json's `quantization_config` names the scheme, each quantized layer
stores `weight_packed`/`weight_scale`/`weight_shape` (and `weight_zero_point`) instead of `weight`.
Loading such a folder rebuilds the QuantizedLinear layers.

    save_model_folder(model, "out/model", dtype=torch.bfloat16, eos_token_id=0)
    model, cfg = load_model_folder("out/model", device="cuda")
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmctl.errors import InputError
from llmctl.model.config import ModelConfig
from llmctl.model.quantize import (
    QuantizedLinear,
    is_quantized_config,
    layer_from_tensors,
    packed_tensors,
    quantized_modules,
    replace_module,
    scheme_from_config,
)
from llmctl.model.transformer import Transformer

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_NAMED_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"unsupported checkpoint dtype {dtype}; use float32, bfloat16 or float16")
    return _DTYPE_NAMES[dtype]


def hf_config_dict(
    cfg: ModelConfig,
    *,
    dtype: torch.dtype = torch.float32,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> dict:
    """The config.json contents for cfg: architecture fields plus dtype and special token ids."""
    d = cfg.to_hf_config()
    d.update(
        torch_dtype=_dtype_name(dtype),
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    return dict(sorted(d.items()))


def save_state_dict_folder(
    state_dict: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    generation_config: dict | None = None,
    quantization_config: dict | None = None,
) -> list[Path]:
    """Write HF-named tensors and cfg as a model folder; returns the files written.

    Tied embeddings are stored once, as `model.embed_tokens.weight` (what HF writes); any
    `lm_head.weight` in state_dict is then dropped. Extra non-tensor state is not accepted here.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[name] = t.to("cpu").contiguous()
    save_dtype = dtype or tensors["model.embed_tokens.weight"].dtype

    # Greedy sharding in name order: one shard unless the total exceeds max_shard_bytes.
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes

    written = []
    for stale in list(folder.glob("model*.safetensors")) + [folder / WEIGHTS_INDEX_FILE]:
        stale.unlink(missing_ok=True)  # a re-save with fewer shards must not leave old ones behind
    if len(shards) == 1:
        save_file(shards[0], folder / WEIGHTS_FILE, metadata={"format": "pt"})
        written.append(folder / WEIGHTS_FILE)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, folder / fname, metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
            written.append(folder / fname)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / WEIGHTS_INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        written.append(folder / WEIGHTS_INDEX_FILE)

    config = hf_config_dict(
        cfg, dtype=save_dtype, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id
    )
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    written.append(folder / CONFIG_FILE)
    gen = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    gen = {k: v for k, v in gen.items() if v is not None}
    gen.update(generation_config or {})
    (folder / GENERATION_CONFIG_FILE).write_text(json.dumps(gen, indent=2) + "\n")
    written.append(folder / GENERATION_CONFIG_FILE)
    return written


def save_model_folder(model: Transformer, folder: str | Path, **options: Any) -> list[Path]:
    """Save a Transformer as an HF-Llama-compatible folder; `options` as for save_state_dict_folder
    (dtype=None keeps the model's). Returns the files written. A model with QuantizedLinear layers
    is written in compressed-tensors' pack-quantized format (with `quantization_config`, see
    quantize.quantization_config, in options)."""
    layers = quantized_modules(model)
    if not layers:
        return save_state_dict_folder(model.state_dict(), model.config, folder, **options)
    assert "quantization_config" in options, "a quantized model is saved with its quantization_config"
    dtype = options.get("dtype") or model.model.embed_tokens.weight.dtype
    tensors = {
        name: t
        for name, t in model.state_dict().items()
        if name.rpartition(".")[0] not in layers  # codes/scale/zero: written packed below
    }
    for prefix, layer in layers.items():
        tensors.update(packed_tensors(prefix, layer, dtype))
    return save_state_dict_folder(tensors, model.config, folder, **{**options, "dtype": dtype})


def read_json(path: Path) -> dict:
    """Parse a JSON file; InputError naming the file (and line) if it is missing or corrupt."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: file not found", hint="is this a model folder?") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None


def read_model_config(folder: str | Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, raw config.json dict) of a model folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(
            f"{folder}: model folder not found", hint="pass a folder with config.json and *.safetensors"
        )
    raw = read_json(folder / CONFIG_FILE)
    return ModelConfig.from_hf_config(raw, source=str(folder / CONFIG_FILE)), raw


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder (from the index when sharded); InputError if none."""
    index = folder / WEIGHTS_INDEX_FILE
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise InputError(f"{index}: no 'weight_map' object")
        files = [folder / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise InputError(f"{index}: lists missing shard(s): {', '.join(missing)}")
        return files
    if (folder / WEIGHTS_FILE).exists():
        return [folder / WEIGHTS_FILE]
    raise InputError(
        f"{folder}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}",
        hint="the folder must hold safetensors weights (`llmctl import` converts other formats)",
    )


def load_safetensors(files: list[Path], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of the given safetensors files; InputError naming a corrupt file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(f, device=str(device)))
        except (SafetensorError, OSError) as e:
            raise InputError(
                f"{f}: cannot read safetensors file: {e}", hint="the file is corrupt or truncated"
            ) from None
    return tensors


# nn.Linear and nn.Embedding initialise their weights when built; on the meta device those calls run
# torch's Python reference kernels, and the first of them imports torch._dynamo: ~1.5-2 s of every
# command that loads a model, for values that the loaded weights replace anyway. The patch is
# process-wide for the few milliseconds of the build (as accelerate's init_empty_weights is).
_INITIALISERS = (
    "kaiming_uniform_",
    "uniform_",
    "normal_",
    "trunc_normal_",
    "xavier_uniform_",
    "zeros_",
    "ones_",
)


@contextmanager
def _without_weight_init() -> Iterator[None]:
    saved = {name: getattr(nn.init, name) for name in _INITIALISERS}
    try:
        for name in _INITIALISERS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def model_from_state_dict(
    cfg: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    source: str = "checkpoint",
    quantized: dict[str, nn.Module] | None = None,
) -> Transformer:
    """Build a Transformer from HF-named tensors without a random init (meta device + assign).
    `quantized` maps module names to the layers that replace them (their tensors are not in
    state_dict)."""
    quantized = quantized or {}
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        state_dict.pop("lm_head.weight", None)
    with torch.device("meta"), _without_weight_init():
        model = Transformer(cfg)
    expected = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in quantized}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} e.g. {', '.join(unexpected[:3])}")
        raise InputError(f"{source}: weights do not match config.json: " + "; ".join(parts))
    for name, t in expected.items():
        if tuple(state_dict[name].shape) != tuple(t.shape):
            raise InputError(
                f"{source}: tensor {name} has shape {tuple(state_dict[name].shape)}, config.json implies {tuple(t.shape)}"
            )
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    state_dict = {k: v.to(device) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=False, assign=True)
    if cfg.tie_embeddings and "lm_head" not in quantized:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_rope_buffers(device)
    for name, layer in quantized.items():
        replace_module(model, name, layer.to(device))
    if "lm_head" in quantized:  # reset_rope_buffers took the dtype of the meta lm_head
        embed = model.model.embed_tokens.weight
        model.rope_cos, model.rope_sin = model.rope_cos.to(embed.dtype), model.rope_sin.to(embed.dtype)
    return model


def quantized_layers(
    qconfig: Any, tensors: dict[str, torch.Tensor], source: str
) -> dict[str, QuantizedLinear]:
    """The QuantizedLinear layers of a compressed-tensors pack-quantized folder (their tensors are
    taken out of `tensors`); InputError for a quantization this loader does not run."""
    groups = qconfig.get("config_groups") if isinstance(qconfig, dict) else None
    supported = (
        isinstance(qconfig, dict)
        and qconfig.get("quant_method") == "compressed-tensors"
        and qconfig.get("format") == "pack-quantized"
        and isinstance(groups, dict)
        and len(groups) == 1
    )
    group = next(iter(groups.values())) if supported else {}
    if not supported or group.get("input_activations") or not group.get("weights"):
        raise InputError(
            f"{source}: quantization_config is not one llmctl runs "
            f"(method {qconfig.get('quant_method') if isinstance(qconfig, dict) else qconfig!r})",
            hint="llmctl loads compressed-tensors pack-quantized int4/int8 weight-only models "
            "(what `llmctl quantize` writes); dequantize others with transformers first",
        )
    try:
        scheme = scheme_from_config(group["weights"], source)
    except ValueError as e:
        raise InputError(str(e)) from None
    prefixes = [k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed")]
    return {p: layer_from_tensors(tensors, p, scheme) for p in sorted(prefixes)}


def load_model_folder(
    folder: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[Transformer, ModelConfig]:
    """Load a model folder; dtype=None keeps the stored dtype. Returns (model in eval mode, config)."""
    folder = Path(folder)
    cfg, raw = read_model_config(folder)
    tensors = load_safetensors(weight_files(folder))
    quantized = None
    if is_quantized_config(raw):
        quantized = quantized_layers(raw["quantization_config"], tensors, str(folder / CONFIG_FILE))
    model = model_from_state_dict(
        cfg, tensors, device=device, dtype=dtype, source=str(folder), quantized=quantized
    )
    return model.eval(), cfg
