"""The `quantize:` section of llmctl.yaml: how to shrink a model, and how its quality is re-checked.

quantize:
  method: gptq              # rtn (round to nearest) or gptq (calibrated)
  bits: 4
  group_size: 128
  calibration: {samples: 128, seq_len: 512}
  tasks: [perplexity, world_mc]
  max_ppl_increase: 3.0     # percent: exit 1 above it
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from llmctl.config.base import Section


class CalibrationConfig(Section):
    """The sequences GPTQ measures each layer's inputs on."""

    path: str | None = Field(
        default=None,
        description="A UTF-8 text file (relative to the project folder), encoded with the model's tokenizer "
        "and cut into seq_len windows; unset: the train split of the tokens artifact (--data).",
    )
    samples: int = Field(default=128, ge=1, description="Calibration sequences (GPTQ's default is 128).")
    seq_len: int = Field(default=512, ge=8, description="Tokens per calibration sequence.")
    damp: float = Field(
        default=0.01, gt=0, description="Hessian dampening, as a fraction of its mean diagonal (GPTQ's 0.01)."
    )


class QuantizeConfig(Section):
    """How `llmctl quantize` quantizes a model and what it scores before and after."""

    method: Literal["rtn", "gptq"] = Field(
        default="rtn",
        description="rtn: round each weight to nearest (no data); gptq: quantize columns in order, each "
        "one's rounding error compensated on the rest through calibration inputs (Frantar et al. 2022).",
    )
    bits: Literal[4, 8] = Field(
        default=8,
        description="8: int8, one scale per output channel (symmetric); 4: int4, one scale per group_size "
        "input columns.",
    )
    group_size: Literal[32, 64, 128] = Field(
        default=128, description="int4 only: input columns per scale. Must divide every layer's input width."
    )
    symmetric: bool = Field(
        default=True,
        description="int4 only: false adds a zero point per group (range [min, max] instead of [-amax, amax]).",
    )
    lm_head: bool | None = Field(
        default=None,
        description="Also quantize the output projection (untied from the embeddings when they are tied); "
        "the embeddings always keep the source precision (decode reads one row of them per token). "
        "null: yes with bits 8, no with bits 4. Measured on SmolLM2-135M: int8 on it cost nothing "
        "(+0.10% perplexity, +0.12% without), decoded 1.51x fp32 instead of 1.36x and left the decoder "
        "an int8 copy of it instead of an fp32 one; int4 on it added 18 points of perplexity.",
    )
    calibration: CalibrationConfig = Field(
        default_factory=CalibrationConfig, description="Calibration data (gptq only)."
    )
    format: Literal["compressed-tensors", "gguf"] = Field(
        default="compressed-tensors",
        description="compressed-tensors: an HF model folder (config.json quantization_config, pack-quantized) "
        "that llmctl, transformers and vLLM load; gguf: one GGUF file for llama.cpp (`gguf_type`).",
    )
    gguf_type: str = Field(
        default="q8_0",
        description="GGUF tensor type with format gguf: f16, q8_0, q4_0 (K-quants if available).",
    )
    tasks: list[str] = Field(
        default_factory=lambda: ["perplexity"],
        description="Eval tasks scored on the source and the quantized model (names as in eval.tasks); the "
        "deltas land in the manifest. perplexity uses the tokens artifact's val split or `text`.",
    )
    text: str | None = Field(
        default=None,
        description="A UTF-8 text file (relative to the project folder) for perplexity instead of the tokens "
        "artifact's val split.",
    )
    limit: int | None = Field(
        default=None, ge=1, description="Score at most this many items per task (perplexity: val windows)."
    )
    max_ppl_increase: float | None = Field(
        default=None,
        ge=0,
        description="Gate: `llmctl quantize` exits 1 when perplexity rises by more than this many percent.",
    )
    min: dict[str, float] = Field(
        default_factory=dict,
        description="Gate: minimum scores of the quantized model, as eval's --min (e.g. {world_mc: 0.4}).",
    )
    speed_tokens: int = Field(
        default=16,
        ge=0,
        description="Tokens decoded (batch 1 and 8, greedy) to measure tokens/s before and after; 0: skip.",
    )
    threads: int | None = Field(
        default=None, ge=1, description="Torch threads (default: the cores this process may use)."
    )
    model: str | None = Field(
        default=None,
        description="Model to quantize (e.g. 'sft:latest'); null = the newest model in pipeline order.",
    )

    @property
    def quantize_lm_head(self) -> bool:
        """lm_head as set, or by default with int8 only (see its description)."""
        return self.lm_head if self.lm_head is not None else self.bits == 8

    @model_validator(mode="after")
    def _int8_is_per_channel(self) -> QuantizeConfig:
        if self.bits == 8 and not self.symmetric:
            raise ValueError("int8 is symmetric per output channel: symmetric must be true with bits 8")
        return self
