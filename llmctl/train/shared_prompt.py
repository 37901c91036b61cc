"""Training rows in which several completions share one copy of their prompt.

A row is `prompt[:-1] | prompt[-1] c_1 | prompt[-1] c_2 | ...`: each completion block sees the prompt
and itself, never another block, and continues the prompt's positions, so each completion's logits
equal those of `prompt + c_k` run alone. The prompt's last token is written once per block because
its logits predict the first token of every completion, and a position has one target.

DPO rows hold a pair (chosen, rejected); GRPO rows hold a group of G samples of one prompt, which
spends the prompt's forward and backward once instead of G times.

    rows = pack_shared_prompts([(prompt, [c1, c2]), ...], pad_id=0)
    logp = -model(rows.input_ids, rows.targets, reduction="none",
                  attention_mask=rows.attention_mask, position_ids=rows.position_ids)   # (B, T)
    rows.segments       # PROMPT (0) on the prompt, k on completion k's block (1-based), PAD (-1) after
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmctl.model.transformer import IGNORE_INDEX

PROMPT, PAD = 0, -1


@dataclass
class SharedPromptRows:
    input_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T) next-token ids on completion positions, -100 elsewhere
    segments: torch.Tensor  # (B, T) PROMPT, the 1-based completion of each position's block, or PAD
    position_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, 1, T, T) bool
    n_real: int  # positions holding a token (not padding)


def shared_prompt_length(prompt: Sequence[int], completions: Sequence[Sequence[int]]) -> int:
    """Positions a row takes: the prompt, and the prompt's last token again before each completion
    but the first."""
    return len(prompt) + sum(len(c) for c in completions) + len(completions) - 1


def pack_shared_prompts(
    rows: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], pad_id: int
) -> SharedPromptRows:
    """One right-padded row per (prompt, completions); see the module docstring for the layout."""
    B = len(rows)
    T = max(shared_prompt_length(p, cs) for p, cs in rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    segments = torch.full((B, T), PAD, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    for b, (prompt, completions) in enumerate(rows):
        head, last = list(prompt[:-1]), prompt[-1]
        n = len(head)
        input_ids[b, :n] = torch.tensor(head, dtype=torch.long)
        segments[b, :n] = PROMPT
        position_ids[b, :n] = torch.arange(n)
        at = n
        for k, completion in enumerate(completions, 1):
            ids = [last, *completion]
            block = slice(at, at + len(ids))
            input_ids[b, block] = torch.tensor(ids, dtype=torch.long)
            segments[b, block] = k
            position_ids[b, block] = torch.arange(n, n + len(ids))
            if completion:  # each position predicts the next token of its own block
                targets[b, at : at + len(completion)] = torch.tensor(list(completion), dtype=torch.long)
            at += len(ids)
        position_ids[b, at:] = torch.arange(T - at)
    q, k = segments[:, :, None], segments[:, None, :]
    causal = torch.ones((T, T), dtype=torch.bool).tril()
    # A completion block sees the prompt and itself; padding only itself (its softmax stays finite).
    mask = causal & ((k == q) | ((k == PROMPT) & (q != PAD)))
    return SharedPromptRows(
        input_ids, targets, segments, position_ids, mask[:, None], int((segments != PAD).sum())
    )
