"""What every checkpoint format shares: the error type, the reader interface, name tables."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

from herd.config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written as asked; the message names file and problem."""


class CheckpointReader(Protocol):
    """A checkpoint opened for reading. Tensor names are Meta's (`layers.0.attention.wq.weight`)
    and tensors come in Meta's layout (interleaved RoPE pairs), whatever the file holds."""

    format: str
    path: Path
    config: ModelConfig

    @property
    def files(self) -> list[Path]: ...

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the model takes when the caller asks for none."""
        ...

    def names(self) -> list[str]: ...

    def stored_types(self) -> dict[str, int]:
        """How many tensors the files hold of each stored type (dtype or GGUF quantisation)."""
        ...

    def file_of(self, name: str) -> Path: ...

    def read(self, name: str) -> torch.Tensor: ...


def read_json(path: Path) -> dict:
    """A JSON object from a checkpoint's metadata file, or a CheckpointError naming it."""
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read {path.name}: {e}") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


LAYER = "{}"  # stands for the layer index in name tables


class NameTable:
    """Bidirectional rename between Meta names and a format's names, with `{}` for the layer."""

    def __init__(self, meta_to_other: Mapping[str, str]):
        self._to_other = [(_compile(m), o) for m, o in meta_to_other.items()]
        self._to_meta = [(_compile(o), m) for m, o in meta_to_other.items()]

    def to_other(self, meta_name: str) -> str | None:
        return _rename(meta_name, self._to_other)

    def to_meta(self, other_name: str) -> str | None:
        return _rename(other_name, self._to_meta)


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(pattern).replace(re.escape(LAYER), r"(\d+)") + "$")


def _rename(name: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for regex, target in table:
        match = regex.match(name)
        if match:
            return target.replace(LAYER, match.group(1)) if match.groups() else target
    return None


def format_names(names: list[str] | set[str], limit: int = 8) -> str:
    ordered = sorted(names)
    shown = ", ".join(ordered[:limit])
    return shown + (f" … and {len(ordered) - limit} more" if len(ordered) > limit else "")
