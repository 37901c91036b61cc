"""Import existing checkpoints into an llmctl model folder (HF-Llama layout, see checkpoint.py).

Three sources, one entry point:
- a local Hugging Face folder of the Llama family (llama, mistral, qwen2, qwen3; SmolLM is llama):
  safetensors (single or sharded; always preferred) or pytorch_model.bin (loaded with
  `weights_only=True`, and only with a torch where that cannot be bypassed: `SAFE_PICKLE_TORCH`);
- a hub repo id (`org/name`), fetched with `huggingface_hub.snapshot_download` into the HF cache;
- a GGUF file (llama.cpp), dequantised to float32 with the `gguf` package; its tokenizer is
  rebuilt from the GGUF metadata by transformers (needed only for this path).

    result = import_model("HuggingFaceTB/SmolLM2-135M", Path("run/model"), reporter)
    result.as_dict()   # kind, source, revision or sha256, architecture: for the artifact manifest
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from llmctl.errors import InputError
from llmctl.model.checkpoint import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    TOKENIZER_FILES,
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
    load_safetensors,
    model_from_state_dict,
    read_json,
    read_model_config,
    save_model_folder,
    weight_files,
)
from llmctl.model.config import ModelConfig
from llmctl.model.hf_tokenizer import CHAT_TEMPLATE_DIR
from llmctl.reporting import Reporter

SourceKind = Literal["folder", "hub", "gguf"]
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a hub download fetches: configs, safetensors weights, tokenizer files.
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


@dataclass(frozen=True)
class ImportResult:
    """Where an imported model came from (for the manifest) and what it is."""

    kind: SourceKind
    source: str
    architecture: str  # the source's model_type / GGUF general.architecture
    config: ModelConfig
    out_dir: Path
    revision: str | None = None  # hub commit sha
    sha256: str | None = None  # GGUF file hash
    files: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "source": self.source,
            "architecture": self.architecture,
            "revision": self.revision,
            "sha256": self.sha256,
            "files": list(self.files),
        }


def import_model(
    source: str | Path,
    out_dir: str | Path,
    reporter: Reporter | None = None,
    *,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
) -> ImportResult:
    """Convert `source` (HF folder, hub repo id, or .gguf file) into a complete model folder at out_dir.

    dtype=None keeps the source's dtype (float32 for GGUF, which is dequantised).
    """
    reporter = reporter or Reporter()
    out_dir = Path(out_dir)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _import_gguf(path, out_dir, reporter, dtype=dtype)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / CONFIG_FILE).exists() and len(ggufs) == 1:
            return _import_gguf(ggufs[0], out_dir, reporter, dtype=dtype)
        return _import_folder(path, out_dir, reporter, kind="folder", source=str(path), dtype=dtype)
    if path.exists():
        raise InputError(f"{path}: not a model folder or a .gguf file")
    if _REPO_ID.match(str(source)):
        folder, commit = _download(str(source), revision, reporter)
        return _import_folder(
            folder, out_dir, reporter, kind="hub", source=str(source), dtype=dtype, revision=commit
        )
    raise InputError(
        f"{source}: no such file or folder, and not a hub repo id (org/name)",
        hint="pass a local HF model folder, a .gguf file, or a hub id like HuggingFaceTB/SmolLM2-135M",
    )


# ---- hub ---------------------------------------------------------------------------------------


def _download(repo_id: str, revision: str | None, reporter: Reporter) -> tuple[Path, str | None]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    reporter.log(f"fetching {repo_id}{'@' + revision if revision else ''} from the Hugging Face hub (cached)")
    manual = "download it where the hub is reachable (`hf download <repo> --local-dir DIR`) and import DIR"
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise InputError(
            f"{repo_id}: not in the local Hugging Face cache and the hub is offline or unreachable",
            hint=f"unset HF_HUB_OFFLINE / check the network, or {manual}",
        ) from None
    except GatedRepoError:
        raise InputError(
            f"{repo_id}: gated repository", hint="accept its license on the hub and `hf auth login`"
        ) from None
    except RevisionNotFoundError:
        raise InputError(f"{repo_id}: revision {revision!r} not found") from None
    except RepositoryNotFoundError:
        raise InputError(
            f"{repo_id}: repository not found on the hub", hint="check the id (private? `hf auth login`)"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise InputError(f"{repo_id}: download failed: {e}", hint=manual) from None
    # snapshot folders are named by commit sha: record it for reproducibility.
    commit = folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else revision
    return folder, commit


# ---- HF folders --------------------------------------------------------------------------------

# torch.load(weights_only=True) of a crafted pickle runs code in older torch: CVE-2025-32434 (fixed
# in 2.6.0) and CVE-2026-24747 (GHSA-63cw-57p8-fm3p: <= 2.9.1 affected, fixed in 2.10.0).
SAFE_PICKLE_TORCH = "2.10.0"


def require_safe_pickle_loading(path: Path) -> None:
    """InputError unless this torch can load a pickled checkpoint without running code hidden in it."""
    from torch.torch_version import TorchVersion

    if TorchVersion(torch.__version__) < SAFE_PICKLE_TORCH:
        raise InputError(
            f"{path}: refusing a pickled PyTorch checkpoint with torch {torch.__version__}: a crafted file can "
            f"run code even with weights_only=True before torch {SAFE_PICKLE_TORCH} "
            "(CVE-2025-32434, CVE-2026-24747)",
            hint=f"upgrade torch (pip install -U 'torch>={SAFE_PICKLE_TORCH}'), or use the model's "
            "safetensors weights (model.safetensors)",
        )


def _read_folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / WEIGHTS_INDEX_FILE).exists() or (folder / WEIGHTS_FILE).exists():
        return load_safetensors(weight_files(folder))
    bins = [folder / "pytorch_model.bin"]
    if (folder / "pytorch_model.bin.index.json").exists():
        weight_map = read_json(folder / "pytorch_model.bin.index.json").get("weight_map", {})
        bins = [folder / f for f in sorted(set(weight_map.values()))]
    if not all(b.exists() for b in bins):
        raise InputError(
            f"{folder}: no model.safetensors, sharded safetensors or pytorch_model.bin found",
            hint="the folder needs weights next to config.json",
        )
    require_safe_pickle_loading(bins[0])
    tensors: dict[str, torch.Tensor] = {}
    for b in bins:
        try:
            tensors.update(torch.load(b, map_location="cpu", weights_only=True))
        except Exception as e:  # torch raises a zoo of types for bad pickles/zips
            raise InputError(f"{b}: cannot read PyTorch weights: {e}") from None
    return tensors


def _import_folder(
    folder: Path,
    out_dir: Path,
    reporter: Reporter,
    *,
    kind: SourceKind,
    source: str,
    dtype: torch.dtype | None,
    revision: str | None = None,
) -> ImportResult:
    cfg, raw = read_model_config(folder)  # rejects unsupported architectures, listing the supported ones
    reporter.log(
        f"importing {raw['model_type']} model: {cfg.n_layer} layers, {cfg.n_embd} wide, vocab {cfg.vocab_size}"
    )
    tensors = _read_folder_weights(folder)
    model = model_from_state_dict(cfg, tensors, dtype=dtype, source=str(folder))
    files = save_model_folder(
        model,
        out_dir,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
    )
    copied = _copy_side_files(folder, out_dir)
    return ImportResult(
        kind=kind,
        source=source,
        architecture=raw["model_type"],
        config=cfg,
        out_dir=out_dir,
        revision=revision,
        files=tuple(sorted({p.name for p in files} | set(copied))),
    )


def _copy_side_files(folder: Path, out_dir: Path) -> list[str]:
    """Tokenizer files and the source's generation defaults travel with the weights."""
    copied = []
    for name in (*TOKENIZER_FILES, GENERATION_CONFIG_FILE):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out_dir / name)
            copied.append(name)
    named_templates = folder / CHAT_TEMPLATE_DIR
    if named_templates.is_dir():
        (out_dir / CHAT_TEMPLATE_DIR).mkdir(exist_ok=True)
        for path in sorted(named_templates.glob("*.jinja")):
            shutil.copyfile(path, out_dir / CHAT_TEMPLATE_DIR / path.name)
            copied.append(f"{CHAT_TEMPLATE_DIR}/{path.name}")
    return copied


