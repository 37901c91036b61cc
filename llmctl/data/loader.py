"""Training and validation batches from token shards.

    loader = TokenLoader(corpus / "train", batch_size=8, seq_len=256, seed=1337, rank=rank, world_size=ws)
    for step in range(steps):
        x, y = loader.next_batch()            # int64 (B, T) each; y is x shifted left by one
    torch.save(...); json.dump(loader.state_dict(), f)    # resume: loader.load_state_dict(state)

    for x, y in val_batches(corpus / "val", batch_size=8, seq_len=256, rank=rank, world_size=ws):
        ...

The shards of a split are read (memory-mapped) as one token stream. A *window* is T+1 consecutive
tokens starting at a multiple of T (plus an epoch offset), so consecutive windows overlap by one
token and every token is predicted once per epoch. Windows may cross document boundaries: documents
are separated by BOS, as in nanoGPT/nanochat pretraining.

Modes: `sequential` takes windows in order; `random` takes them in a per-epoch permutation seeded by
(seed, epoch), with a random offset in [0, T) per epoch so window borders move between epochs.

Distributed: step k uses global windows [k*G, (k+1)*G) of the epoch order, where G = batch_size *
world_size; rank r takes the r-th slice of batch_size windows. Concatenating the ranks' batches in
rank order therefore gives exactly the batch a single process with batch_size=G gets, so averaging
the ranks' mean losses (equal-sized slices) equals the single-process loss. An epoch ends when fewer
than G windows remain (the remainder is dropped so every rank takes the same number of steps). The
position is counted in global windows, so `state_dict()` is identical on every rank and a run can
resume with a different world size as long as the global batch is the same.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from llmctl.data.shards import TokenShard, list_shards
from llmctl.errors import InputError

STATE_VERSION = 1


def _open_split(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[TokenShard]:
    """Shards of a split folder, or an explicit list of shard files."""
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise InputError(f"{folder}: no such token shard folder")
        paths = list_shards(folder)
        if not paths:
            raise InputError(f"{folder}: no token shards (shard_*.bin) in this folder")
    else:
        paths = [Path(p) for p in source]
        if not paths:
            raise InputError("no token shards given")
    shards = [TokenShard(p) for p in paths]
    for shard in shards:
        shard.check_ids()
    vocab = {s.header.vocab_size for s in shards}
    if len(vocab) > 1:
        raise InputError(
            f"token shards disagree on vocab_size ({sorted(vocab)}); they come from different tokenizers"
        )
    return shards


class TokenStream:
    """Several shards read as one token sequence."""

    def __init__(self, shards: list[TokenShard]):
        self.shards = shards
        sizes = np.array([len(s) for s in shards], dtype=np.int64)
        self.ends = np.cumsum(sizes)
        self.n_tokens = int(self.ends[-1]) if len(sizes) else 0
        self.vocab_size = shards[0].header.vocab_size

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) as int64 (copied out of the memory map)."""
        assert start >= 0 and start + length <= self.n_tokens, (start, length, self.n_tokens)
        i = int(np.searchsorted(self.ends, start, side="right"))
        out = np.empty(length, dtype=np.int64)
        filled = 0
        while filled < length:
            shard_start = int(self.ends[i - 1]) if i else 0
            lo = start + filled - shard_start
            take = min(length - filled, len(self.shards[i]) - lo)
            out[filled : filled + take] = self.shards[i].tokens[lo : lo + take]
            filled += take
            i += 1
        return out


