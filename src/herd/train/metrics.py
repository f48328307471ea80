"""Per-step training metrics, written as JSON lines and TensorBoard events.

`metrics.jsonl` holds one object per record ({"step": ..., "loss": ...}). On resume, records
past the checkpoint's step are dropped first (they will be produced again), so the file reads
as one uninterrupted run. That rewrite goes to a temporary file renamed over the old one, so a
crash at any moment leaves either the old history or the new one, never a truncated file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class MetricsCorrupt(ValueError):
    pass


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl. Only the last line may be torn (a run killed mid-write)
    and is then skipped; a malformed line anywhere else raises MetricsCorrupt naming it."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                break
            raise MetricsCorrupt(f"{path}:{number}: not a JSON record ({e.msg}): {line[:80]!r}")
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise MetricsCorrupt(
                f"{path}:{number}: a record needs an integer 'step': {line[:80]!r}"
            )
        records.append(record)
    return records


def _replace_lines(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricsWriter:
    def __init__(
        self, run_dir: str | Path, resume_step: int | None = None, tensorboard: bool = True
    ):
        self.path = Path(run_dir) / "metrics.jsonl"
        kept = [
            r
            for r in read_metrics(self.path)
            if resume_step is not None and r["step"] <= resume_step
        ]
        _replace_lines(self.path, kept)
        self._file = self.path.open("a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency, but a trimmed install may lack it
                pass
            else:
                self._tb = SummaryWriter(
                    str(Path(run_dir) / "tensorboard"),
                    purge_step=None if resume_step is None else resume_step + 1,
                )

    def write(self, step: int, values: dict[str, Any]) -> None:
        record = {"step": step, **values}
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                if number and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
