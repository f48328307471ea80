"""Prefill and decode: the token-level generation loop over a batch of prompts.

Prompts of different lengths are left-padded to a common length so that every row writes the
same cache slot each step. Each row keeps its own RoPE positions (0 at its first real token),
and an attention mask hides the pad slots, so a row generates what it would generate alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from herd.infer.cache import KVCache
from herd.infer.sampling import SamplingParams, sample, token_logprobs
from herd.model import Transformer


@dataclass
class Step:
    """One new token per row, with its log-probability under the raw model distribution."""

    tokens: list[int]
    logprobs: list[float] | None


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
        return self.model(tokens[:, None], positions, mask, cache=self.cache)[:, -1]


@torch.inference_mode()
def decode_steps(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    logprobs: bool = False,
    compile: bool = False,
) -> Iterator[Step]:
    """Yield up to `max_new_tokens` steps of one new token per prompt.

    The prompts are prefilled in one forward pass, then each step feeds one token per row.
    The caller decides when to stop (stop tokens, stop strings) by leaving the loop; rows that
    are done keep being computed until every row is. Positions must stay inside the model's
    window: the caller bounds `max_new_tokens`. compile: run the decode step through
    torch.compile on a static cache (see herd.infer.compile).
    """
    if max_new_tokens <= 0:
        return
    if compile:
        from herd.infer.compile import CompiledRunner

        runner: EagerRunner = CompiledRunner(model, prompts, max_new_tokens)
    else:
        runner = EagerRunner(model, prompts, max_new_tokens)
    device = model.tok_embeddings.weight.device
    seen, counts = _penalty_state(prompts, params, model.config.vocab_size, device)
    logits = runner.prefill()
    for step in range(max_new_tokens):
        tokens = sample(logits, params, generator, seen, counts)
        yield Step(tokens.tolist(), token_logprobs(logits, tokens).tolist() if logprobs else None)
        if step + 1 == max_new_tokens:
            return
        if seen is not None:
            seen[torch.arange(len(tokens)), tokens] = True
            counts[torch.arange(len(tokens)), tokens] += 1
        logits = runner.decode(tokens, step)


def _penalty_state(
    prompts: Sequence[Sequence[int]], params: SamplingParams, vocab_size: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """seen: the prompt tokens, for the repetition penalty; counts: generated tokens, none yet."""
    if not params.uses_penalties:
        return None, None
    seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
    for row, ids in enumerate(prompts):
        seen[row, list(ids)] = True
    counts = torch.zeros(len(prompts), vocab_size, dtype=torch.long, device=device)
    return seen, counts
