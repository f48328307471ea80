"""Hugging Face `LlamaForCausalLM` directories: config.json + safetensors (single or sharded)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from herd.checkpoint.base import CheckpointError, NameTable, read_json
from herd.config import ModelConfig, RopeScaling

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

NAMES = NameTable(
    {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
        "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
        "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
        "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
        "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
        "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
        "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
        "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
        "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
        "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    }
)

_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# Meta rotates interleaved pairs (x0, x1), (x2, x3)…; HF rotates halves (x_i, x_{i+d/2}).
# Converting permutes the output rows of wq and wk within each head.
def meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def permuted_heads(meta_name: str, config: ModelConfig) -> int | None:
    """The head count whose rows `meta_name` permutes between layouts (wq, wk), else None."""
    if meta_name.endswith("attention.wq.weight"):
        return config.n_heads
    if meta_name.endswith("attention.wk.weight"):
        return config.n_kv_heads
    return None


# ---------------------------------------------------------------- config.json


def config_from_hf(raw: dict[str, Any], source: Path) -> ModelConfig:
    """Parse config.json as transformers 4.x (rope_theta/rope_scaling) or 5.x (rope_parameters)
    writes it."""

    def need(key: str) -> Any:
        if key not in raw:
            raise CheckpointError(f"{source}: config.json lacks required key {key!r}")
        return raw[key]

    model_type = raw.get("model_type")
    if model_type != "llama":
        raise CheckpointError(
            f"{source}: model_type is {model_type!r}; herd reads Llama-architecture checkpoints "
            "(model_type 'llama', LlamaForCausalLM)"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if raw.get(flag):
            raise CheckpointError(f"{source}: {flag}=true is not part of the Llama architecture")
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {raw['hidden_act']!r} is not supported (silu)")

    dim, n_heads = need("hidden_size"), need("num_attention_heads")
    head_dim = raw.get("head_dim") or dim // n_heads
    if head_dim * n_heads != dim:
        raise CheckpointError(
            f"{source}: head_dim {head_dim} × {n_heads} heads != hidden_size {dim}; "
            "herd's Llama needs head_dim = hidden_size / num_attention_heads"
        )
    rope = raw.get("rope_parameters") or {}
    theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    scaling_raw = raw.get("rope_scaling") or rope
    try:
        config = ModelConfig(
            dim=dim,
            n_layers=need("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=raw.get("num_key_value_heads") or n_heads,
            vocab_size=need("vocab_size"),
            ffn_hidden_dim=need("intermediate_size"),
            norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=_scaling_from_hf(scaling_raw, source),
            max_seq_len=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid model configuration: {e}") from e
    return config


def _scaling_from_hf(raw: dict[str, Any], source: Path) -> RopeScaling | None:
    kind = raw.get("rope_type", raw.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise CheckpointError(
            f"{source}: rope scaling type {kind!r} is not supported (only Llama 3.1's 'llama3')"
        )
    return RopeScaling(
        factor=float(raw["factor"]),
        low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
        high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(raw.get("original_max_position_embeddings", 8192)),
    )


def config_to_hf(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json that transformers 4.x and 5.x both read (5.x converts the 4.x rope keys)."""
    scaling = None
    if config.rope_scaling is not None:
        s = config.rope_scaling
        scaling = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": scaling,
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype_name,
    }


# ---------------------------------------------------------------- reading


