"""SFT rows: encoded dialogs packed whole into fixed-length rows, as pretraining packs documents.

A dialog of n ids gives n - 1 (input, next-token target) pairs; a target the loss mask leaves
out is -100, which cross-entropy ignores, so the Trainer's loss is the mean over trained
tokens. Dialogs are placed first-fit in order, never split across rows; each gets its own
document id (attention stays inside it) and positions restarting at 0. What is left of a row is
padding: its own document, targets -100. A dialog longer than a row is cut to the row
(`overflow="truncate"`) or left out (`"drop"`); both are counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from herd.data.loader import Batch, EpochLoader
from herd.tokenizer.chat import EncodedDialog
from herd.train.trainer import IGNORE

OVERFLOW = ("truncate", "drop")


@dataclass
class PackStats:
    rows: int = 0
    dialogs: int = 0  # dialogs placed in rows
    truncated: int = 0
    dropped: int = 0
    trained_tokens: int = 0
    padding: int = 0


@dataclass
class PackedRows:
    tokens: np.ndarray  # (rows, seq_len) int64
    targets: np.ndarray  # (rows, seq_len) int64, IGNORE where untrained or padding
    doc_ids: np.ndarray  # (rows, seq_len) int32
    positions: np.ndarray  # (rows, seq_len) int64
    stats: PackStats


def pack_dialogs(
    dialogs: Sequence[EncodedDialog], seq_len: int, pad_id: int, overflow: str = "truncate"
) -> PackedRows:
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow {overflow!r}: choose one of {', '.join(OVERFLOW)}")
    stats = PackStats()
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    free: list[int] = []
    for dialog in dialogs:
        ids = np.asarray(dialog.ids, dtype=np.int64)
        targets = np.where(np.asarray(dialog.mask[1:], dtype=bool), ids[1:], IGNORE)
        pairs = (ids[:-1], targets)
        if len(ids) - 1 > seq_len:
            if overflow == "drop":
                stats.dropped += 1
                continue
            stats.truncated += 1
            pairs = (ids[:seq_len], targets[:seq_len])
        if not (pairs[1] != IGNORE).any():
            stats.dropped += 1  # nothing left to train on (it was all cut away)
            continue
        need = len(pairs[0])
        row = next((r for r, space in enumerate(free) if space >= need), None)
        if row is None:
            rows.append([])
            free.append(seq_len)
            row = len(rows) - 1
        rows[row].append(pairs)
        free[row] -= need
        stats.dialogs += 1
        stats.trained_tokens += int((pairs[1] != IGNORE).sum())
    stats.rows = len(rows)
    shape = (len(rows), seq_len)
    out = PackedRows(
        np.full(shape, pad_id, np.int64),
        np.full(shape, IGNORE, np.int64),
        np.zeros(shape, np.int32),
        np.zeros(shape, np.int64),
        stats,
    )
    for r, pieces in enumerate(rows):
        at = 0
        for doc, (inputs, targets) in enumerate(pieces):
            end = at + len(inputs)
            out.tokens[r, at:end], out.targets[r, at:end] = inputs, targets
            out.doc_ids[r, at:end] = doc
            out.positions[r, at:end] = np.arange(len(inputs))
            at = end
        out.doc_ids[r, at:] = len(pieces)  # the padding is a document of its own
        out.positions[r, at:] = np.arange(seq_len - at)
        stats.padding += seq_len - at
    return out


class SFTLoader(EpochLoader):
    """Batches of packed rows: shuffled per epoch (seeded), row k of an epoch to data-parallel
    rank k % world_size, resumable from `state_dict()` like herd.data.PackedLoader."""

    def __init__(
        self, rows: PackedRows, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.seq_len = rows.tokens.shape[1]
        self.batches_per_epoch = len(rows.tokens) // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{len(rows.tokens)} packed rows make no batch of {world_size} x {batch_size}: "
                "use a smaller batch or more dialogs"
            )
        self.epoch, self.step = 0, 0

    def batch(self, epoch: int, step: int) -> Batch:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows.tokens))
        first = step * self.world_size * self.batch_size + self.rank
        picked = order[first : first + self.world_size * self.batch_size : self.world_size]
        r = self.rows
        return Batch(
            torch.from_numpy(r.tokens[picked]),
            torch.from_numpy(r.targets[picked]),
            torch.from_numpy(r.doc_ids[picked]),
            torch.from_numpy(r.positions[picked]),
        )