# ---- GGUF --------------------------------------------------------------------------------------

# llama.cpp tensor names -> HF names ({} is the layer index).
_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "attn_q.bias": "model.layers.{}.self_attn.q_proj.bias",
    "attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "attn_k.bias": "model.layers.{}.self_attn.k_proj.bias",
    "attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "attn_v.bias": "model.layers.{}.self_attn.v_proj.bias",
    "attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "attn_q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "attn_k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
    "ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation for rope (convert_hf_to_gguf.py LlamaModel.permute):
    GGUF stores each head's rows interleaved (pairs), HF stores them as two halves. Same as
    transformers' LlamaTensorProcessor._reverse_permute_weights."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(reader: Any, path: Path) -> tuple[str, ModelConfig]:
    """(architecture, ModelConfig) from GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise InputError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )
    rope_scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    names = {t.name for t in reader.tensors}
    if rope_scaling not in ("none", None) or "rope_freqs.weight" in names:
        raise InputError(f"{path}: rope scaling ({rope_scaling}) is not supported yet")
    try:
        n_embd = int(_field(reader, f"{arch}.embedding_length"))
        n_head = int(_field(reader, f"{arch}.attention.head_count"))
        vocab = _field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
        cfg = ModelConfig(
            vocab_size=int(vocab),
            n_layer=int(_field(reader, f"{arch}.block_count")),
            n_head=n_head,
            n_kv_head=int(_field(reader, f"{arch}.attention.head_count_kv", n_head)),
            n_embd=n_embd,
            intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
            max_seq_len=int(_field(reader, f"{arch}.context_length", 2048)),
            head_dim=int(_field(reader, f"{arch}.attention.key_length", n_embd // n_head)),
            rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
            norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            tie_embeddings="output.weight" not in names,
            qk_norm=arch == "qwen3",
            attention_bias="blk.0.attn_q.bias" in names,
        )
    except (TypeError, KeyError) as e:
        raise InputError(f"{path}: GGUF metadata incomplete ({e})") from None
    return arch, cfg


def _import_gguf(path: Path, out_dir: Path, reporter: Reporter, *, dtype: torch.dtype | None) -> ImportResult:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/struct errors on bad files
        raise InputError(f"{path}: not a readable GGUF file: {e}") from None
    arch, cfg = gguf_config(reader, path)
    reporter.log(f"importing GGUF {arch}: {cfg.n_layer} layers, {cfg.n_embd} wide, vocab {cfg.vocab_size}")
    tensors: dict[str, torch.Tensor] = {}
    with reporter.progress("dequantise", total=len(reader.tensors), unit="tensors") as bar:
        for t in reader.tensors:
            parts = t.name.split(".")
            if parts[0] == "blk":
                key, layer = ".".join(parts[2:]), parts[1]
            else:
                key, layer = t.name, None
            if key not in _GGUF_NAMES:
                raise InputError(f"{path}: unexpected GGUF tensor {t.name}")
            w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())  # (out, in), float32
            # llama.cpp permutes q/k only for the llama architecture (not qwen2/qwen3).
            if arch == "llama" and key == "attn_q.weight":
                w = unpermute_rope(w, cfg.n_head)
            elif arch == "llama" and key == "attn_k.weight":
                w = unpermute_rope(w, cfg.n_kv_head)
            tensors[_GGUF_NAMES[key].format(layer)] = w.to(dtype) if dtype is not None else w
            bar.advance(1)
    model = model_from_state_dict(cfg, tensors, source=str(path))

    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    files = save_model_folder(model, out_dir, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    tok_files = _gguf_tokenizer(path, out_dir, add_bos=_field(reader, "tokenizer.ggml.add_bos_token"))
    return ImportResult(
        kind="gguf",
        source=str(path),
        architecture=arch,
        config=cfg,
        out_dir=out_dir,
        sha256=_sha256(path),
        files=tuple(sorted({p.name for p in files} | set(tok_files))),
    )


def _gguf_tokenizer(path: Path, out_dir: Path, *, add_bos: bool | None = None) -> list[str]:
    """Rebuild the tokenizer from GGUF metadata with transformers and save it beside the weights,
    with the file's `add_bos_token` (transformers 5 does not save it: prompts would lose their BOS)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise InputError(
            f"{path}: converting a GGUF tokenizer needs the transformers package",
            hint="pip install 'llmctl[hf]' (or transformers), then re-run the import",
        ) from None
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # transformers raises many types for unsupported tokenizers
        raise InputError(f"{path}: cannot convert the GGUF tokenizer: {e}") from None
    saved = tok.save_pretrained(out_dir)
    config_file = Path(out_dir) / "tokenizer_config.json"
    if add_bos is not None and config_file.is_file():
        config = json.loads(config_file.read_text())
        config["add_bos_token"] = bool(add_bos)
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return sorted({Path(p).name for p in saved if Path(p).exists()})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
