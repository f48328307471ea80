"""Meta's layout: params.json + consolidated.NN.pth, one file per model-parallel rank."""

from __future__ import annotations

import json
import pickle
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from herd.checkpoint.base import CheckpointError, read_json
from herd.config import PRESETS, ModelConfig, RopeScaling
from herd.config.model import ffn_hidden_dim_from_rule

PARAMS_FILE = "params.json"
TOKENIZER_FILE = "tokenizer.model"
SHARD_GLOB = "consolidated.*.pth"

# Model-parallel split dimension per weight, as fairscale's layers shard them:
# column-parallel (and the vocab-parallel embedding) along rows, row-parallel along columns.
_COLUMN = (
    "attention.wq.weight",
    "attention.wk.weight",
    "attention.wv.weight",
    "feed_forward.w1.weight",
    "feed_forward.w3.weight",
    "output.weight",
    "tok_embeddings.weight",
)
_ROW = ("attention.wo.weight", "feed_forward.w2.weight")


def split_dim(name: str) -> int | None:
    """Dimension a tensor is split along across shards; None if every shard holds it whole."""
    if name.endswith(_COLUMN):
        return 0
    if name.endswith(_ROW):
        return 1
    return None


# ---------------------------------------------------------------- params.json


def config_from_params(params: dict[str, Any], source: Path) -> ModelConfig:
    try:
        shape = {
            "dim": params["dim"],
            "n_layers": params["n_layers"],
            "n_heads": params["n_heads"],
            "n_kv_heads": params.get("n_kv_heads") or params["n_heads"],
            "vocab_size": params["vocab_size"],
        }
        scaling = None
        if params.get("use_scaled_rope"):
            scaling = _scaling_from_params(params, shape)
        return ModelConfig(
            **shape,
            ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
            multiple_of=params.get("multiple_of", 256),
            norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=float(params.get("rope_theta", 500000.0)),
            rope_scaling=scaling,
            max_seq_len=params.get("max_seq_len", 131072 if scaling else 8192),
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: params.json lacks required key {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid model configuration: {e}") from e


def _scaling_from_params(params: dict[str, Any], shape: dict[str, int]) -> RopeScaling:
    if "rope_scaling_factor" in params:
        return RopeScaling(
            factor=float(params["rope_scaling_factor"]),
            low_freq_factor=float(params.get("rope_low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("rope_high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                params.get("rope_original_max_position_embeddings", 8192)
            ),
        )
    # Meta's params.json only says "use_scaled_rope" and its reference code assumes factor 8,
    # but the 3.2 1B/3B models were trained with factor 32: take it from the matching preset.
    for preset in PRESETS.values():
        if preset.rope_scaling and all(getattr(preset, k) == v for k, v in shape.items()):
            return preset.rope_scaling
    return RopeScaling(factor=8.0)


def params_from_config(config: ModelConfig) -> dict[str, Any]:
    multiplier, multiple_of = _ffn_rule_for(config)
    params: dict[str, Any] = {
        "dim": config.dim,
        "n_layers": config.n_layers,
        "n_heads": config.n_heads,
        "n_kv_heads": config.n_kv_heads,
        "vocab_size": config.vocab_size,
        "ffn_dim_multiplier": multiplier,
        "multiple_of": multiple_of,
        "norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "use_scaled_rope": config.rope_scaling is not None,
        "max_seq_len": config.max_seq_len,
    }
    if config.rope_scaling is not None:
        s = config.rope_scaling
        params.update(
            rope_scaling_factor=s.factor,
            rope_low_freq_factor=s.low_freq_factor,
            rope_high_freq_factor=s.high_freq_factor,
            rope_original_max_position_embeddings=s.original_max_position_embeddings,
        )
    return params


def _ffn_rule_for(config: ModelConfig) -> tuple[float | None, int]:
    """(ffn_dim_multiplier, multiple_of) for which Meta's rule gives config.ffn_hidden_dim."""
    hidden = config.ffn_hidden_dim
    candidates = [(config.ffn_dim_multiplier, config.multiple_of)]
    base = int(2 * (4 * config.dim) / 3)
    # Rounding up to a multiple of `hidden` itself recovers any size from a multiplier <= 1 away.
    candidates += [(hidden / base, hidden), (None, hidden)]
    for multiplier, multiple_of in candidates:
        if ffn_hidden_dim_from_rule(config.dim, multiplier, multiple_of) == hidden:
            return multiplier, multiple_of
    raise CheckpointError(
        f"ffn hidden size {hidden} cannot be expressed with Meta's ffn_dim_multiplier/multiple_of "
        "rule in params.json"
    )


# ---------------------------------------------------------------- reading


def _load_shard(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise CheckpointError(
            f"{file}: not a readable PyTorch checkpoint (truncated or corrupt?): {e}"
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: expected a dict of tensors (a consolidated state dict)")
    return state


class MetaReader:
    format = "meta"

    def __init__(self, path: Path):
        self.path = path
        params_path = path / PARAMS_FILE
        params = read_json(params_path)
        self._shard_files = sorted(path.glob(SHARD_GLOB))
        if not self._shard_files:
            raise CheckpointError(f"{path}: has params.json but no {SHARD_GLOB} files")
        self._shards = [_load_shard(f) for f in self._shard_files]
        first = set(self._shards[0])
        for file, shard in zip(self._shard_files[1:], self._shards[1:]):
            if set(shard) != first:
                diff = set(shard) ^ first
                raise CheckpointError(
                    f"{file}: holds different tensors than {self._shard_files[0].name} "
                    f"(differing: {', '.join(sorted(diff)[:5])})"
                )
        config = config_from_params(params, params_path)
        # Meta checkpoints of tied models (3.2 1B/3B) still store output.weight, as a copy.
        self._tied = "output.weight" not in first or torch.equal(
            self.read("output.weight"), self.read("tok_embeddings.weight")
        )
        self.config = config.replace(tie_word_embeddings=self._tied)

    @property
    def files(self) -> list[Path]:
        return [self.path / PARAMS_FILE, *self._shard_files]

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self._shards[0].values())).dtype

    def names(self) -> list[str]:
        names = list(self._shards[0])
        return [n for n in names if not (self._tied and n == "output.weight")]

    def stored_types(self) -> dict[str, int]:
        return dict(Counter(str(t.dtype).removeprefix("torch.") for t in self._shards[0].values()))

    def file_of(self, name: str) -> Path:
        return self._shard_files[0] if len(self._shard_files) == 1 else self.path

    def read(self, name: str) -> torch.Tensor:
        parts = [shard[name] for shard in self._shards]
        dim = split_dim(name)
        if len(parts) == 1 or dim is None or parts[0].dim() <= dim:
            return parts[0]
        try:
            return torch.cat(parts, dim=dim)
        except RuntimeError as e:
            raise CheckpointError(
                f"{self.path}: shards of {name!r} cannot be joined along dim {dim}: "
                f"{[tuple(p.shape) for p in parts]}"
            ) from e


# ---------------------------------------------------------------- writing


def save_meta(
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    path: Path,
    *,
    num_shards: int = 1,
    progress: Callable[[Iterable[int]], Iterable[int]] = iter,
) -> list[Path]:
    """Write `state` as params.json + consolidated.NN.pth, split for `num_shards` MP ranks."""
    if num_shards < 1 or config.n_kv_heads % num_shards or config.vocab_size % num_shards:
        raise CheckpointError(
            f"cannot split into {num_shards} shards: n_kv_heads ({config.n_kv_heads}) and "
            f"vocab_size ({config.vocab_size}) must both be divisible by it"
        )
    path.mkdir(parents=True, exist_ok=True)
    state = dict(state)
    if "output.weight" not in state:
        # Meta's reference loads output.weight unconditionally; a tied model stores the copy.
        state["output.weight"] = state["tok_embeddings.weight"]
    (path / PARAMS_FILE).write_text(json.dumps(params_from_config(config), indent=2) + "\n")
    written = [path / PARAMS_FILE]
    for rank in progress(range(num_shards)):
        shard = {}
        for name, tensor in state.items():
            dim = split_dim(name)
            if dim is not None and num_shards > 1:
                tensor = tensor.chunk(num_shards, dim=dim)[rank]
            shard[name] = tensor.contiguous()
        file = path / f"consolidated.{rank:02d}.pth"
        torch.save(shard, file)
        written.append(file)
    return written
