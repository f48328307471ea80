"""Load and save Llama models in the formats people hold them in: Hugging Face safetensors
directories, Meta's consolidated.pth directories and llama.cpp's GGUF files."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from herd.checkpoint import gguf_file, hf, meta
from herd.checkpoint.base import CheckpointError, CheckpointReader, format_names
from herd.config import ModelConfig
from herd.config.embedded import EMBEDDED, embedded_path
from herd.model import Transformer
from herd.tokenizer import Tokenizer
from herd.tokenizer.formats import gguf_fields, load_tokenizer, save_tokenizer

__all__ = [
    "FORMATS",
    "CheckpointError",
    "CheckpointInfo",
    "describe",
    "load_model",
    "open_checkpoint",
    "save_model",
]

log = logging.getLogger(__name__)

FORMATS = ("hf", "meta", "gguf")
GGUF_MAGIC = b"GGUF"

_DTYPES = {
    "f32": torch.float32,
    "float32": torch.float32,
    "fp32": torch.float32,
    "f16": torch.float16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
_GGUF_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}

T = TypeVar("T")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of f32, f16, bf16") from None


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def open_checkpoint(path: str | Path) -> CheckpointReader:
    """Detect a checkpoint's format and open it for reading (no tensor data is loaded yet).
    `path` may also name an embedded model (`smollm2`)."""
    path = Path(path)
    if not path.exists() and str(path) in EMBEDDED:
        path = embedded_path(str(path))
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix == ".gguf" or _is_gguf(path):
            return gguf_file.GGUFReader(path)
        raise CheckpointError(
            f"{path}: not a GGUF file; for Hugging Face or Meta checkpoints pass the directory"
        )
    if (path / hf.CONFIG_FILE).exists():
        return hf.HFReader(path)
    if (path / meta.PARAMS_FILE).exists():
        return meta.MetaReader(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return gguf_file.GGUFReader(ggufs[0])
    found = format_names([p.name for p in path.iterdir()]) or "nothing"
    raise CheckpointError(
        f"{path}: not a checkpoint directory: expected config.json (Hugging Face), "
        f"params.json (Meta) or a single .gguf file, found {found}"
    )


def _progress(items: Iterable[T], description: str, enabled: bool) -> Iterable[T]:
    if not enabled:
        return items
    from rich.progress import track

    return track(list(items), description=description, transient=True)


def load_model(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Transformer:
    """Load a checkpoint of any supported format into a `Transformer`.

    The model is built on the meta device and each tensor is materialised once, straight into
    its parameter, so peak memory stays near the checkpoint's size.

    Args:
        path: a Hugging Face directory, a Meta directory or a .gguf file.
        dtype: parameter dtype; None keeps the checkpoint's (float32 for quantised GGUF).
        device: where the parameters live.
        progress: show a progress bar.
    """
    reader = open_checkpoint(path)
    return _load_from(reader, parse_dtype(dtype) or reader.dtype, torch.device(device), progress)


def _load_from(
    reader: CheckpointReader, dtype: torch.dtype, device: torch.device, progress: bool
) -> Transformer:
    config = reader.config
    with torch.device("meta"):
        model = Transformer(config)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    present = set(reader.names())
    missing, unexpected = set(expected) - present, present - set(expected)
    if missing:
        raise CheckpointError(
            f"{reader.path}: missing tensors for a {config.n_layers}-layer model: "
            f"{format_names(missing)}"
        )
    if unexpected:
        raise CheckpointError(
            f"{reader.path}: unexpected tensors not in a {config.n_layers}-layer Llama: "
            f"{format_names(unexpected)}"
        )
    state = {}
    for name in _progress(expected, f"loading {reader.path.name}", progress):
        tensor = reader.read(name)
        if tensor.shape != expected[name]:
            raise CheckpointError(
                f"{reader.file_of(name)}: tensor {name!r} has shape {tuple(tensor.shape)} but the "
                f"config (dim={config.dim}, n_heads={config.n_heads}, "
                f"n_kv_heads={config.n_kv_heads}, vocab_size={config.vocab_size}, "
                f"ffn_hidden_dim={config.ffn_hidden_dim}) needs {tuple(expected[name])}"
            )
        state[name] = tensor.to(device=device, dtype=dtype)
    model.load_state_dict(state, assign=True, strict=True)
    return model


def save_model(
    model: Transformer,
    path: str | Path,
    format: str = "hf",
    dtype: str | torch.dtype | None = None,
    *,
    tokenizer: Tokenizer | str | Path | None = None,
    tokenizer_from: str | Path | None = None,
    num_shards: int = 1,
    max_shard_bytes: int = 5 * 2**30,
    progress: bool = False,
) -> list[Path]:
    """Write `model` so the format's own tools load it; returns the files written.

    Args:
        model: the model to save.
        path: output directory (hf, meta) or .gguf file (gguf).
        format: "hf", "meta" or "gguf".
        dtype: f32/f16/bf16 (and q8_0/q4_0/q4_1 for gguf); None keeps the model's dtype.
        tokenizer: a tokenizer, or a checkpoint or tokenizer file to take it from, written
            beside the weights in the format's own way (see `herd.tokenizer.save_tokenizer`).
        tokenizer_from: older name for a `tokenizer` given as a path.
        num_shards: model-parallel shards for the meta format.
        max_shard_bytes: safetensors shard size for the hf format.
        progress: show a progress bar.
    """
    if format not in FORMATS:
        raise ValueError(
            f"unknown checkpoint format {format!r}; choose one of {', '.join(FORMATS)}"
        )
    path = Path(path)
    config: ModelConfig = model.config
    source = tokenizer if tokenizer is not None else tokenizer_from

    if format == "gguf":
        if path.is_dir() or path.suffix != ".gguf":
            path = path / "model.gguf" if path.is_dir() else path.with_suffix(".gguf")
        gguf_type = (
            dtype
            if dtype in gguf_file.BLOCK_TYPES
            else _GGUF_NAMES[parse_dtype(dtype) or model.tok_embeddings.weight.dtype]
        )
        extra = _gguf_tokenizer(source, config) if source is not None else {}
        state = {k: v.detach() for k, v in model.state_dict().items()}
        return gguf_file.save_gguf(
            state,
            config,
            path,
            dtype=gguf_type,
            extra_fields=extra,
            progress=lambda names: _progress(names, f"writing {path.name}", progress),
        )

    tok = None
    if source is not None:  # before any weights are written: a bad tokenizer stops it all
        tok = source if isinstance(source, Tokenizer) else load_tokenizer(source)
        _check_vocab_size(tok.vocab_size, config)
    target = parse_dtype(dtype)
    state = {
        k: (v.detach().to(target) if target is not None else v.detach())
        for k, v in model.state_dict().items()
    }
    if format == "hf":
        written = hf.save_hf(
            state,
            config,
            path,
            max_shard_bytes=max_shard_bytes,
            progress=lambda names: _progress(names, f"writing {path.name}", progress),
        )
    else:
        written = meta.save_meta(
            state,
            config,
            path,
            num_shards=num_shards,
            progress=lambda ranks: _progress(ranks, f"writing {path.name}", progress),
        )
    if tok is not None:
        log.info("writing the %s tokenizer as %s", type(tok).__name__, format)
        written += save_tokenizer(tok, path, format, model_max_length=config.max_seq_len)
    return written


def _gguf_tokenizer(source: Tokenizer | str | Path, config: ModelConfig) -> dict[str, Any]:
    """tokenizer.* fields; from a GGUF path they are copied as they are."""
    fields = gguf_fields(source, config.vocab_size)
    tokens = fields.get("tokenizer.ggml.tokens")
    _check_vocab_size(len(tokens.value) if tokens is not None else 0, config)
    return fields


def _check_vocab_size(n_tokens: int, config: ModelConfig) -> None:
    if n_tokens > config.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {n_tokens} token ids but the model's embedding only "
            f"{config.vocab_size} rows"
        )


@dataclass
class CheckpointInfo:
    format: str
    path: Path
    config: ModelConfig
    num_params: int
    stored_types: dict[str, int]
    size_bytes: int
    files: list[Path]


def describe(path: str | Path) -> CheckpointInfo:
    """Format, config, parameter count, stored dtypes and size on disk, without loading tensors."""
    reader = open_checkpoint(path)
    return CheckpointInfo(
        format=reader.format,
        path=reader.path,
        config=reader.config,
        num_params=reader.config.num_params(),
        stored_types=reader.stored_types(),
        size_bytes=sum(f.stat().st_size for f in reader.files if f.is_file()),
        files=reader.files,
    )
