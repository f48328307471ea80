"""Speculative decoding: a cheap drafter proposes k tokens, the target checks them in one pass.

Each round feeds the target the last emitted token and the k drafts together, giving k + 1
next-token distributions for the cost of about one decode step (a batch-1 step reads every
weight once whatever its length). Drafts are accepted left to right by the rule of Leviathan
et al. and Chen et al. (2023): draft x with proposal probability q(x) is kept with probability
min(1, p(x) / q(x)); the first rejected one is replaced by a draw from max(p - q, 0)
renormalised; if all k are kept, one more token is drawn from the last distribution. The
output then has exactly the target's distribution (penalties, temperature and filters
included), and under greedy decoding it is the target's greedy output.

Drafters: another, smaller model with the same vocabulary (`ModelDrafter`), or prompt lookup
(`NgramDrafter`): the tokens that followed the last occurrence of the context's final n-gram,
which pays off when the output repeats its input (code edits, extraction, summaries).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from herd.infer.cache import KVCache
from herd.infer.compile import KernelOps
from herd.infer.generate import Step, penalty_state
from herd.infer.runner import CompiledSequenceRunner, SequenceRunner
from herd.infer.sampling import (
    SamplingParams,
    apply_penalties,
    draw,
    filter_logits,
    token_logprobs,
)
from herd.model import Transformer


@runtime_checkable
class Drafter(Protocol):
    def propose(
        self,
        context: Sequence[int],
        k: int,
        params: SamplingParams,
        generator: torch.Generator | None,
    ) -> tuple[list[int], torch.Tensor | None]:
        """Up to k tokens to follow `context` and, when they were sampled, the distributions
        (n, vocab) they were drawn from; None means each proposal was certain."""
        ...

    def rewind(self, length: int) -> None:
        """Only the first `length` tokens of the last context and its proposals were kept."""
        ...


@dataclass
class SpeculationStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the context's last n tokens
    (n from `max_n` down to `min_n`) and propose the tokens that followed it."""

    def __init__(self, max_n: int = 3, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.max_n, self.min_n = max_n, min_n

    def propose(self, context, k, params, generator):
        context = list(context)
        ids = np.asarray(context)
        # Where an earlier n-gram can end: at a copy of the last token, before the last token.
        # Vectorised, as the serving engine asks for every running sequence at every step.
        ends = np.flatnonzero(ids[:-1] == ids[-1]) if len(context) > 1 else ids[:0]
        for n in range(min(self.max_n, len(context) - 1), self.min_n - 1, -1):
            found = ends[ends >= n - 1]
            for back in range(1, n):
                found = found[ids[found - back] == ids[-1 - back]]
            if found.size:
                return context[found[-1] + 1 : found[-1] + 1 + k], None
        return [], None

    def rewind(self, length: int) -> None:
        pass


class ModelDrafter:
    """A small model with the target's vocabulary, drafting from its own KV cache: sampled at
    the request's temperature and filters (argmax under greedy decoding)."""

    def __init__(self, model: Transformer):
        self.model = model.eval()
        self.cache: KVCache | None = None

    def start(self, slots: int) -> None:
        self.cache = KVCache.for_model(self.model, 1, min(slots, self.model.config.max_seq_len))

    @torch.inference_mode()
    def propose(self, context, k, params, generator):
        assert self.cache is not None, "call start() first"
        k = min(k, self.cache.slots - len(context))  # a draft with a shorter window stops early
        if k <= 0:
            return [], None
        device = self.model.tok_embeddings.weight.device
        new = torch.tensor([list(context[self.cache.length :])], device=device)
        logits = self._next_logits(new)
        tokens, dists = [], []
        for i in range(k):
            if params.greedy:
                token = int(logits.argmax(-1))
            else:
                probs = filter_logits(logits, params).softmax(-1)
                token = int(draw(probs, generator))
                dists.append(probs[0])
            tokens.append(token)
            if i + 1 < k:
                logits = self._next_logits(torch.tensor([[token]], device=device))
        return tokens, (torch.stack(dists) if dists else None)

    def _next_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        with KernelOps():  # a few rows a pass: each float32 weight streamed once
            return self.model(tokens, cache=self.cache, last_only=True)[:, -1].float()

    def rewind(self, length: int) -> None:
        assert self.cache is not None
        self.cache.length = min(self.cache.length, length)


def check_vocab(target: Transformer, draft: Transformer) -> None:
    t, d = target.config.vocab_size, draft.config.vocab_size
    if t != d:
        raise ValueError(
            f"the draft model's vocabulary has {d} tokens and the target's {t}: a draft must "
            "share the target's tokenizer (use a smaller model of the same family, or ngram)"
        )


@torch.inference_mode()
def speculative_steps(
    model: Transformer,
    drafter: Drafter,
    prompt: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    logprobs: bool = False,
    k: int = 4,
    stats: SpeculationStats | None = None,
    compile: bool = False,
) -> Iterator[Step]:
    """Yield up to `max_new_tokens` steps of one token for one prompt, as `decode_steps` does
    for a batch of one, drafting `k` tokens a round. compile: the target's passes after the
    prompt run compiled (`CompiledSequenceRunner`)."""
    if max_new_tokens <= 0:
        return
    if k < 1:
        raise ValueError(f"the number of draft tokens must be >= 1, got {k}")
    stats = stats if stats is not None else SpeculationStats()
    device = model.tok_embeddings.weight.device
    slots = len(prompt) + max_new_tokens + k
    target = (
        CompiledSequenceRunner(model, slots, k + 1) if compile else SequenceRunner(model, slots)
    )
    if isinstance(drafter, ModelDrafter):
        drafter.start(slots)
    seen, counts = penalty_state([prompt], params, model.config.vocab_size, device)
    context = list(prompt)
    rows = target.prefill(context)[None]
    drafts: list[int] = []
    q = None
    emitted = 0
    while True:
        # rows[i] is the target's next-token logits before drafts[i]; rows[-1] follows them all
        for i, row in enumerate(rows):
            drafted = i < len(drafts)
            token, kept = judge(
                apply_penalties(row[None].float(), params, seen, counts),
                drafts[i] if drafted else None,
                q[i] if q is not None and drafted else None,
                params,
                generator,
            )
            chosen = torch.tensor([token], device=device)
            yield Step([token], token_logprobs(row[None], chosen).tolist() if logprobs else None)
            emitted += 1
            context.append(token)
            if seen is not None:
                seen[0, token] = True
                counts[0, token] += 1
            stats.accepted += kept
            if not kept or emitted == max_new_tokens:
                break
        if emitted == max_new_tokens:
            return
        # The target's cache holds the context but its last token; the feed overwrites
        # whatever rejected drafts left after it.
        drafter.rewind(len(context) - 1)
        drafts, q = drafter.propose(
            context, min(k, max_new_tokens - emitted - 1), params, generator
        )
        stats.rounds += 1
        stats.drafted += len(drafts)
        rows = target.feed([context[-1], *drafts], len(context) - 1)


def judge(
    logits: torch.Tensor,
    draft: int | None,
    q: torch.Tensor | None,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> tuple[int, bool]:
    """The token emitted at one position, and whether it is the draft. logits (1, vocab) are the
    target's after penalties; q is the draft's proposal distribution (None: a certain one)."""
    if params.greedy:
        best = int(logits.argmax(-1))
        return best, draft is not None and best == draft
    p = filter_logits(logits, params).softmax(-1)[0]
    if draft is None:
        return int(draw(p, generator)), False
    q_draft = 1.0 if q is None else float(q[draft])
    u = float(torch.rand((), generator=generator, device=p.device))
    if u * q_draft < float(p[draft]):
        return draft, True
    residual = (p - q).clamp(min=0) if q is not None else p.clone()
    if q is None:
        residual[draft] = 0
    if float(residual.sum()) <= 0:  # p == q: rejection had probability zero
        residual = p
    return int(draw(residual, generator)), False
