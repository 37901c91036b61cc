"""Micro-batches of training rows in a seeded random order, a new order each epoch; each process
takes its slice of every micro-batch. The position (epoch, row) is the sampler's state, saved in
checkpoints, so a resumed run reads exactly the rows the uninterrupted one would have read.

    source = ShuffledRows(len(rows), micro_batch_size=8, seed=1337, info=info,
                          collate=lambda picked: collate_padded([rows[i] for i in picked], pad_id))
    batch = source.next_batch()             # this process's micro-batch
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from llmctl.train import distributed as D


class ShuffledRows:
    def __init__(
        self,
        n_rows: int,
        *,
        micro_batch_size: int,
        seed: int,
        info: D.DistInfo,
        collate: Callable[[list[int]], Any],
    ):
        self.n_rows, self.micro, self.seed, self.info, self.collate = (
            n_rows,
            micro_batch_size,
            seed,
            info,
            collate,
        )
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)

    def next_batch(self) -> Any:
        """The next `micro_batch_size * world_size` rows (wrapping into the next epoch); this
        process's share of them, collated."""
        span = self.micro * self.info.world_size
        picked: list[int] = []
        while len(picked) < span:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(span - len(picked), len(self._order) - self.position)
            picked.extend(self._order[self.position : self.position + take].tolist())
            self.position += take
        rank = self.info.rank
        return self.collate(picked[rank * self.micro : (rank + 1) * self.micro])

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
