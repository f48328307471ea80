"""Training checkpoints with torch.distributed.checkpoint (DCP): complete or absent, never torn.

A checkpoint is `RUN/checkpoints/step-NNNNNNNN/`, a DCP directory. It is written under a
`.tmp` name and renamed when DCP has finished (and synced) every file, so a crash mid-save
leaves the previous checkpoints as they were; stale `.tmp` directories are removed on the next
start. The last `keep` complete checkpoints are kept. With `async_save` the state is copied to
host memory and written by a background thread while training goes on.

Only tensors are saved (non-tensor values would be pickled by DCP), and DCP's own `.metadata`
pickle is read once, with an allow-list, and DCP plans the load from that object instead of
unpickling the file itself, so a tampered (or swapped) checkpoint cannot run code.
"""

from __future__ import annotations

import builtins
import json
import logging
import pickle
import shutil
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from herd.config import ModelConfig
from herd.model import Transformer

log = logging.getLogger(__name__)

PREFIX = "step-"
TMP_SUFFIX = ".tmp"

# DCP warns on every call that it runs without a process group; single-process is intended.
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)


class CheckpointCorrupt(RuntimeError):
    pass


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = [
        p
        for p in directory.iterdir()
        if p.is_dir()
        and p.name.startswith(PREFIX)
        and p.name[len(PREFIX) :].isdigit()
        and (p / ".metadata").is_file()
    ]
    return sorted(found, key=checkpoint_step)


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only the classes DCP's metadata is made of."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint") or (
            module == "torch.serialization" and name == "_get_layout"
        ):
            return super().find_class(module, name)
        if module == "torch":
            value = getattr(torch, name, None)
            if isinstance(value, torch.dtype) or value is torch.Size:
                return value
        if module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath"):
            return super().find_class(module, name)
        if module in ("builtins", "collections") and name in ("set", "frozenset", "OrderedDict"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def verified_metadata(path: Path, keys: set[str]) -> Metadata:
    """Read `.metadata` safely and make sure every key we will load is a plain tensor."""
    try:
        with (path / ".metadata").open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise CheckpointCorrupt(f"{path}: unreadable checkpoint metadata ({e})") from None
    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(metadata, Metadata) or not isinstance(entries, builtins.dict):
        raise CheckpointCorrupt(f"{path}: checkpoint metadata has no tensor index")
    missing = sorted(keys - set(entries))
    if missing:
        raise CheckpointCorrupt(
            f"{path}: the checkpoint lacks {len(missing)} entries this run needs, e.g. "
            f"{', '.join(missing[:3])} (was it written by another model or recipe?)"
        )
    pickled = sorted(k for k in keys if isinstance(entries[k], BytesStorageMetadata))
    if pickled:
        raise CheckpointCorrupt(f"{path}: entries {pickled[:3]} are pickled objects; refusing")
    return metadata


class _VerifiedReader(FileSystemReader):
    """DCP's file reader, handed the metadata we verified: reading `.metadata` a second time
    would unpickle whatever the file holds by then."""

    def __init__(self, path: Path, metadata: Metadata):
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if getattr(self._metadata, "storage_meta", None) is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


def read_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Fill `state`'s tensors in place from checkpoint `path` (keys it lacks stay unread)."""
    reader = _VerifiedReader(path, verified_metadata(path, flat_keys(state)))
    try:
        dcp.load(state, storage_reader=reader)
    except (CheckpointException, RuntimeError, OSError) as e:
        # CheckpointException is a BaseException: a bare `except Exception` misses it
        raise CheckpointCorrupt(f"{path}: could not read the checkpoint: {e}") from e


def flat_keys(state: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for k, v in state.items():
        name = f"{prefix}{k}"
        keys |= flat_keys(v, name + ".") if isinstance(v, dict) else {name}
    return keys


class CheckpointManager:
    """Saves are collective (every rank writes its shards); the main rank alone renames and
    prunes, and the others wait for it, so all see the same complete checkpoints."""

    def __init__(
        self, directory: str | Path, keep: int = 3, async_save: bool = False, main: bool = True
    ):
        self.directory = Path(directory)
        self.keep, self.async_save, self.main = keep, async_save, main
        self._pending: tuple[Future, Path, Path] | None = None
        if main:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(f"{PREFIX}*{TMP_SUFFIX}"):
                log.info("removing %s, an unfinished save", stale)
                shutil.rmtree(stale, ignore_errors=True)
        _barrier()

    def latest(self) -> Path | None:
        found = complete_checkpoints(self.directory)
        return found[-1] if found else None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write `state` (nested dicts of tensors) as the checkpoint of `step`."""
        self.wait()
        final = self.directory / f"{PREFIX}{step:08d}"
        tmp = final.with_name(final.name + TMP_SUFFIX)
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        if self.async_save:
            self._pending = (dcp.async_save(state, checkpoint_id=tmp), tmp, final)
        else:
            dcp.save(state, checkpoint_id=tmp)
            self._finish(tmp, final)
        return final

    def wait(self) -> None:
        """Block until a background save has finished and been made visible."""
        if self._pending is not None:
            future, tmp, final = self._pending
            self._pending = None
            future.result()
            self._finish(tmp, final)

    def _finish(self, tmp: Path, final: Path) -> None:
        _barrier()  # every rank's shards are written
        if self.main:
            if final.exists():  # a re-run of the same step after a resume
                shutil.rmtree(final)
            tmp.rename(final)
            for old in complete_checkpoints(self.directory)[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def run_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """A training run's newest complete checkpoint, or the one of `step`."""
    found = complete_checkpoints(Path(run_dir) / "checkpoints")
    if step is not None:
        found = [p for p in found if checkpoint_step(p) == step]
    if not found:
        which = f"for step {step}" if step is not None else "yet"
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint {which}")
    return found[-1]


def load_run_model(run_dir: str | Path, step: int | None = None) -> tuple[Transformer, Path]:
    """The model of a training run (`herd pretrain`'s run directory) at its newest checkpoint,
    or at `step`; returns it with the checkpoint it came from."""
    run_dir = Path(run_dir)
    shape = run_dir / "model.json"
    if not shape.is_file():
        raise FileNotFoundError(f"{run_dir}: not a training run directory (no model.json)")
    path = run_checkpoint(run_dir, step)
    with torch.device("meta"):  # no random init: every tensor is read from the checkpoint
        model = Transformer(ModelConfig(**json.loads(shape.read_text())))
    model.to_empty(device="cpu")
    state = {"model": model.state_dict()}
    read_checkpoint(path, state)
    model.load_state_dict(state["model"])
    return model, path
