"""Loss functions for the training loop: (model, micro-batch) -> LossOutput (see llmctl.train.loop).

Each returns the loss summed over its units and the unit count; the loop turns the sums of a whole
global batch into one mean, so a micro-batch with more label tokens weighs more.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from llmctl.train.loop import LossFn, LossOutput


def next_token_loss(device: str) -> LossFn:
    """Cross-entropy on next-token targets; positions labelled -100 add nothing.

    A batch is `(input_ids, targets)` (pretraining windows) or a dict with `input_ids`, `labels` and
    optionally `position_ids` and `attention_mask` (packed or padded conversations)."""

    def loss(model: nn.Module, batch: Any) -> LossOutput:
        if isinstance(batch, dict):
            x, y = batch["input_ids"].to(device), batch["labels"].to(device)
            extra = {k: batch[k].to(device) for k in ("position_ids", "attention_mask") if k in batch}
        else:
            x, y = (t.to(device, non_blocking=True) for t in batch)
            extra = {}
        loss_sum = model(x, y, reduction="sum", **extra)
        return LossOutput(loss_sum, (y != -100).sum(), x.numel())

    return loss
