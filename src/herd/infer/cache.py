"""A preallocated key/value cache for incremental decoding."""

from __future__ import annotations

import torch

from herd.config import ModelConfig
from herd.infer.parallel import local_kv_heads
from herd.model.rope import inverse_frequencies, rope_cos_sin


class KVCache:
    """Keys (after RoPE) and values of every layer, each (batch, n_kv_heads, slots, head_dim).

    Grouped-query attention caches only the n_kv_heads key/value heads; the attention kernel
    shares them across query heads. All rows write the same slot per step (batched prompts are
    left-padded), so an update is one slice assignment and a read is a view, with no
    allocation per step. The RoPE tables for positions 0..max_position are computed once.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        slots: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        max_position: int | None = None,
        kv_heads: int | None = None,
    ):
        shape = (batch_size, kv_heads or config.n_kv_heads, slots, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.slots = slots
        self.length = 0
        inv_freq = inverse_frequencies(
            config.head_dim, config.rope_theta, config.rope_scaling, torch.device(device)
        )
        positions = torch.arange(max(slots, max_position or 0), device=device)
        self.cos, self.sin = rope_cos_sin(positions, inv_freq)

    @classmethod
    def for_model(
        cls, model: torch.nn.Module, batch_size: int, slots: int, max_position: int | None = None
    ) -> KVCache:
        weight = model.tok_embeddings.weight
        return cls(
            model.config,
            batch_size,
            slots,
            weight.dtype,
            weight.device,
            max_position,
            local_kv_heads(model),  # a tensor-parallel process caches its share of the heads
        )

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (batch, n_kv_heads, seq, head_dim) at the next slots; return all so far."""
        end = self.length + k.shape[2]
        if end > self.slots:
            raise ValueError(f"KV cache overflow: {end} tokens for {self.slots} slots")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions], self.sin[positions]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0


class StaticKVCache(KVCache):
    """A KVCache whose write position is a tensor, for a compiled decode step.

    `update` writes at the slots held in `write_slots` and returns the whole buffers, so every
    step has the same shapes and no Python integer changes between steps: torch.compile traces
    it once. Attention must then be masked over all slots; `forward` callers pass positions and
    a mask explicitly. `length` stays 0: Transformer.forward reads it only to default those.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.write_slots = torch.zeros(1, dtype=torch.long, device=self.keys[0].device)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer].index_copy_(2, self.write_slots, k)
        self.values[layer].index_copy_(2, self.write_slots, v)
        return self.keys[layer], self.values[layer]

    def advance(self, n: int) -> None:
        pass
