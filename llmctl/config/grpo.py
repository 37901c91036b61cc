"""The `grpo:` section of llmctl.yaml: reinforcement learning with verifiable rewards.

    grpo:
      data:
        sources:
          - path: data/rl_prompts.jsonl       # {"prompt": ..., "answer": ...}; GSM8K's layout works as is
        val_sources:
          - path: data/rl_eval.jsonl
      rewards:
        - type: contains                      # math, exact, contains, regex, format, code, function
          field: answer
      num_generations: 8                      # G completions per prompt
      prompts_per_step: 8
      loss_type: dapo                         # grpo, dapo, dr_grpo
      rollout: {temperature: 1.0, max_new_tokens: 32}

Every optimizer step samples G completions for each of `prompts_per_step` prompts with the policy
(llmctl.rl.rollout), scores them, and takes `num_iterations` optimisation passes over them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from llmctl.config.base import Section
from llmctl.config.prompts import PromptDataConfig
from llmctl.config.rewards import VerifierConfig
from llmctl.config.sft import LoraConfig
from llmctl.config.training import TrainingConfig


class RolloutConfig(Section):
    """How completions are sampled."""

    engine: Literal["llmctl", "vllm"] = Field(
        "llmctl",
        description="llmctl: our engine (G samples per prompt from one prefill, CPU or GPU); vllm: vLLM in the "
        "same process (CUDA and the vllm package required; never a silent fallback).",
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts (1.0 = off).")
    top_k: int = Field(0, ge=0, description="Top-k sampling of the rollouts (0 = off).")
    max_new_tokens: int = Field(
        64, ge=1, description="Most tokens of a completion; longer ones are truncated."
    )


class GrpoConfig(TrainingConfig):
    """GRPO and its fixes (DAPO's clip-higher and token-level loss, Dr. GRPO's normalisation)."""

    data: PromptDataConfig | None = Field(
        None, description="Prompts with what the verifiers need (answer, tests)."
    )
    rewards: list[VerifierConfig] = Field(
        default_factory=list,
        description="Verifiers, combined by their weights into each completion's reward.",
    )
    model: str | None = Field(
        None,
        description="Model artifact to train, also the KL reference (e.g. 'dpo:latest'); null = the newest "
        "model made before grpo in pipeline order.",
    )
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="How completions are sampled.")
    num_generations: int = Field(8, ge=2, description="G: completions sampled per prompt (one group).")
    prompts_per_step: int = Field(
        8, ge=1, description="Prompts per rollout over all processes (a multiple of the process count)."
    )
    micro_batch_size: int = Field(
        16, ge=1, description="Completions per forward/backward pass; divides the completions of a process."
    )
    num_iterations: int = Field(
        1, ge=1, description="Optimisation passes (optimizer steps) over each rollout batch (mu)."
    )
    max_steps: int = Field(100, ge=1, description="Optimizer steps.")
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = Field(
        "dapo",
        description="grpo: per-sequence token mean, then mean; dapo: one token mean over the batch; dr_grpo: sum "
        "over tokens / (completions x max_new_tokens).",
    )
    epsilon: float = Field(0.2, gt=0, lt=1, description="Lower clip of the importance ratio: 1 - epsilon.")
    epsilon_high: float | None = Field(
        None,
        gt=0,
        description="Upper clip: 1 + epsilon_high (DAPO's clip-higher, e.g. 0.28); null = epsilon.",
    )
    beta: float = Field(
        0.0, ge=0, description="Weight of the k3 KL to the frozen starting model; 0 loads no reference."
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="Divide advantages by the group's reward std (GRPO), the batch's, or not at all (Dr. GRPO).",
    )
    drop_zero_variance: bool = Field(
        False,
        description="Leave out groups whose completions all got the same reward (they carry no signal).",
    )
    max_prompt_len: int = Field(
        512,
        ge=8,
        description="Prompts longer than this (in tokens, template included) are left out, counted.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters (off: full fine-tuning).")
    spike_factor: float = Field(
        0.0,
        ge=0,
        description="The spike test of other stages is off by default: a policy-gradient loss centres on 0 "
        "and changes sign, so 'x times the recent mean' means nothing (NaN/inf steps are still skipped).",
    )
    samples_every: int = Field(
        10,
        ge=0,
        description="Write a few sampled completions with their rewards to the run folder every N steps.",
    )
    eval_every: int = Field(
        10,
        ge=0,
        description="Score the held-out prompts greedily every N steps (and at the end); 0 = end only.",
    )
    checkpoint_every: int = Field(
        10, ge=0, description="Save a resumable checkpoint every N steps; 0 = only on interrupt."
    )
    log_every: int = Field(1, ge=1, description="Write a metrics.jsonl line every N steps.")

    @model_validator(mode="after")
    def _rewards_when_data(self) -> GrpoConfig:
        if self.data is not None and not self.rewards:
            raise ValueError("rewards: name at least one verifier (e.g. [{type: math, field: answer}])")
        return self

    @property
    def clip_high(self) -> float:
        return self.epsilon_high if self.epsilon_high is not None else self.epsilon
