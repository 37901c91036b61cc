"""Loss functions for the training loop: (model, micro-batch) -> LossOutput (see llmctl.train.loop).

Each returns the loss summed over its units and the unit count; the loop turns the sums of a whole
global batch into one mean, so a micro-batch with more label tokens weighs more.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from llmctl.model.transformer import IGNORE_INDEX
from llmctl.train.loop import LossFn, LossOutput
from llmctl.train.packing import Batch


def next_token_loss(device: str) -> LossFn:
    """Cross-entropy on next-token targets; positions labelled -100 add nothing.

    A batch is `(input_ids, targets)` (pretraining windows) or a `llmctl.train.packing.Batch`
    (packed or padded conversations: restarting positions, block-diagonal mask, padding). Units are
    the positions with a target; tokens are the real (non-padding) ones."""

    def loss(model: nn.Module, batch: Any) -> LossOutput:
        if isinstance(batch, Batch):
            b = batch.to(device)
            loss_sum = model(b.input_ids, b.targets, reduction="sum", **b.forward_kwargs())
            return LossOutput(loss_sum, b.n_trained, b.n_real)
        x, y = (t.to(device, non_blocking=True) for t in batch)
        return LossOutput(model(x, y, reduction="sum"), (y != IGNORE_INDEX).sum(), x.numel())

    return loss
