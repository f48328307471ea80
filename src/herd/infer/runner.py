"""Runners: the prefill and decode forward passes of one batch of prompts on its own KV cache.

`EagerRunner` sizes the cache to the request and runs eagerly; `CompiledRunner` uses a static
cache of a bucketed size and runs decode steps through the compiled step of herd.infer.compile.
Prompts of different lengths are left-padded to a common length so that every row writes the
same cache slot each step. Each row keeps its own RoPE positions (0 at its first real token),
and an attention mask hides the pad slots, so a row generates what it would generate alone.

`SequenceRunner` and `CompiledSequenceRunner` serve speculative decoding: one sequence, fed a
few tokens at a time at any cache position, forgetting what the cache held from there on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from herd.infer.cache import KVCache, StaticKVCache
from herd.infer.compile import KernelOps, compiled_feed, compiled_step, slot_bucket
from herd.model import Transformer
from herd.model.llama import causal_mask


class PaddedBatch:
    """Left-padded prompts: token ids, per-row pad counts, slot validity and positions."""

    def __init__(self, prompts: Sequence[Sequence[int]], slots: int, device: torch.device):
        lengths = [len(p) for p in prompts]
        if not lengths or min(lengths) == 0:
            raise ValueError("every prompt needs at least one token")
        self.width = max(lengths)
        self.lengths = torch.tensor(lengths, device=device)
        self.pads = self.width - self.lengths
        rows = [[0] * (self.width - len(p)) + list(p) for p in prompts]
        self.tokens = torch.tensor(rows, dtype=torch.long, device=device)
        self.padded = bool(self.pads.any())
        # valid[b, s]: slot s of row b holds a real token (prompt or generated)
        self.valid = torch.arange(slots, device=device) >= self.pads[:, None]

    def prefill_positions(self) -> torch.Tensor:
        slots = torch.arange(self.width, device=self.tokens.device)
        return (slots - self.pads[:, None]).clamp(min=0) if self.padded else slots

    def prefill_mask(self) -> torch.Tensor | None:
        if not self.padded:
            return None  # plain causal attention
        n = self.width
        causal = torch.ones(n, n, dtype=torch.bool, device=self.tokens.device).tril()
        mask = causal & self.valid[:, None, :n]
        # Pad queries see themselves: a row of nothing but -inf would give NaN keys and values.
        mask |= torch.eye(n, dtype=torch.bool, device=mask.device)
        return mask[:, None]

    def decode_mask(self, end: int) -> torch.Tensor | None:
        return self.valid[:, None, None, :end] if self.padded else None


class EagerRunner:
    """Prefill and decode steps on a KV cache sized to the request, in eager mode."""

    cache_type: type[KVCache] = KVCache

    def __init__(self, model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int):
        self.model = model
        device = model.tok_embeddings.weight.device
        slots = self.cache_slots(max(len(p) for p in prompts) + max_new_tokens)
        self.batch = PaddedBatch(prompts, slots, device)
        self.cache = self.cache_type.for_model(model, len(prompts), slots)

    @staticmethod
    def cache_slots(needed: int) -> int:
        return needed

    def prefill(self) -> torch.Tensor:
        """Last-position logits (batch, vocab) of the prompts."""
        positions, mask = self.batch.prefill_positions(), self.batch.prefill_mask()
        return self.model(self.batch.tokens, positions, mask, cache=self.cache, last_only=True)[
            :, -1
        ]

    def decode(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """Logits after feeding `tokens` (batch,), the `step`-th new token of each row."""
        mask = self.batch.decode_mask(self.cache.length + 1)
        positions = self.batch.lengths[:, None] + step
        with KernelOps():
            return self.model(tokens[:, None], positions, mask, cache=self.cache)[:, -1]


class CompiledRunner(EagerRunner):
    """`EagerRunner` over a static cache of `slot_bucket` slots; decode steps run compiled."""

    cache_type = StaticKVCache
    cache_slots = staticmethod(slot_bucket)

    def __init__(self, model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int):
        super().__init__(model, prompts, max_new_tokens)
        slots = self.cache.slots
        # valid[b, 0, 0, s]: slot s of row b holds a real token written so far
        self.valid = torch.zeros(
            len(prompts), 1, 1, slots, dtype=torch.bool, device=self.batch.tokens.device
        )
        self.next_slot = self.batch.width
        self.step_fn = compiled_step(model)

    def prefill(self) -> torch.Tensor:
        """Eager: a prompt-length pass runs once per request and would compile per length."""
        width, slots = self.batch.width, self.valid.shape[-1]
        mask = self.batch.prefill_mask()
        if mask is None:
            mask = causal_mask(width, 0, self.valid.device)[None, None]
        full = torch.zeros(*mask.shape[:-1], slots, dtype=torch.bool, device=mask.device)
        full[..., :width] = mask
        self.cache.write_slots = torch.arange(width, device=self.valid.device)
        logits = self.model(
            self.batch.tokens,
            self.batch.prefill_positions(),
            full,
            cache=self.cache,
            last_only=True,
        )[:, -1]
        self.valid[:, 0, 0, :width] = self.batch.valid[:, :width]
        self.cache.write_slots = torch.full((1,), width, device=self.valid.device)
        return logits

    def decode(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        # In-place updates keep the compiled graph's inputs the same tensors.
        self.cache.write_slots.fill_(self.next_slot)
        self.valid[..., self.next_slot] = True
        self.next_slot += 1
        positions = self.batch.lengths[:, None] + step
        return self.step_fn(tokens[:, None], positions, self.valid, self.cache)


class SequenceRunner:
    """One sequence on a KV cache of `slots` slots, eager."""

    def __init__(self, model: Transformer, slots: int):
        self.model = model
        self.cache = KVCache.for_model(model, 1, slots)

    def prefill(self, prompt: Sequence[int]) -> torch.Tensor:
        """The prompt's last-position logits (vocab,)."""
        self.cache.reset()
        tokens = torch.tensor([list(prompt)], device=self.cache.keys[0].device)
        return self.model(tokens, cache=self.cache, last_only=True)[0, -1]

    def feed(self, tokens: Sequence[int], start: int) -> torch.Tensor:
        """Logits (len(tokens), vocab) after each of `tokens`, written at slots start.. (the
        cache's content from `start` on is dropped)."""
        self.cache.length = start
        fed = torch.tensor([list(tokens)], device=self.cache.keys[0].device)
        with KernelOps():  # a few rows stream each float32 weight once
            return self.model(fed, cache=self.cache)[0]


