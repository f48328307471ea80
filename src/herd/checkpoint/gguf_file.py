"""GGUF files (llama.cpp), architecture `llama`, read and written with the `gguf` package."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from herd.checkpoint.base import CheckpointError, NameTable
from herd.config import ModelConfig, RopeScaling
from herd.model.rope import inverse_frequencies

ARCH = "llama"
ROPE_FREQS = "rope_freqs.weight"

NAMES = NameTable(
    {
        "tok_embeddings.weight": "token_embd.weight",
        "norm.weight": "output_norm.weight",
        "output.weight": "output.weight",
        "layers.{}.attention.wq.weight": "blk.{}.attn_q.weight",
        "layers.{}.attention.wk.weight": "blk.{}.attn_k.weight",
        "layers.{}.attention.wv.weight": "blk.{}.attn_v.weight",
        "layers.{}.attention.wo.weight": "blk.{}.attn_output.weight",
        "layers.{}.feed_forward.w1.weight": "blk.{}.ffn_gate.weight",
        "layers.{}.feed_forward.w3.weight": "blk.{}.ffn_up.weight",
        "layers.{}.feed_forward.w2.weight": "blk.{}.ffn_down.weight",
        "layers.{}.attention_norm.weight": "blk.{}.attn_norm.weight",
        "layers.{}.ffn_norm.weight": "blk.{}.ffn_norm.weight",
    }
)

# Weight types herd dequantises; the gguf package implements each of them.
READABLE_TYPES = frozenset(
    {
        QType.F32,
        QType.F16,
        QType.BF16,
        QType.Q8_0,
        QType.Q4_0,
        QType.Q4_1,
        QType.Q5_0,
        QType.Q5_1,
        QType.Q2_K,
        QType.Q3_K,
        QType.Q4_K,
        QType.Q5_K,
        QType.Q6_K,
        QType.IQ4_NL,
        QType.IQ4_XS,
    }
)
_NATIVE_DTYPES = {QType.F32: torch.float32, QType.F16: torch.float16, QType.BF16: torch.bfloat16}

# Output types for `save_gguf`: the GGUF quantisation of 2-D weights and the file-type tag.
WRITE_TYPES = {
    "f32": (QType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (QType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (QType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (QType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (QType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
}
# The block-quantized ones, which `save_model` takes as a dtype only for GGUF.
BLOCK_TYPES = ("q8_0", "q4_0", "q4_1")
_FOUR_BIT = (QType.Q4_0, QType.Q4_1)
_HEAD_NAMES = ("tok_embeddings.weight", "output.weight")


def _float32_repr(x: float) -> float:
    """GGUF stores float32; give back the shortest decimal that rounds to it (1e-5, not 9.99e-6)."""
    return float(str(np.float32(x)))


class GGUFReader:
    format = "gguf"

    def __init__(self, path: Path):
        self.path = path
        try:
            # Copy-on-write map: float tensors become parameters without a copy, and stay writable.
            self._reader = gguf.GGUFReader(str(path), mode="c")
        except Exception as e:  # truncated files surface as ValueError/IndexError/struct errors
            raise CheckpointError(
                f"{path}: not a readable GGUF file (truncated or corrupt?): {e}"
            ) from e
        self._fields = self._reader.fields
        arch = self.field("general.architecture")
        if arch != ARCH:
            raise CheckpointError(
                f"{path}: GGUF architecture is {arch!r}; herd reads the 'llama' architecture"
            )
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._meta_of: dict[str, str] = {}
        self._unknown: list[str] = []
        for name in self._tensors:
            meta = NAMES.to_meta(name)
            if meta is not None:
                self._meta_of[meta] = name
            elif name != ROPE_FREQS:
                self._unknown.append(name)
        self.config = self._config()

    def field(self, key: str, default: Any = None) -> Any:
        f = self._fields.get(key)
        if f is None:
            return default
        return f.contents()

    def metadata(self, prefix: str) -> dict[str, Any]:
        """Raw key/value fields whose key starts with `prefix` (e.g. the tokenizer's)."""
        return {k: f for k, f in self._fields.items() if k.startswith(prefix)}

    def _require(self, key: str) -> Any:
        value = self.field(key)
        if value is None:
            raise CheckpointError(f"{self.path}: GGUF metadata lacks required key {key!r}")
        return value

    def _config(self) -> ModelConfig:
        a = ARCH
        n_heads = self._require(f"{a}.attention.head_count")
        vocab = self.field(f"{a}.vocab_size")
        if vocab is None and "token_embd.weight" in self._tensors:
            vocab = int(self._tensors["token_embd.weight"].shape[-1])
        dim = self._require(f"{a}.embedding_length")
        rope_dim = self.field(f"{a}.rope.dimension_count", dim // n_heads)
        if rope_dim != dim // n_heads:
            raise CheckpointError(
                f"{self.path}: partial rotary ({rope_dim} of {dim // n_heads} dims) is not "
                "part of the Llama architecture"
            )
        theta = float(self.field(f"{a}.rope.freq_base", 10000.0))
        try:
            config = ModelConfig(
                dim=dim,
                n_layers=self._require(f"{a}.block_count"),
                n_heads=n_heads,
                n_kv_heads=self.field(f"{a}.attention.head_count_kv", n_heads),
                vocab_size=vocab,
                ffn_hidden_dim=self._require(f"{a}.feed_forward_length"),
                norm_eps=_float32_repr(self._require(f"{a}.attention.layer_norm_rms_epsilon")),
                rope_theta=_float32_repr(theta),
                max_seq_len=self.field(f"{a}.context_length", 2048),
                tie_word_embeddings="output.weight" not in self._tensors,
            )
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: invalid model configuration: {e}") from e
        if ROPE_FREQS in self._tensors:
            config = config.replace(rope_scaling=self._scaling_from_rope_freqs(config))
        return config

    def _scaling_from_rope_freqs(self, config: ModelConfig) -> RopeScaling:
        """llama.cpp stores Llama 3.1 scaling as per-frequency divisors; recover the parameters."""
        factors = torch.from_numpy(self._dequantize(self._tensors[ROPE_FREQS])).flatten()
        plain = inverse_frequencies(config.head_dim, config.rope_theta, None)
        original = self.field(f"{ARCH}.rope.scaling.original_context_length", 8192)
        factor = float(factors.max())
        for low, high in [(1.0, 4.0)] + [(lo, hi) for lo in (0.5, 1, 2, 4) for hi in (2, 4, 8, 16)]:
            if high <= low:
                continue
            candidate = RopeScaling(factor, float(low), float(high), int(original))
            scaled = inverse_frequencies(config.head_dim, config.rope_theta, candidate)
            if torch.allclose(plain / scaled, factors, rtol=1e-4):
                return candidate
        raise CheckpointError(
            f"{self.path}: its rope_freqs tensor does not match Llama 3.1 rope scaling "
            "for any standard parameters"
        )

    @property
    def files(self) -> list[Path]:
        return [self.path]

    @property
    def dtype(self) -> torch.dtype:
        kinds = {t.tensor_type for t in self._tensors.values() if len(t.shape) == 2}
        if len(kinds) == 1 and (kind := kinds.pop()) in _NATIVE_DTYPES:
            return _NATIVE_DTYPES[kind]
        return torch.float32  # quantised or mixed: dequantise to float32

    def names(self) -> list[str]:
        return list(self._meta_of) + self._unknown

    def stored_types(self) -> dict[str, int]:
        return dict(Counter(t.tensor_type.name for t in self._tensors.values()))

    def file_of(self, name: str) -> Path:
        return self.path

    def _dequantize(self, tensor: Any) -> np.ndarray:
        qtype = tensor.tensor_type
        if qtype not in READABLE_TYPES:
            raise CheckpointError(
                f"{self.path}: tensor {tensor.name!r} has GGUF type {qtype.name}, which herd cannot "
                f"dequantise (supported: {', '.join(sorted(t.name for t in READABLE_TYPES))})"
            )
        try:
            return gguf.quants.dequantize(tensor.data, qtype)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {tensor.name!r}: {e}") from e

    def read(self, name: str) -> torch.Tensor:
        tensor = self._tensors[self._meta_of[name]]
        values = self._dequantize(tensor)
        # GGUF lists dimensions fastest-first; torch wants them slowest-first.
        shape = tuple(int(d) for d in reversed(tensor.shape))
        try:
            values = values.reshape(shape)
        except ValueError as e:
            raise CheckpointError(
                f"{self.path}: tensor {tensor.name!r} holds {values.size} values, not {shape}"
            ) from e
        return torch.from_numpy(values)


# ---------------------------------------------------------------- writing


def _to_numpy(tensor: torch.Tensor, qtype: QType) -> np.ndarray:
    if qtype == QType.BF16:
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    if qtype == QType.F16:
        return tensor.to(torch.float16).contiguous().numpy()
    f32 = tensor.to(torch.float32).contiguous().numpy()
    return f32 if qtype == QType.F32 else gguf.quants.quantize(f32, qtype)


def _weight_type(name: str, tensor: torch.Tensor, wanted: QType) -> QType:
    # As llama.cpp does: norms and vectors stay F32; block quants need rows of whole blocks.
    if tensor.dim() < 2:
        return QType.F32
    # 4-bit files keep the embedding and head at 8 bits, like SmolLM2's published Q4_1 file
    # (and herd's int4, see herd.quantize.core.head_method).
    if wanted in _FOUR_BIT and name in _HEAD_NAMES:
        wanted = QType.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    if tensor.shape[-1] % block:
        return QType.F16
    return wanted


def save_gguf(
    state: dict[str, torch.Tensor],
    config: ModelConfig,
    path: Path,
    *,
    dtype: str = "f32",
    name: str = "herd",
    extra_fields: dict[str, Any] | None = None,
    progress: Callable[[Iterable[str]], Iterable[str]] = iter,
) -> list[Path]:
    """Write a llama.cpp-loadable GGUF. `extra_fields` are raw reader fields or `GGUFValue`s
    (e.g. tokenizer.* entries) copied through unchanged."""
    if dtype not in WRITE_TYPES:
        raise CheckpointError(f"GGUF output type {dtype!r}; choose one of {', '.join(WRITE_TYPES)}")
    qtype, file_type = WRITE_TYPES[dtype]
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.ffn_hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    for key, field in (extra_fields or {}).items():
        _copy_field(writer, key, field)

    if config.rope_scaling is not None:
        s = config.rope_scaling
        writer.add_rope_scaling_orig_ctx_len(s.original_max_position_embeddings)
        plain = inverse_frequencies(config.head_dim, config.rope_theta, None)
        scaled = inverse_frequencies(config.head_dim, config.rope_theta, s)
        writer.add_tensor(ROPE_FREQS, (plain / scaled).numpy())
    for meta_name in progress(state):
        if meta_name == "output.weight" and config.tie_word_embeddings:
            continue
        tensor = state[meta_name].detach().cpu()
        wtype = _weight_type(meta_name, tensor, qtype)
        data = _to_numpy(tensor, wtype)
        raw = None if wtype in (QType.F32, QType.F16) else wtype
        writer.add_tensor(NAMES.to_other(meta_name), data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return [path]


def _copy_field(writer: gguf.GGUFWriter, key: str, field: Any) -> None:
    if isinstance(field, gguf.GGUFValue):  # typed values (herd.tokenizer's GGUF fields)
        writer.add_key_value(key, field.value, field.type, sub_type=field.sub_type)
        return
    value_type = field.types[0]
    value = field.contents()
    if value_type == gguf.GGUFValueType.ARRAY:
        writer.add_key_value(key, value, value_type, sub_type=field.types[-1])
    else:
        writer.add_key_value(key, value, value_type)
