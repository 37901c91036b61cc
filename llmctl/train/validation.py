"""Validation on held-out token shards: loss per token and bits per byte.

validate = token_validation(val_dir, batch_size=8, seq_len=256, max_batches=8,
                            token_bytes=token_byte_lengths(tok), info=info)
validate(model)   # {"val_loss": 3.21, "val_bpb": 1.12}; the training loop calls it under no_grad
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmctl.data.loader import val_batches
from llmctl.data.tokenizer import Tokenizer
from llmctl.train import distributed as D
from llmctl.train.loop import LossFn, stat_parts


def token_byte_lengths(tok: Tokenizer) -> torch.Tensor:
    """Bytes of text each id stands for; 0 for special tokens, which bits-per-byte leaves out."""
    specials = set(tok.special_tokens.values())
    return torch.tensor(
        [0 if i in specials else len(tok.token_bytes(i)) for i in range(tok.vocab_size)], dtype=torch.int64
    )


def token_validation(
    val_dir: Path,
    *,
    batch_size: int,
    seq_len: int,
    max_batches: int,
    token_bytes: torch.Tensor,
    info: D.DistInfo,
) -> Callable[[nn.Module], dict[str, float]]:
    """A validation hook: mean loss over the first max_batches global batches of val (each process
    reads its share), and bits per byte = sum of losses on tokens that stand for text / (ln 2 *
    their bytes): independent of the tokenizer, so models with different vocabularies compare
    (nanochat's bpb)."""
    token_bytes = token_bytes.to(info.device)

    def validate(model: nn.Module) -> dict[str, float]:
        module = D.unwrap(model)
        sums = torch.zeros(4, dtype=torch.float64, device=info.device)  # loss, count, text loss, bytes
        for x, y in val_batches(
            val_dir,
            batch_size=batch_size,
            seq_len=seq_len,
            rank=info.rank,
            world_size=info.world_size,
            max_batches=max_batches,
        ):
            x, y = x.to(info.device), y.to(info.device)
            losses = module(x, y, reduction="none").double()  # (B, T)
            nbytes = token_bytes[y]
            sums += torch.stack(
                [
                    losses.sum(),
                    torch.tensor(losses.numel(), device=info.device),
                    (losses * (nbytes > 0)).sum(),
                    nbytes.sum(),
                ]
            ).to(sums)
        D.all_reduce(sums)
        bpb = float(sums[2] / (math.log(2) * sums[3])) if sums[3] > 0 else float("nan")
        return {"val_loss": float(sums[0] / sums[1]), "val_bpb": bpb}

    return validate


def loss_validation(
    batches: Sequence[Any], loss_fn: LossFn, info: D.DistInfo
) -> Callable[[nn.Module], dict[str, float]]:
    """A validation hook: the loss function's mean over fixed held-out batches (each process takes
    every world_size-th batch), weighted by units like training (trained tokens, pairs); its stats
    likewise, as `val_<stat>`."""

    def validate(model: nn.Module) -> dict[str, float]:
        sums = torch.zeros(2, dtype=torch.float64, device=info.device)
        stat_sums: dict[str, torch.Tensor] = {}
        for batch in batches[info.rank :: info.world_size]:
            out = loss_fn(model, batch)
            sums[0] += out.loss_sum.double()
            sums[1] += out.units
            for key, value in out.stats.items():
                stat_sums[key] = stat_sums.get(key, 0.0) + stat_parts(value, out.units)
        # Every process must join the same all-reduce even with no batch of its own: stats of a known
        # set of keys would be needed for that, so stats are reduced only when every rank has batches.
        if stat_sums and len(batches) >= info.world_size:
            sums = torch.cat([sums, torch.cat(list(stat_sums.values())).to(sums)])
        else:
            stat_sums = {}
        D.all_reduce(sums)
        units = float(sums[1])
        out = {"val_loss": float(sums[0]) / units if units > 0 else float("nan")}
        pairs = sums[2:].view(-1, 2).tolist()
        out.update(
            (f"val_{k}", s / c if c else float("nan")) for k, (s, c) in zip(stat_sums, pairs, strict=True)
        )
        return out

    return validate