class CompiledSequenceRunner(SequenceRunner):
    """`SequenceRunner` on a static cache of `slot_bucket` slots whose feeds run compiled: one
    token through the decode step, more through `compiled_feed`, padded to `width` tokens so
    that one graph serves them all (a graph of SmolLM2 takes ~50 s to compile on 2 cores)."""

    def __init__(self, model: Transformer, slots: int, width: int):
        self.model, self.width = model, width
        # padding is written past the fed tokens: the cache holds room for it
        self.cache = StaticKVCache.for_model(model, 1, slot_bucket(slots + width))
        self.step_fn, self.feed_fn = compiled_step(model), compiled_feed(model)

    def prefill(self, prompt: Sequence[int]) -> torch.Tensor:
        """Eager, like `CompiledRunner.prefill`: one pass per request would compile per length."""
        n, device = len(prompt), self.cache.keys[0].device
        mask = torch.zeros(1, 1, n, self.cache.slots, dtype=torch.bool, device=device)
        mask[0, 0, :, :n] = causal_mask(n, 0, device)
        self.cache.write_slots = torch.arange(n, device=device)
        tokens = torch.tensor([list(prompt)], device=device)
        return self.model(tokens, self.cache.write_slots[None], mask, self.cache, last_only=True)[
            0, -1
        ]

    def feed(self, tokens: Sequence[int], start: int) -> torch.Tensor:
        n, device = len(tokens), self.cache.keys[0].device
        if n > self.width:
            raise ValueError(f"{n} tokens fed to a runner compiled for {self.width}")
        width = 1 if n == 1 else self.width
        slots = torch.arange(start, start + width, device=device)
        # Row i sees the cache before `start` and the fed tokens up to its own; the padding
        # rows come after the real ones, so none of these sees them.
        mask = torch.arange(self.cache.slots, device=device) <= slots[:, None]
        self.cache.write_slots = slots
        fed = torch.tensor([[*tokens] + [tokens[-1]] * (width - n)], device=device)
        if width == 1:
            return self.step_fn(fed, slots[None], mask[None, None], self.cache)
        return self.feed_fn(fed, slots[None], mask[None, None], self.cache)[0, :n]
