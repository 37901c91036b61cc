"""The GRPO objective: group-relative advantages and the clipped, KL-regularised policy loss with
the aggregations of GRPO, DAPO and Dr. GRPO, as TRL's GRPOTrainer defines them.

    adv, zero_std = group_advantages(rewards, group_size=8, scale="group")       # (N,), (N,)
    terms = policy_loss(logps, old_logps, ref_logps, adv, mask, loss_type="dapo",
                        epsilon_low=0.2, epsilon_high=0.28, beta=0.0, max_completion_length=64)
    terms.loss_sum / terms.units    # the loss TRL computes for that batch

Per completion token t of sequence s, with ratio r = exp(logp - old_logp) and advantage A_s:
    l = -min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A) + beta * kl,
    kl = exp(ref - logp) - (ref - logp) - 1          (the k3 estimator, Schulman 2020)
Aggregation over the batch (mask m: the completion tokens):
    grpo:    mean over sequences of (sum_t l m / sum_t m)     (Shao 2024)
    dapo:    sum l m / sum m, one token mean over the batch   (Yu 2025)
    dr_grpo: sum l m / (sequences x max_completion_length)   (Liu 2025: no length bias)
Each returns the sum and the units it is an average over, so the training loop can take the mean
over a whole global batch split into micro-batches and processes (llmctl.train.loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

LossType = Literal["grpo", "dapo", "dr_grpo"]
Scale = Literal["group", "batch", "none"]
STD_EPS = 1e-4  # TRL's: advantages / (std + 1e-4)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: Scale = "group"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, zero_std) for rewards (N,) laid out group by group (N = groups x group_size):
    reward minus its group's mean, divided by the group's (or the batch's) unbiased std + 1e-4
    unless scale is "none"; zero_std marks completions whose group's rewards are all equal."""
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    group_std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    advantages = (grouped - mean).reshape(-1)
    zero_std = torch.isclose(group_std, torch.zeros_like(group_std)).expand_as(grouped).reshape(-1)
    if scale == "group":
        advantages = advantages / (group_std.expand_as(grouped).reshape(-1) + STD_EPS)
    elif scale == "batch":
        batch_std = rewards.std() if rewards.numel() > 1 else torch.zeros(())
        advantages = advantages / (batch_std + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0), zero_std


@dataclass
class PolicyTerms:
    per_token_loss: torch.Tensor  # (S, T), 0 outside the mask
    loss_sum: torch.Tensor  # the batch's loss x units
    units: float  # sequences (grpo), tokens (dapo) or sequences x max length (dr_grpo)
    kl_sum: torch.Tensor  # over completion tokens (0 with beta 0)
    clipped_low: torch.Tensor  # tokens whose ratio was clipped below (negative advantage)
    clipped_high: torch.Tensor  # tokens whose ratio was clipped above (positive advantage)
    tokens: torch.Tensor  # completion tokens in the batch


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: LossType,
    epsilon_low: float,
    epsilon_high: float,
    beta: float,
    max_completion_length: int,
    completion_of: torch.Tensor | None = None,
) -> PolicyTerms:
    """The loss of a batch of S completions (advantages (S,)); logps/old_logps/ref_logps/mask are
    (B, T) over completion positions (see the module docstring). Row b is completion b unless
    `completion_of` (B, T) says which completion each position belongs to (rows that hold several
    completions after one prompt: llmctl.rl.rollout)."""
    S = advantages.shape[0]
    if completion_of is None:
        completion_of = torch.arange(S, device=logps.device)[:, None].expand_as(logps)
    member = completion_of.clamp(min=0)
    mask = mask.to(logps.dtype)
    adv = advantages.to(logps.dtype)[member]  # (B, T)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = torch.zeros_like(logps)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs reference log-probs")
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1
        per_token = per_token + beta * kl
    per_token = per_token * mask
    # Per completion: its loss and token count. One with no token (a micro-batch left empty by
    # dropped groups) counts for nothing.
    seq_tokens = mask.new_zeros(S).index_add_(0, member.flatten(), mask.flatten())
    sequences = int((seq_tokens > 0).sum())
    if loss_type == "grpo":
        seq_loss = per_token.new_zeros(S).index_add(0, member.flatten(), per_token.flatten())
        loss_sum = (seq_loss / seq_tokens.clamp(min=1.0)).sum()
        units = float(sequences)
    elif loss_type == "dapo":
        loss_sum, units = per_token.sum(), float(mask.sum())
    elif loss_type == "dr_grpo":
        loss_sum, units = per_token.sum(), float(sequences * max_completion_length)
    else:
        raise ValueError(f"unknown GRPO loss type {loss_type!r}")
    with torch.no_grad():
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(mask.dtype) * mask
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(mask.dtype) * mask
    return PolicyTerms(
        per_token, loss_sum, units, (kl * mask).sum().detach(), low.sum(), high.sum(), mask.sum()
    )
