"""The `dpo:` section of llmctl.yaml: preference optimisation on (prompt, chosen, rejected) pairs.

    dpo:
      data:
        sources:
          - path: data/preferences.jsonl
          - path: hf://datasets/HuggingFaceH4/ultrafeedback_binarized
            split: train_prefs
      loss: sigmoid          # sigmoid (DPO; cDPO with label_smoothing), robust, ipo, simpo
      beta: 0.1

The reference model is the starting model: its log-probs of every pair are computed once before
training and kept in the run folder (llmctl.train.preference). SimPO needs none.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from llmctl.config.preference import PreferenceDataConfig
from llmctl.config.sft import LoraConfig
from llmctl.config.training import TrainingConfig

DEFAULT_BETA = {"sigmoid": 0.1, "robust": 0.1, "ipo": 0.1, "simpo": 2.0}


class DpoConfig(TrainingConfig):
    """Preference optimisation of a (chat) model: DPO, cDPO, robust DPO, IPO or SimPO."""

    data: PreferenceDataConfig | None = Field(
        None, description="Preference pairs: sources, what to do with malformed records, the val split."
    )
    model: str | None = Field(
        None,
        description="Model artifact to optimise, also the reference (e.g. 'sft:latest', a path); null = the "
        "newest model made before dpo in pipeline order.",
    )
    loss: Literal["sigmoid", "robust", "ipo", "simpo"] = Field(
        "sigmoid",
        description="sigmoid: DPO (Rafailov 2023), cDPO with label_smoothing > 0; robust: rDPO (Chowdhury 2024); "
        "ipo: IPO (Azar 2023), length-normalised as in TRL; simpo: SimPO (Meng 2024), reference-free.",
    )
    beta: float | None = Field(
        None,
        gt=0,
        description="Strength of the pull toward the reference (IPO's tau; SimPO's reward scale); "
        "null = 0.1, or 2.0 for simpo.",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Probability that a label is flipped: cDPO for sigmoid, rDPO's epsilon for robust, "
        "also applied by simpo; ignored by ipo.",
    )
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin gamma.")
    sft_weight: float = Field(
        0.0,
        ge=0,
        description="Add this x the chosen answers' mean token NLL to the loss (TRL's loss_type [..., sft] "
        "with loss_weights; RPO): keeps the chosen answers likely while the margin grows.",
    )
    seq_len: int | None = Field(
        None,
        ge=8,
        description="Most tokens of prompt + one completion; a longer pair keeps the end of its prompt (at most "
        "half) and the start of its completions. null = the base model's training seq_len.",
    )
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="A pair longer than seq_len is truncated (see seq_len) or dropped (counted)."
    )
    micro_batch_size: int = Field(8, ge=1, description="Pairs per forward/backward pass on each device.")
    batch_size: int = Field(
        16,
        ge=1,
        description="Pairs per optimizer step over all processes; batch_size / (micro_batch_size * world_size) "
        "must be an integer.",
    )
    epochs: float | None = Field(
        None, gt=0, description="Horizon in passes over the pairs (default 1); max_steps, when set, wins."
    )
    max_steps: int | None = Field(None, ge=1, description="Horizon in optimizer steps; overrides epochs.")
    lora: LoraConfig = Field(
        default_factory=LoraConfig,
        description="LoRA adapters (off: full fine-tuning). The reference is the model without them.",
    )
    eval_every: int = Field(
        50, ge=0, description="Held-out pairs' loss and rewards every N steps (and at the end); 0 = end only."
    )
    checkpoint_every: int = Field(
        50, ge=0, description="Save a resumable checkpoint every N steps; 0 = only on interrupt."
    )
    log_every: int = Field(5, ge=1, description="Write a metrics.jsonl line every N steps.")

    @model_validator(mode="after")
    def _smoothing_applies(self) -> DpoConfig:
        if self.label_smoothing and self.loss == "ipo":
            raise ValueError("label_smoothing has no meaning for the ipo loss; set it to 0")
        return self

    @property
    def effective_beta(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA[self.loss]