def _batch(stream: TokenStream, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    windows = np.stack([stream.read(int(s), seq_len + 1) for s in starts])
    w = torch.from_numpy(windows)
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()  # (B, T) inputs, (B, T) targets


class TokenLoader:
    """Endless (x, y) training batches for one rank; deterministic, resumable, rank-sharded.

    `batch_size` is per rank. Batches are CPU int64 tensors of shape (batch_size, seq_len).
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        batch_size: int,
        seq_len: int,
        mode: Literal["random", "sequential"] = "random",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        assert batch_size >= 1 and seq_len >= 1, (batch_size, seq_len)
        assert 0 <= rank < world_size, (rank, world_size)
        assert mode in ("random", "sequential"), mode
        self.stream = TokenStream(_open_split(source))
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.mode = mode
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.global_batch = batch_size * world_size
        self.epoch = 0
        self.position = 0  # next global window index within the epoch
        self._order: tuple[int, int, np.ndarray | None] | None = None  # (epoch, offset, permutation)
        needed = self.global_batch * seq_len + 1
        if self.stream.n_tokens < needed:
            raise InputError(
                f"the training split has {self.stream.n_tokens:,} tokens; one global batch of "
                f"{self.global_batch} x {seq_len} needs {needed:,}",
                hint="use more data, or lower the batch size or sequence length",
            )

    @property
    def vocab_size(self) -> int:
        return self.stream.vocab_size

    def _epoch_order(self) -> tuple[int, np.ndarray | None]:
        """(offset, permutation or None) of the current epoch, cached."""
        if self._order is None or self._order[0] != self.epoch:
            if self.mode == "sequential":
                self._order = (self.epoch, 0, None)
            else:
                rng = np.random.default_rng([self.seed, self.epoch])
                offset = int(rng.integers(0, self.seq_len))
                if (self.stream.n_tokens - 1 - offset) // self.seq_len < self.global_batch:
                    offset = 0  # a tiny split: keep at least one full global batch
                n = (self.stream.n_tokens - 1 - offset) // self.seq_len
                self._order = (self.epoch, offset, rng.permutation(n))
        return self._order[1], self._order[2]

    def windows_per_epoch(self) -> int:
        offset, _ = self._epoch_order()
        return (self.stream.n_tokens - 1 - offset) // self.seq_len

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) for this rank; advances the shared global position by one global batch."""
        if self.position + self.global_batch > self.windows_per_epoch():
            self.epoch += 1
            self.position = 0
        offset, perm = self._epoch_order()
        idx = np.arange(self.batch_size) + self.position + self.rank * self.batch_size
        if perm is not None:
            idx = perm[idx]
        self.position += self.global_batch
        return _batch(self.stream, offset + idx * self.seq_len, self.seq_len)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position; identical on every rank."""
        return {
            "version": STATE_VERSION,
            "mode": self.mode,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "n_tokens": self.stream.n_tokens,
            "global_batch": self.global_batch,
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`; the data, mode, seed and sequence length must be the same."""
        if state.get("version") != STATE_VERSION:
            raise InputError(
                f"data loader state has version {state.get('version')}, expected {STATE_VERSION}"
            )
        current = {
            "mode": self.mode,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "n_tokens": self.stream.n_tokens,
        }
        for key, now in current.items():
            if state.get(key) != now:
                raise InputError(
                    f"cannot resume the data loader: {key} was {state.get(key)!r}, now {now!r}",
                    hint="resume with the same tokenized data and training settings, or start a new run",
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


def val_batches(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    batch_size: int,
    seq_len: int,
    rank: int = 0,
    world_size: int = 1,
    max_batches: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One deterministic pass over the val split: sequential windows, sharded by rank like
    `TokenLoader`, full global batches only, at most `max_batches` per rank."""
    assert 0 <= rank < world_size, (rank, world_size)
    stream = TokenStream(_open_split(source))
    global_batch = batch_size * world_size
    n_windows = (stream.n_tokens - 1) // seq_len
    n_steps = n_windows // global_batch
    if n_steps == 0:
        raise InputError(
            f"the val split has {stream.n_tokens:,} tokens; one global batch of {global_batch} x {seq_len} "
            f"needs {global_batch * seq_len + 1:,}",
            hint="raise tokenize.val_fraction, or lower the eval batch size",
        )
    if max_batches is not None:
        n_steps = min(n_steps, max_batches)
    for step in range(n_steps):
        idx = np.arange(batch_size) + step * global_batch + rank * batch_size
        yield _batch(stream, idx * seq_len, seq_len)
