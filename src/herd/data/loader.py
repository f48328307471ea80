"""Packed training sequences from token shards, with document ids, deterministic and resumable.

Each epoch the documents of all shards are put in a seeded random order and concatenated
(each already ends with end-of-text); the stream is cut into windows of `seq_len + 1` tokens
(inputs and next-token targets), and the windows are shuffled too, so that a batch does not
hold consecutive stretches of one long document. The k-th window drawn goes to data-parallel
rank `k % world_size`.
Per token the loader also gives the document's index within the window and its position in
the document, restarting at 0 where a document starts (the paper's document masking and RoPE
restart). `state_dict()` is the epoch and the batches already taken; loading it resumes
exactly where a run stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from herd.data.shards import Shard, load_shards


@dataclass
class Batch:
    tokens: torch.Tensor  # (batch, seq_len) int64 inputs
    targets: torch.Tensor  # (batch, seq_len) int64 next tokens
    doc_ids: torch.Tensor  # (batch, seq_len) int32 document index within the window
    positions: torch.Tensor  # (batch, seq_len) int64 position within the document


class EpochLoader:
    """Seeded batches by (epoch, step): iterating walks the epochs, and the position saved by
    `state_dict()` resumes exactly. Subclasses set seed, batches_per_epoch, epoch and step, and
    compute `batch(epoch, step)`."""

    seed: int
    batches_per_epoch: int
    epoch: int
    step: int

    def batch(self, epoch: int, step: int) -> Batch:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"the saved loader used seed {state['seed']}, this one {self.seed}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def __iter__(self) -> Iterator[Batch]:
        while True:
            if self.step >= self.batches_per_epoch:
                self.epoch, self.step = self.epoch + 1, 0
            batch = self.batch(self.epoch, self.step)
            self.step += 1
            yield batch


class PackedLoader(EpochLoader):
    def __init__(
        self,
        shards: str | Path | list[Shard],
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.shards = load_shards(shards) if isinstance(shards, (str, Path)) else shards
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self._ids = [s.token_ids() for s in self.shards]
        bounds = [s.offsets() for s in self.shards]
        # Every document as (shard, start, length).
        self._docs = np.concatenate(
            [
                np.stack([np.full(len(b) - 1, i), b[:-1], np.diff(b)], axis=1)
                for i, b in enumerate(bounds)
            ]
        )
        total = int(self._docs[:, 2].sum())
        self.windows_per_epoch = total // (seq_len + 1)
        self.batches_per_epoch = self.windows_per_epoch // (world_size * batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{total} tokens make no full batch of {world_size} x {batch_size} x "
                f"{seq_len + 1}: use a smaller batch or sequence length, or more data"
            )
        self.epoch, self.step = 0, 0
        self._order_epoch: int | None = None

    def batch(self, epoch: int, step: int) -> Batch:
        """This rank's batch `step` of `epoch`, computed directly (no state)."""
        rows = [self._window(k) for k in self.window_ids(epoch, step)]
        tokens = torch.from_numpy(np.stack([r[0] for r in rows]).astype(np.int64))
        doc_ids = torch.from_numpy(np.stack([r[1] for r in rows])[:, :-1])
        positions = torch.from_numpy(np.stack([r[2] for r in rows])[:, :-1])
        return Batch(tokens[:, :-1], tokens[:, 1:], doc_ids, positions)

    def window_ids(self, epoch: int, step: int) -> list[int]:
        """Which windows of the epoch's packed stream (0 = its first seq_len + 1 tokens) make
        this rank's batch `step`."""
        self._order(epoch)
        first = (step * self.world_size * self.batch_size) + self.rank
        return [int(self._shuffled[first + i * self.world_size]) for i in range(self.batch_size)]

    def _order(self, epoch: int) -> None:
        if self._order_epoch == epoch:
            return
        rng = np.random.default_rng([self.seed, epoch])
        self._perm = rng.permutation(len(self._docs))
        self._ends = np.cumsum(self._docs[self._perm, 2])
        self._shuffled = rng.permutation(self.windows_per_epoch)
        self._order_epoch = epoch

    def _window(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokens, in-window document ids and in-document positions of window k."""
        width = self.seq_len + 1
        start, end = k * width, (k + 1) * width
        d = int(np.searchsorted(self._ends, start, side="right"))
        pieces, doc_ids, positions, at, local = [], [], [], start, 0
        while at < end:
            shard, doc_start, length = self._docs[self._perm[d]]
            doc_begin = int(self._ends[d] - length)  # the document's start in the stream
            offset = at - doc_begin
            take = min(int(length) - offset, end - at)
            source = self._ids[shard]
            pieces.append(source[doc_start + offset : doc_start + offset + take])
            doc_ids.append(np.full(take, local, dtype=np.int32))
            # Positions restart with each document, and for a document the window cuts into,
            # at the window's start (its earlier part is not in this window's context).
            positions.append(np.arange(take, dtype=np.int64))
            at, d, local = at + take, d + 1, local + 1
        return np.concatenate(pieces), np.concatenate(doc_ids), np.concatenate(positions)
