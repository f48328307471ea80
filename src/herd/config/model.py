"""Model architecture configuration and the named presets of every published Llama 3 size."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency scaling: long wavelengths are stretched by `factor`, short ones kept,
    and the band in between blended smoothly."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.factor <= 0 or self.low_freq_factor <= 0:
            raise ValueError(f"rope scaling factors must be positive, got {self}")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"rope scaling needs high_freq_factor > low_freq_factor, got {self}")


def ffn_hidden_dim_from_rule(dim: int, multiplier: float | None, multiple_of: int) -> int:
    """Meta's SwiGLU sizing: 2/3 of 4*dim, times the multiplier, rounded up to `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class ModelConfig:
    """Shape of a Llama-architecture decoder.

    Args:
        dim: width of the residual stream.
        n_layers: number of transformer blocks.
        n_heads: query heads; head_dim = dim // n_heads.
        n_kv_heads: key/value heads (grouped-query attention); None means n_heads.
        vocab_size: rows of the embedding and output matrices.
        ffn_hidden_dim: SwiGLU hidden size. None derives it from `ffn_dim_multiplier` and
            `multiple_of` with Meta's rule.
        norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base.
        rope_scaling: Llama 3.1 frequency scaling, or None.
        max_seq_len: longest context the model is meant for.
        tie_word_embeddings: the output projection reuses the token embedding (Llama 3.2 1B/3B).
    """

    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    n_kv_heads: int | None = None
    ffn_hidden_dim: int | None = None
    ffn_dim_multiplier: float | None = None
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 8192
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.ffn_hidden_dim is None:
            self.ffn_hidden_dim = ffn_hidden_dim_from_rule(
                self.dim, self.ffn_dim_multiplier, self.multiple_of
            )
        if self.ffn_hidden_dim <= 0:
            raise ValueError(f"ffn_hidden_dim must be positive, got {self.ffn_hidden_dim}")
        if not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            raise ValueError(f"norm_eps must be a positive finite number, got {self.norm_eps}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def num_params(self) -> int:
        """Parameter count from the shapes alone (tied embeddings counted once)."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.ffn_hidden_dim
        block = attn + ffn + 2 * self.dim
        embed = self.vocab_size * self.dim
        output = 0 if self.tie_word_embeddings else self.vocab_size * self.dim
        return embed + self.n_layers * block + self.dim + output

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


_LLAMA31_SCALING = RopeScaling(factor=8.0)
_LLAMA32_SCALING = RopeScaling(factor=32.0)

PRESETS: dict[str, ModelConfig] = {
    "llama3-8b": ModelConfig(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_dim_multiplier=1.3,
        multiple_of=1024,
        max_seq_len=8192,
    ),
    "llama3-70b": ModelConfig(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_dim_multiplier=1.3,
        multiple_of=4096,
        max_seq_len=8192,
    ),
    "llama3.1-8b": ModelConfig(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_dim_multiplier=1.3,
        multiple_of=1024,
        rope_scaling=_LLAMA31_SCALING,
        max_seq_len=131072,
    ),
    "llama3.1-70b": ModelConfig(
        dim=8192,
        n_layers=80,
        n_heads=64,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_dim_multiplier=1.3,
        multiple_of=4096,
        rope_scaling=_LLAMA31_SCALING,
        max_seq_len=131072,
    ),
    "llama3.1-405b": ModelConfig(
        dim=16384,
        n_layers=126,
        n_heads=128,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_dim_multiplier=1.2,
        multiple_of=4096,
        rope_scaling=_LLAMA31_SCALING,
        max_seq_len=131072,
    ),
    "llama3.2-1b": ModelConfig(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_dim_multiplier=1.5,
        multiple_of=256,
        rope_scaling=_LLAMA32_SCALING,
        max_seq_len=131072,
        tie_word_embeddings=True,
    ),
    "llama3.2-3b": ModelConfig(
        dim=3072,
        n_layers=28,
        n_heads=24,
        n_kv_heads=8,
        vocab_size=128256,
        ffn_dim_multiplier=1.0,
        multiple_of=256,
        rope_scaling=_LLAMA32_SCALING,
        max_seq_len=131072,
        tie_word_embeddings=True,
    ),
    # Tiny shapes for tests and smoke runs: every code path (GQA, tying, scaling) at toy size.
    "debug": ModelConfig(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=256,
        multiple_of=32,
        max_seq_len=256,
    ),
    "debug-tied": ModelConfig(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=1,
        vocab_size=256,
        multiple_of=32,
        max_seq_len=256,
        tie_word_embeddings=True,
        rope_scaling=RopeScaling(factor=32.0),
    ),
    "debug-128k": ModelConfig(
        dim=128,
        n_layers=2,
        n_heads=8,
        n_kv_heads=1,
        vocab_size=128256,
        multiple_of=64,
        rope_scaling=_LLAMA31_SCALING,
        max_seq_len=2048,
    ),
}


def preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset (see `PRESETS`)."""
    try:
        return dataclasses.replace(PRESETS[name])
    except KeyError:
        raise KeyError(
            f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}"
        ) from None