class HFReader:
    format = "hf"

    def __init__(self, path: Path):
        self.path = path
        config_path = path / CONFIG_FILE
        raw = read_json(config_path)
        self.config = config_from_hf(raw, config_path)
        self._declared_dtype = _DTYPE_NAMES.get(raw.get("dtype") or raw.get("torch_dtype"))
        self._file_of = self._map_files()  # HF name -> file
        self._handles: dict[Path, Any] = {}
        self._hf_of: dict[str, str] = {}
        unknown = []
        for hf_name in self._file_of:
            meta_name = NAMES.to_meta(hf_name)
            if meta_name is None:
                unknown.append(hf_name)
            elif not (meta_name == "output.weight" and self.config.tie_word_embeddings):
                # A tied model may still store lm_head; transformers ignores it, as do we.
                self._hf_of[meta_name] = hf_name
        self._unknown = unknown

    def _map_files(self) -> dict[str, Path]:
        index_path = self.path / INDEX_FILE
        if index_path.exists():
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: not a safetensors index (no weight_map)")
            files = {name: self.path / fname for name, fname in weight_map.items()}
            for missing in sorted({f for f in files.values() if not f.exists()}):
                raise CheckpointError(f"{index_path}: lists shard {missing.name}, which is missing")
            return files
        single = self.path / SINGLE_FILE
        if not single.exists():
            raise CheckpointError(
                f"{self.path}: has config.json but neither {SINGLE_FILE} nor {INDEX_FILE}"
            )
        with self._open(single) as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)

    def _open(self, file: Path) -> Any:
        try:
            return safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e

    def _handle(self, file: Path) -> Any:
        if file not in self._handles:
            self._handles[file] = self._open(file)
        return self._handles[file]

    @property
    def files(self) -> list[Path]:
        return [self.path / CONFIG_FILE, *sorted(set(self._file_of.values()))]

    @property
    def dtype(self) -> torch.dtype:
        if self._declared_dtype is not None:
            return self._declared_dtype
        name = self._hf_of.get("tok_embeddings.weight") or next(iter(self._file_of))
        stored = self._handle(self._file_of[name]).get_slice(name).get_dtype()
        return _SAFETENSORS_DTYPES.get(stored, torch.float32)

    def names(self) -> list[str]:
        # Unknown names are reported as unexpected under their file's own spelling.
        return list(self._hf_of) + self._unknown

    def stored_types(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for name, file in self._file_of.items():
            counts[self._handle(file).get_slice(name).get_dtype()] += 1
        return dict(counts)

    def file_of(self, name: str) -> Path:
        return self._file_of[self._hf_of.get(name, name)]

    def _read_raw(self, hf_name: str) -> torch.Tensor:
        file = self._file_of[hf_name]
        try:
            return self._handle(file).get_tensor(hf_name)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read tensor {hf_name!r} ({e})") from e

    def read(self, name: str) -> torch.Tensor:
        tensor = self._read_raw(self._hf_of[name])
        heads = permuted_heads(name, self.config)
        if heads is not None and tensor.dim() == 2 and tensor.shape[0] % (2 * heads) == 0:
            tensor = hf_to_meta_rows(tensor, heads)
        return tensor


# ---------------------------------------------------------------- writing


def save_hf(
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    path: Path,
    *,
    max_shard_bytes: int = 5 * 2**30,
    progress: Callable[[Iterable[str]], Iterable[str]] = iter,
    extra: dict[str, torch.Tensor] | None = None,
) -> list[Path]:
    """Write Meta-named `state` as a transformers-loadable directory; returns the files written.
    `extra` tensors are stored under their own (HF) names, e.g. a classifier's `score.weight`."""
    path.mkdir(parents=True, exist_ok=True)
    dtype = state["tok_embeddings.weight"].dtype
    tensors: dict[str, torch.Tensor] = {}
    for name in progress(state):
        heads = permuted_heads(name, config)
        tensor = state[name]
        if heads is not None:
            tensor = meta_to_hf_rows(tensor, heads)
        tensors[NAMES.to_other(name)] = tensor.contiguous()
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    tensors.update({name: t.contiguous() for name, t in (extra or {}).items()})

    shards = _split_shards(tensors, max_shard_bytes)
    written = [path / CONFIG_FILE]
    (path / CONFIG_FILE).write_text(json.dumps(config_to_hf(config, dtype), indent=2) + "\n")
    if len(shards) == 1:
        save_file(shards[0], str(path / SINGLE_FILE), metadata={"format": "pt"})
        return written + [path / SINGLE_FILE]
    weight_map = {}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
        written.append(path / fname)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return written + [path / INDEX_FILE]


def _split_shards(
    tensors: dict[str, torch.Tensor], max_bytes: int
) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards
