"""Model shape: the `ModelConfig` dataclass, named presets, the depth dial, and param/FLOP accounting.

Everything about a model's *shape* lives here and nowhere else; the transformer, checkpoint I/O and
the HF/GGUF importers all read it. It deliberately imports no llmctl config code: a stage turns its
`model:` section into a `ModelConfig` with `preset(...)` or `from_depth(...)`.

    cfg = preset("tiny", vocab_size=tokenizer.get_vocab_size())
    cfg = from_depth(12, vocab_size=50304)          # nanochat-style single dial
    num_params(cfg), flops_per_token(cfg, cfg.max_seq_len), suggested_lr(cfg), token_budget(cfg)
    hf = cfg.to_hf_config(); ModelConfig.from_hf_config(hf) == cfg

Conversion to/from a Hugging Face `config.json` dict maps onto the Llama family: plain models export
as `llama`; q/k/v biases (Qwen2-style) export as `qwen2`; per-head QK-norm exports as `qwen3`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from llmctl.errors import InputError

# Architectures `from_hf_config` understands; all are the Llama block with small switches.
SUPPORTED_HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Long-context rotary variants (HF `rope_type`); all are fixed changes of the rotary frequencies.
SCALED_ROPE_TYPES = ("linear", "llama3", "yarn")
SUPPORTED_ROPE_TYPES = ("default", *SCALED_ROPE_TYPES)


@dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling for contexts beyond the pretraining length, as HF computes it
    (transformers' modeling_rope_utils; the fields keep HF's names and defaults).

    - linear (Chen et al. 2023, position interpolation): every frequency / factor.
    - llama3 (Llama 3.1+): low frequencies / factor, high ones kept, a smooth ramp between, set
      by low/high_freq_factor relative to original_max_position_embeddings.
    - yarn (Peng et al. 2023, https://arxiv.org/abs/2309.00071): a ramp over dimensions between
      beta_fast and beta_slow rotations, and cos/sin times attention_factor
      (default 0.1 ln(factor) + 1).
    """

    rope_type: str
    factor: float
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.rope_type not in SCALED_ROPE_TYPES:
            raise ValueError(
                f"rope type {self.rope_type!r} is not supported; supported: "
                + ", ".join(SUPPORTED_ROPE_TYPES)
            )
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be > 0 (got {self.factor})")
        if self.rope_type in ("llama3", "yarn") and not self.original_max_position_embeddings:
            raise ValueError(f"{self.rope_type} rope scaling needs original_max_position_embeddings")

    def to_hf(self) -> dict[str, Any]:
        """The HF `rope_parameters` / `rope_scaling` fields of this scaling (without rope_theta)."""
        d: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "llama3":
            d.update(
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        elif self.rope_type == "yarn":
            d.update(
                beta_fast=self.beta_fast,
                beta_slow=self.beta_slow,
                original_max_position_embeddings=self.original_max_position_embeddings,
                truncate=self.truncate,
            )
            if self.attention_factor is not None:
                d["attention_factor"] = self.attention_factor
        return d

    @classmethod
    def from_hf(cls, params: dict[str, Any], max_position_embeddings: int) -> RopeScaling | None:
        """Read HF `rope_parameters` (transformers >= 5) or `rope_scaling` (older); None for default."""
        rope_type = params.get("rope_type") or params.get("type") or "default"
        if rope_type == "default":
            return None
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope type {rope_type!r} is not supported; supported: " + ", ".join(SUPPORTED_ROPE_TYPES)
            )
        if rope_type == "yarn" and (params.get("mscale") or params.get("mscale_all_dim")):
            raise ValueError("yarn rope scaling with mscale/mscale_all_dim (DeepSeek) is not supported")
        factor = params.get("factor")
        original = params.get("original_max_position_embeddings")
        if factor is None and rope_type == "yarn" and original:
            factor = max_position_embeddings / original  # HF's rule for a yarn config without factor
        known = {f.name for f in dataclasses.fields(cls)}
        pick = {k: v for k, v in params.items() if k in known and v is not None}
        pick.update(rope_type=rope_type, factor=float(factor) if factor is not None else 0.0)
        if rope_type == "yarn":
            # HF: `beta_fast or 32`, so a 0 means the default too.
            pick["beta_fast"] = float(params.get("beta_fast") or 32)
            pick["beta_slow"] = float(params.get("beta_slow") or 1)
        if rope_type == "llama3" and "original_max_position_embeddings" not in pick:
            pick["original_max_position_embeddings"] = max_position_embeddings
        return cls(**pick)


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only Llama-style transformer (names follow the papers / nanoGPT).

    `head_dim` defaults to n_embd // n_head; set it explicitly only for models that decouple them
    (Qwen3, some Mistral variants). `attention_bias` adds biases to q/k/v (not o), as Qwen2 does.
    """

    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = 12
    n_embd: int = 768
    intermediate_size: int = 2048
    max_seq_len: int = 1024
    head_dim: int = 0  # 0 = n_embd // n_head (filled in by __post_init__)
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qk_norm: bool = False
    attention_bias: bool = False
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.n_embd // self.n_head)
        problems = []
        for name in (
            "vocab_size",
            "n_layer",
            "n_head",
            "n_kv_head",
            "n_embd",
            "intermediate_size",
            "max_seq_len",
        ):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0 (got {getattr(self, name)})")
        if self.n_head > 0 and self.n_kv_head > 0 and self.n_head % self.n_kv_head:
            problems.append(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2:
            problems.append(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if problems:
            # ValueError, not a user error type: configs come from code or from validated files whose
            # loaders wrap this with the file/key context.
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (re-derives head_dim unless given)."""
        if "head_dim" not in changes and ("n_embd" in changes or "n_head" in changes):
            changes["head_dim"] = 0
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json ------------------------------------------------------------
    def hf_model_type(self) -> str:
        """Which HF architecture this shape is exactly expressible as."""
        if self.qk_norm and self.attention_bias:
            raise ValueError("no HF architecture has both QK-norm and q/k/v-only biases; pick one")
        if self.qk_norm:
            return "qwen3"
        if self.attention_bias:
            return "qwen2"
        return "llama"

    def to_hf_config(self) -> dict[str, Any]:
        """An HF `config.json` dict (Llama family) that transformers loads with AutoModelForCausalLM."""
        model_type = self.hf_model_type()
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        d: dict[str, Any] = {
            "architectures": [arch[model_type]],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.n_embd,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_seq_len,
            "initializer_range": self.init_std,
            "rms_norm_eps": self.norm_eps,
            # Both spellings: transformers<5 reads rope_theta/rope_scaling, >=5 rope_parameters.
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_embeddings,
            "attention_dropout": 0.0,
            "use_cache": True,
        }
        if model_type == "llama":
            d.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
        elif model_type == "qwen2":
            d.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.n_layer)
        else:
            d.update(attention_bias=False, use_sliding_window=False, sliding_window=None)
        if self.rope_scaling is not None:
            d["rope_scaling"] = self.rope_scaling.to_hf()
            d["rope_parameters"] = {**self.rope_scaling.to_hf(), "rope_theta": self.rope_theta}
        return d

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        """Read an HF `config.json` dict of a supported Llama-family model; InputError otherwise."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_HF_MODEL_TYPES:
            raise InputError(
                f"{source}: model_type {model_type!r} is not supported; supported: "
                + ", ".join(SUPPORTED_HF_MODEL_TYPES),
                hint="llmctl imports Llama-family checkpoints (Llama, Mistral, Qwen2/3, SmolLM)",
            )
        try:
            act = hf.get("hidden_act", "silu")
            if act not in ("silu", "swish"):
                raise InputError(f"{source}: hidden_act {act!r} is not supported (only silu)")
            rope = hf.get("rope_parameters") or {}
            scaling_fields = rope if rope.get("rope_type", "default") != "default" else hf.get("rope_scaling")
            rope_scaling = RopeScaling.from_hf(
                scaling_fields or {}, int(hf.get("max_position_embeddings", 2048))
            )
            if hf.get("mlp_bias") or (model_type == "llama" and hf.get("attention_bias")):
                raise InputError(f"{source}: llama with attention_bias/mlp_bias is not supported")
            n_embd = int(hf["hidden_size"])
            n_head = int(hf["num_attention_heads"])
            max_seq_len = int(hf.get("max_position_embeddings", 2048))
            # Mistral's sliding window changes attention only beyond the window; capping the context
            # at the window keeps our full attention exact.
            window = hf.get("sliding_window")
            if model_type == "mistral" and window:
                max_seq_len = min(max_seq_len, int(window))
            if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window") and window:
                max_seq_len = min(max_seq_len, int(window))
            return cls(
                vocab_size=int(hf["vocab_size"]),
                n_layer=int(hf["num_hidden_layers"]),
                n_head=n_head,
                n_kv_head=int(hf.get("num_key_value_heads") or n_head),
                n_embd=n_embd,
                intermediate_size=int(hf["intermediate_size"]),
                max_seq_len=max_seq_len,
                head_dim=int(hf.get("head_dim") or n_embd // n_head),
                rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                rope_scaling=rope_scaling,
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", model_type != "mistral")),
                qk_norm=model_type == "qwen3",
                attention_bias=model_type == "qwen2"
                or (model_type == "qwen3" and bool(hf.get("attention_bias"))),
                init_std=float(hf.get("initializer_range", 0.02)),
            )
        except KeyError as e:
            raise InputError(
                f"{source}: missing key {e.args[0]!r}", hint="is this a complete HF config.json?"
            ) from None
        except (TypeError, ValueError) as e:
            raise InputError(f"{source}: invalid value: {e}") from None


# ---- presets and the depth dial ------------------------------------------------------------------


def swiglu_hidden(n_embd: int, multiple_of: int | None = None) -> int:
    """SwiGLU width: 8/3 * n_embd (same FLOPs as a 4x GELU MLP, Shazeer 2020), rounded up for matmul speed.

    By default to a multiple of 32 below n_embd 1024 and of 64 from there: at small widths 64
    overshoots the FLOP parity a lot (n_embd 128: 341 -> 384 is +12.5% MLP FLOPs, 352 is +3%, and
    measured ~5% of a CPU training step), while at large widths 64 costs under 2.5%.
    """
    if multiple_of is None:
        multiple_of = 32 if n_embd < 1024 else 64
    return multiple_of * math.ceil(8 * n_embd / 3 / multiple_of)


_PRESETS: dict[str, dict[str, Any]] = {
    # ~1M params at vocab 4096: unit tests and smoke runs.
    "test-1m": dict(
        vocab_size=4096, n_layer=2, n_head=4, n_kv_head=2, n_embd=128, intermediate_size=384, max_seq_len=256
    ),
    # The tiny CPU template: ~4M params at vocab 8192, trains in minutes on 2 cores.
    "tiny": dict(
        vocab_size=8192, n_layer=4, n_head=4, n_kv_head=4, n_embd=256, intermediate_size=704, max_seq_len=512
    ),
    # GPT-2 small class (124M at vocab 50304): 12L / 768 / 12 heads, T=1024.
    "gpt2-small": dict(
        vocab_size=50304,
        n_layer=12,
        n_head=12,
        n_kv_head=12,
        n_embd=768,
        intermediate_size=2048,
        max_seq_len=1024,
    ),
    # GPT-3 Medium / Pythia-410m class (~360M at vocab 50304).
    "350m": dict(
        vocab_size=50304,
        n_layer=24,
        n_head=16,
        n_kv_head=16,
        n_embd=1024,
        intermediate_size=2816,
        max_seq_len=2048,
    ),
    # TinyLlama-1.1B shape (~1.07B at vocab 50304, untied): 22L / 2048 / 32 heads, 4 KV heads.
    "1b": dict(
        vocab_size=50304,
        n_layer=22,
        n_head=32,
        n_kv_head=4,
        n_embd=2048,
        intermediate_size=5632,
        max_seq_len=2048,
        tie_embeddings=False,
    ),
}
PRESETS = tuple(_PRESETS)


def preset(name: str, *, vocab_size: int | None = None, **overrides: Any) -> ModelConfig:
    """A named preset (see PRESETS); vocab_size comes from the tokenizer, other fields may be overridden."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    fields = dict(_PRESETS[name])
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    fields.update(overrides)
    return ModelConfig(**fields)


