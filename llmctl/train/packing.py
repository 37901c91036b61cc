"""Fit tokenized conversations into training rows: packed (several per row, no attention across them) or padded.

    kept, counts = fit_to_length(examples, seq_len, overlong="truncate")   # counts: truncated, dropped, ...
    rows = pack(kept, seq_len)                          # [[example index, ...], ...]: best-fit decreasing
    batch = collate_packed([[kept[i] for i in row] for row in rows[:8]], seq_len, pad_id=tok.pad_id)
    loss = model(batch.input_ids, batch.targets, **batch.forward_kwargs())
    batch.efficiency                                    # fraction of positions holding real tokens

A packed row keeps its conversations apart: positions restart at 0 for each one, and a block-diagonal
causal mask (B, 1, T, T) lets a token see only earlier tokens of its own conversation, so each
conversation's logits equal its logits alone. Targets are shifted per conversation (the last token of
one never predicts the first of the next), the `labels[t+1]` that TRL's padding-free collator uses.
The padded mode puts one conversation per row, right-padded: causal attention never reaches the pads
after a token, so it needs no mask and runs the fused causal kernel.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from llmctl.errors import InputError
from llmctl.model.transformer import IGNORE_INDEX
from llmctl.train.chat_tokens import ChatExample

Overlong = Literal["truncate", "drop"]
Strategy = Literal["best_fit", "sequential"]


@dataclass
class FitCounts:
    """What fit_to_length did, for the stage's manifest and log."""

    kept: int = 0
    truncated: int = 0  # longer than seq_len, cut to its first seq_len tokens
    dropped_overlong: int = 0  # longer than seq_len with overlong="drop"
    dropped_untrained: int = 0  # no trained token left (after truncation, or none to begin with)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def fit_to_length(
    examples: Sequence[ChatExample], seq_len: int, *, overlong: Overlong = "truncate"
) -> tuple[list[ChatExample], FitCounts]:
    """Examples that fit in `seq_len` tokens: longer ones truncated (keep the start) or dropped, and any
    example with no trained token dropped (it adds no loss, as TRL drops fully masked examples)."""
    counts = FitCounts()
    kept = []
    for ex in examples:
        if len(ex) > seq_len:
            if overlong == "drop":
                counts.dropped_overlong += 1
                continue
            ex = ex.truncated(seq_len)
            counts.truncated += 1
        if ex.n_trained == 0:
            counts.dropped_untrained += 1
            continue
        kept.append(ex)
    counts.kept = len(kept)
    return kept, counts


def pack(
    lengths_or_examples: Sequence[int] | Sequence[ChatExample],
    seq_len: int,
    *,
    strategy: Strategy = "best_fit",
) -> list[list[int]]:
    """Group example indices into rows of at most `seq_len` tokens.

    best_fit: longest first, each into the fullest row that still has room (best-fit decreasing; rows
    come out near full). sequential: in the given order, a new row when the next one does not fit."""
    lengths = [x if isinstance(x, int) else len(x) for x in lengths_or_examples]
    too_long = [i for i, n in enumerate(lengths) if n > seq_len]
    if too_long:
        raise InputError(
            f"example {too_long[0]} has {lengths[too_long[0]]} tokens, more than the sequence length {seq_len}",
            hint="fit_to_length first (truncate or drop over-long conversations)",
        )
    rows: list[list[int]] = []
    if strategy == "sequential":
        used = seq_len
        for i, n in enumerate(lengths):
            if used + n > seq_len:
                rows.append([])
                used = 0
            rows[-1].append(i)
            used += n
        return rows
    free: list[tuple[int, int]] = []  # (room left, row index), sorted: the first with room >= n fits best
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = seq_len, len(rows)
            rows.append([])
        rows[row].append(i)
        bisect.insort(free, (room - n, row))
    return rows


@dataclass
class Batch:
    """Model inputs for one step. `targets` are next-token ids (-100: no loss), aligned with input_ids."""

    input_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T)
    position_ids: torch.Tensor | None  # (B, T); None: 0..T-1 in every row (padded mode)
    attention_mask: torch.Tensor | None  # (B, 1, T, T) bool block-diagonal causal; None: plain causal
    seq_lens: list[list[int]] = field(default_factory=list)  # per row, the conversations' lengths

    @property
    def n_real(self) -> int:
        """Positions holding a conversation's token (not padding)."""
        return sum(sum(row) for row in self.seq_lens)

    @property
    def n_trained(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    @property
    def efficiency(self) -> float:
        """Fraction of positions that hold real tokens: the packing or padding efficiency."""
        return self.n_real / self.input_ids.numel() if self.input_ids.numel() else 0.0

    def forward_kwargs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments `Transformer.forward` takes for this layout."""
        kwargs = {}
        if self.attention_mask is not None:
            kwargs["attention_mask"] = self.attention_mask
        if self.position_ids is not None:
            kwargs["position_ids"] = self.position_ids
        return kwargs

    def to(self, device: torch.device | str) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(
            move(self.input_ids),
            move(self.targets),
            move(self.position_ids),
            move(self.attention_mask),
            self.seq_lens,
        )


def _next_token_targets(ex: ChatExample) -> list[int]:
    """labels[t+1] at position t, and no target for the conversation's last token."""
    return [*ex.labels[1:], IGNORE_INDEX]


def collate_packed(rows: Sequence[Sequence[ChatExample]], seq_len: int, pad_id: int) -> Batch:
    """Rows of several conversations each -> a batch with restarting positions and a block-diagonal mask.

    Each row is right-padded to `seq_len`; the padding is one more block (it sees only itself) so every
    query keeps a key and the softmax stays finite; it carries no target."""
    B, T = len(rows), seq_len
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    segment = torch.zeros((B, T), dtype=torch.long)  # which conversation each position belongs to
    seq_lens = []
    for b, row in enumerate(rows):
        lens, at = [], 0
        for k, ex in enumerate(row):
            n = len(ex)
            if at + n > T:
                raise InputError(f"row {b} holds {at + n} tokens, more than the sequence length {T}")
            input_ids[b, at : at + n] = torch.tensor(ex.input_ids)
            targets[b, at : at + n] = torch.tensor(_next_token_targets(ex))
            position_ids[b, at : at + n] = torch.arange(n)
            segment[b, at : at + n] = k
            lens.append(n)
            at += n
        position_ids[b, at:] = torch.arange(T - at)
        segment[b, at:] = len(row)
        seq_lens.append(lens)
    causal = torch.ones((T, T), dtype=torch.bool).tril()
    mask = (segment[:, :, None] == segment[:, None, :]) & causal  # (B, T, T)
    return Batch(input_ids, targets, position_ids, mask[:, None], seq_lens)


def collate_padded(examples: Sequence[ChatExample], pad_id: int, *, pad_to_multiple_of: int = 1) -> Batch:
    """One conversation per row, right-padded to the longest (rounded up to `pad_to_multiple_of`)."""
    longest = max((len(ex) for ex in examples), default=0)
    T = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for b, ex in enumerate(examples):
        input_ids[b, : len(ex)] = torch.tensor(ex.input_ids)
        targets[b, : len(ex)] = torch.tensor(_next_token_targets(ex))
    return Batch(input_ids, targets, None, None, [[len(ex)] for ex in examples])


def packing_efficiency(lengths: Sequence[int], rows: Sequence[Sequence[int]], seq_len: int) -> float:
    """Fraction of the rows' positions that hold real tokens once packed (before any batch is built)."""
    return sum(lengths[i] for row in rows for i in row) / (len(rows) * seq_len) if rows else 0.0
