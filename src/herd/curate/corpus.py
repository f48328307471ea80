"""Steps that need the whole corpus before they can judge one document.

A `CorpusStep` runs in three parts, each a datatrove step of its own executor run:
- `Collect` (every task): passes documents through and records what the step needs of each
  (`observe`), saved as WORK/NAME/collect/RANK.npz when the task ends;
- `Decide` (one task): reads every task's records and writes WORK/NAME/decision.npz;
- `Apply` (every task of the next stage): loads the decision and keeps, edits or removes
  each document (`apply`).
Decisions are keyed by a 64-bit hash of the document id, never by task or position, so the
same corpus gives the same output however it is split over tasks.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter


def hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Written under a temporary name and renamed, so a killed task leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


class CorpusStep:
    """What a corpus-wide step observes, decides and applies; subclasses fill in the three."""

    name = "corpus"

    def __init__(self, work: str):
        self.work = Path(work) / self.name
        self.count = lambda *labels, value=1: None  # Apply points this at its stats

    def observe(self, doc: Document, records: dict[str, list]) -> None:
        raise NotImplementedError

    def decide(self, records: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def apply(self, doc: Document, decision: dict[str, Any]) -> bool | tuple[bool, str]:
        raise NotImplementedError

    def prepare(self, decision: dict[str, np.ndarray]) -> dict[str, Any]:
        """The decision in the form `apply` looks things up in (loaded once per task)."""
        return decision

    def record_arrays(self, records: dict[str, list]) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in records.items()}

    def applier(self, exclusion_writer=None) -> PipelineStep:
        """The step of the next stage that carries out the decision."""
        return Apply(self, exclusion_writer)


class Collect(PipelineStep):
    """Records each document for a corpus-wide step and passes it on unchanged."""

    type = "COLLECT"

    def __init__(self, step: CorpusStep):
        self.name = f"{step.name} (collect)"
        super().__init__()
        self.step = step

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        records: dict[str, list] = {}
        for doc in data:
            with self.track_time():
                self.step.observe(doc, records)
            yield doc
        save_npz(self.step.work / "collect" / f"{rank:05d}.npz", self.step.record_arrays(records))


class Decide(PipelineStep):
    """Reads every task's records of a corpus-wide step and writes its decision."""

    type = "DECIDE"

    def __init__(self, step: CorpusStep, tasks: int):
        self.name = f"{step.name} (decide)"
        super().__init__()
        self.step = step
        self.tasks = tasks

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        folder = self.step.work / "collect"
        paths = [folder / f"{r:05d}.npz" for r in range(self.tasks)]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise FileNotFoundError(f"{self.step.name}: no records from {', '.join(missing)}")
        with self.track_time("corpus"):
            decision = self.step.decide([load_npz(p) for p in paths])
        save_npz(self.step.work / "decision.npz", decision)
        yield from ()


class Apply(BaseFilter):
    """Keeps, edits or removes each document by a corpus-wide step's decision."""

    def __init__(self, step: CorpusStep, exclusion_writer=None):
        self.name = step.name
        super().__init__(exclusion_writer)
        self.step = step
        self._decision: dict[str, Any] | None = None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._decision is None:
            path = self.step.work / "decision.npz"
            if not path.exists():
                raise FileNotFoundError(f"{self.step.name}: {path} missing (run its decide)")
            self._decision = self.step.prepare(load_npz(path))
            self.step.count = self.stat_update
        return self.step.apply(doc, self._decision)


def member(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """keys in sorted_keys, elementwise."""
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), dtype=bool)
    at = np.searchsorted(sorted_keys, keys).clip(max=len(sorted_keys) - 1)
    return sorted_keys[at] == keys


def listed(sorted_keys: np.ndarray, doc_id: str) -> bool:
    """The document's id hash is in sorted_keys."""
    return bool(member(sorted_keys, np.array([hash64(doc_id)], np.uint64))[0])
