"""Preference optimisation from (prompt, chosen, rejected) pairs: the rows a pair becomes, the
completion log-probabilities a model gives it, and the losses (DPO, cDPO, robust DPO, IPO, SimPO).

    pair = tokenize_pair(tok, prompt_messages, chosen_messages, rejected_messages)
    batch = collate_pairs([pair, ...], pad_id=0, indices=[0, ...])
    chosen, rejected = completion_logps(model, batch)            # (P,) summed over completion tokens
    scores = preference_loss("sigmoid", chosen, rejected, ref_chosen, ref_rejected,
                             batch.chosen_tokens, batch.rejected_tokens, beta=0.1)
    scores.losses, scores.chosen_rewards, scores.rejected_rewards      # (P,) each

One row per pair, the prompt computed once (llmctl.train.shared_prompt): `prompt[:-1] | prompt[-1]
chosen | prompt[-1] rejected`, each completion's logits equal to those of `prompt + completion` run
alone (what TRL's concatenated forward computes with two rows).

The losses follow TRL's definitions (trl.DPOTrainer `loss_type` and trl's CPOTrainer for SimPO):
with policy/reference log-ratios r_c = pi_c - ref_c and r_r = pi_r - ref_r, summed over completion
tokens, and delta = r_c - r_r:

- sigmoid (DPO):  -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta); eps > 0 is the
  conservative DPO (cDPO) of Mitchell 2023 (trl's DPOTrainer no longer applies label smoothing to
  `sigmoid`; its CPOTrainer still does, with this formula);
- robust (rDPO, Chowdhury 2024): (-(1 - eps) log sigmoid(beta delta) + eps log sigmoid(-beta delta)) / (1 - 2 eps);
- ipo: (r_c / |y_c| - r_r / |y_r| - 1 / (2 beta))^2, length-normalised as in TRL;
- simpo (Meng 2024, reference-free): -(1 - eps) log sigmoid(beta (pi_c/|y_c| - pi_r/|y_r|) - gamma)
  - eps log sigmoid(-(...)), with pi the policy's mean log-probability per completion token.

Rewards as TRL logs them: beta * r (beta * mean log-prob for SimPO).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.model.transformer import IGNORE_INDEX
from llmctl.train.shared_prompt import pack_shared_prompts, shared_prompt_length

LossType = Literal["sigmoid", "robust", "ipo", "simpo"]
REFERENCE_FREE = ("simpo",)

# Segment ids of a pair's row (llmctl.train.shared_prompt): the chosen block, the rejected block.
CHOSEN, REJECTED = 1, 2


@dataclass(frozen=True)
class PairExample:
    """One tokenized pair: the prompt's ids and each completion's ids (end-of-turn included)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]

    def __len__(self) -> int:
        """Positions its row takes: the prompt, both completions, and the prompt's last token again."""
        return shared_prompt_length(self.prompt, (self.chosen, self.rejected))

    @property
    def longest(self) -> int:
        """The longer of prompt + chosen and prompt + rejected: what must fit in the context."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


@dataclass
class PairBatch:
    """Rows of pairs (see the module docstring) and what the loss needs to read them."""

    input_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T) next-token ids on completion positions, -100 elsewhere
    segments: torch.Tensor  # (B, T) PROMPT/CHOSEN/REJECTED/PAD of each position's target's block
    position_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, 1, T, T) bool
    indices: torch.Tensor  # (B,) each pair's index in its data set (where its reference log-probs are)
    n_real: int  # positions holding a token (not padding)

    @property
    def chosen_tokens(self) -> torch.Tensor:
        return ((self.segments == CHOSEN) & (self.targets != IGNORE_INDEX)).sum(-1)

    @property
    def rejected_tokens(self) -> torch.Tensor:
        return ((self.segments == REJECTED) & (self.targets != IGNORE_INDEX)).sum(-1)

    def to(self, device: torch.device | str) -> PairBatch:
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return PairBatch(
            move(self.input_ids),
            move(self.targets),
            move(self.segments),
            move(self.position_ids),
            move(self.attention_mask),
            self.indices,
            self.n_real,
        )


@dataclass
class PairScores:
    losses: torch.Tensor  # (P,)
    chosen_rewards: torch.Tensor  # (P,), detached
    rejected_rewards: torch.Tensor  # (P,), detached


# ---- tokens ----------------------------------------------------------------------------------------


def tokenize_pair(tok: Any, prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> PairExample:
    """The prompt rendered once with the generation prompt; each completion is what the template
    writes after it for that answer, through the end of the turn (the tokens sft trains on)."""
    from llmctl.train.chat_tokens import tokenize_conversation

    prompt_ids = list(tok.encode_chat(prompt))
    completions = []
    for answer in (chosen, rejected):
        ex = tokenize_conversation(tok, [*prompt, *answer], turns="last")
        if ex.input_ids[: len(prompt_ids)] != prompt_ids:
            # A token straddling the prompt's end (rare in BPE after a template's newline) would make
            # the two completions continue different prompts.
            from llmctl.errors import InputError

            raise InputError(
                f"{tok.folder}: the prompt's tokens change once an answer follows it",
                hint="use a chat template whose generation prompt ends on a special token or newline",
            )
        completions.append(ex.input_ids[len(prompt_ids) :])
    return PairExample(prompt_ids, completions[0], completions[1])


@dataclass
class PairFitCounts:
    kept: int = 0
    truncated: int = 0  # a completion cut so prompt + completion fits seq_len (the prompt's start kept too)
    dropped_overlong: int = 0  # overlong="drop"
    dropped_empty: int = 0  # nothing left of a completion

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def fit_pairs(
    pairs: Sequence[PairExample], seq_len: int, *, overlong: str = "truncate"
) -> tuple[list[PairExample], list[int], PairFitCounts]:
    """Pairs whose prompt + completion fit in `seq_len` tokens, and their indices in `pairs`.

    truncate: a prompt longer than half of seq_len keeps its last seq_len // 2 tokens (the question
    is at its end), then each completion is cut to what is left (TRL's keep_start for the sequence);
    drop: such pairs are dropped and counted."""
    counts, kept, where = PairFitCounts(), [], []
    for i, p in enumerate(pairs):
        if p.longest > seq_len:
            if overlong == "drop":
                counts.dropped_overlong += 1
                continue
            prompt = p.prompt[-(seq_len // 2) :] if len(p.prompt) > seq_len // 2 else p.prompt
            room = seq_len - len(prompt)
            p = PairExample(prompt, p.chosen[:room], p.rejected[:room])
            counts.truncated += 1
        if not p.chosen or not p.rejected:
            counts.dropped_empty += 1
            continue
        kept.append(p)
        where.append(i)
    counts.kept = len(kept)
    return kept, where, counts


def collate_pairs(pairs: Sequence[PairExample], pad_id: int, indices: Sequence[int]) -> PairBatch:
    """One row per pair, right-padded to the longest row (see the module docstring for the layout)."""
    rows = pack_shared_prompts([(p.prompt, [p.chosen, p.rejected]) for p in pairs], pad_id)
    return PairBatch(
        rows.input_ids,
        rows.targets,
        rows.segments,
        rows.position_ids,
        rows.attention_mask,
        torch.as_tensor(list(indices), dtype=torch.long),
        rows.n_real,
    )


# ---- log-probabilities -----------------------------------------------------------------------------


def completion_logps(model: nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probabilities of each pair's completions, summed over their tokens, in fp32."""
    logp = -model(
        batch.input_ids,
        batch.targets,
        reduction="none",
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    ).float()  # (B, T), 0 where there is no target
    chosen = (logp * (batch.segments == CHOSEN)).sum(-1)
    rejected = (logp * (batch.segments == REJECTED)).sum(-1)
    return chosen, rejected


@torch.no_grad()
def reference_logps(
    model: nn.Module, batches: Sequence[PairBatch], n_pairs: int, device: str
) -> torch.Tensor:
    """(n_pairs, 2) chosen/rejected log-probabilities under `model`, placed at each batch's indices;
    pairs no batch holds stay 0 (each process computes its share; the caller sums them)."""
    table = torch.zeros((n_pairs, 2), dtype=torch.float64)
    for batch in batches:
        chosen, rejected = completion_logps(model, batch.to(device))
        table[batch.indices] = torch.stack([chosen, rejected], dim=-1).double().cpu()
    return table


# ---- losses ----------------------------------------------------------------------------------------


def preference_loss(
    loss_type: LossType,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> PairScores:
    """Per-pair losses and rewards from summed completion log-probs (see the module docstring)."""
    eps = label_smoothing
    n_c, n_r = chosen_tokens.clamp_min(1).to(policy_chosen), rejected_tokens.clamp_min(1).to(policy_rejected)
    if loss_type == "simpo":
        mean_c, mean_r = policy_chosen / n_c, policy_rejected / n_r
        logits = beta * (mean_c - mean_r) - simpo_gamma
        losses = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)
        return PairScores(losses, beta * mean_c.detach(), beta * mean_r.detach())
    if ref_chosen is None or ref_rejected is None:
        raise ValueError(f"loss {loss_type!r} needs reference log-probs")
    ratio_c = policy_chosen - ref_chosen.to(policy_chosen)
    ratio_r = policy_rejected - ref_rejected.to(policy_rejected)
    delta = ratio_c - ratio_r
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (ratio_c / n_c - ratio_r / n_r - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {loss_type!r}")
    return PairScores(losses, beta * ratio_c.detach(), beta * ratio_r.detach())


def pair_stats(
    scores: PairScores, logps_chosen: torch.Tensor, logps_rejected: torch.Tensor
) -> dict[str, torch.Tensor]:
    """TRL's logged metrics, summed over the pairs (the training loop divides by the pair count).
    `logps_*`: the policy's log-probs as the loss reads them (sums; means for SimPO)."""
    c, r = scores.chosen_rewards, scores.rejected_rewards
    return {
        "rewards/chosen": c.sum(),
        "rewards/rejected": r.sum(),
        "rewards/accuracies": (c > r).float().sum(),
        "rewards/margins": (c - r).sum(),
        "logps/chosen": logps_chosen.detach().sum(),
        "logps/rejected": logps_rejected.detach().sum(),
    }