def from_depth(depth: int, vocab_size: int, *, max_seq_len: int = 2048, **overrides: Any) -> ModelConfig:
    """One dial (nanochat): everything follows from the number of layers.

    - n_embd = 64 * depth (aspect ratio 64, nanochat; GPT-2 small is depth 12 -> 768).
    - head_dim = 128 once n_embd >= 1024 (fewer, wider heads are faster on GPUs), else 64, so small
      models still get several heads; n_head = n_embd // head_dim.
    - n_kv_head = n_head (plain MHA: GQA saves KV memory at inference, which small models do not need).
    - intermediate_size = swiglu_hidden(n_embd) = 8/3 * n_embd rounded up to 32 (64 from n_embd 1024).
    - tied embeddings below n_embd 1024 (they are a large share of a small model's parameters).
    See `suggested_lr` and `token_budget` for the training side of the dial.
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1 (got {depth})")
    n_embd = 64 * depth
    head_dim = 128 if n_embd >= 1024 else 64
    n_head = max(1, n_embd // head_dim)
    fields: dict[str, Any] = dict(
        vocab_size=vocab_size,
        n_layer=depth,
        n_head=n_head,
        n_kv_head=n_head,
        n_embd=n_embd,
        head_dim=head_dim,
        intermediate_size=swiglu_hidden(n_embd),
        max_seq_len=max_seq_len,
        tie_embeddings=n_embd < 1024,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


# ---- accounting ----------------------------------------------------------------------------------


def num_params(cfg: ModelConfig, *, non_embedding: bool = False) -> int:
    """Parameter count (tied matrices counted once). `non_embedding` drops the token embedding and
    the output head (Kaplan et al. 2020's N)."""
    d, hd = cfg.n_embd, cfg.head_dim
    q, kv = cfg.n_head * hd, cfg.n_kv_head * hd
    attn = d * q + 2 * d * kv + q * d
    if cfg.attention_bias:
        attn += q + 2 * kv
    if cfg.qk_norm:
        attn += 2 * hd
    mlp = 3 * d * cfg.intermediate_size
    per_layer = attn + mlp + 2 * d  # + two RMSNorm weights
    body = cfg.n_layer * per_layer + d  # + final norm
    if non_embedding:
        return body
    vocab = cfg.vocab_size * d
    return body + vocab * (1 if cfg.tie_embeddings else 2)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) = 6N + 12 * n_layer * (n_head*head_dim) * seq_len.

    N counts every matmul weight, including the output head but not the embedding lookup (which is
    a gather); the second term is attention scores and values (PaLM appendix B; nanoGPT's MFU).
    Used for MFU: achieved_flops = flops_per_token * tokens_per_second.
    """
    n = num_params(cfg, non_embedding=True) + cfg.vocab_size * cfg.n_embd
    return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len


def suggested_lr(cfg: ModelConfig) -> float:
    """Peak AdamW learning rate: 6e-4 * 768 / n_embd, clipped to [1e-4, 3e-3].

    GPT-3's table (Brown et al. 2020, Table 2.1) falls roughly as 1/width: 768 -> 6e-4,
    2048 -> 2e-4, 4096 -> 1.2e-4; small CPU models tolerate the higher end (tiny: ~1.8e-3).
    """
    return float(min(3e-3, max(1e-4, 6e-4 * 768 / cfg.n_embd)))


def token_budget(cfg: ModelConfig, tokens_per_param: float = 20.0) -> int:
    """Compute-optimal training tokens: ~20 tokens per parameter (Hoffmann et al. 2022, Chinchilla)."""
    return int(tokens_per_param * num_params(cfg))
