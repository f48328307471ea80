"""Prefill and decode: the token-level generation loop over a batch of prompts (the forward
passes themselves are herd.infer.runner's)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from herd.infer.runner import CompiledRunner, EagerRunner
from herd.infer.sampling import SamplingParams, sample, token_logprobs
from herd.model import Transformer


@dataclass
class Step:
    """One new token per row, with its log-probability under the raw model distribution."""

    tokens: list[int]
    logprobs: list[float] | None


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
    runner_type = CompiledRunner if compile else EagerRunner
    runner = runner_type(model, prompts, max_new_tokens)
    device = model.tok_embeddings.weight.device
    seen, counts = penalty_state(prompts, params, model.config.vocab_size, device)
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


def penalty_state(
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
