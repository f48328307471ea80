"""Next-token selection: pure functions over logits (batch, vocab).

The order is the usual one: penalties on the raw logits, then temperature, then the support
filters (top-k, top-p, min-p), then a draw from the softmax. Filters mark dropped tokens -inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NUCLEUS_CANDIDATES = (64, 1024)  # top-p looks for its nucleus among these many first
SPARSE_DRAW = 8  # draw among the non-zero weights when they are under 1/8 of a row


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy (argmax after the penalties). top_k 0, top_p 1 and min_p 0 turn
    their filter off; repetition_penalty 1 and frequency/presence 0 turn the penalties off."""

    temperature: float = 0.6
    top_k: int = 0
    top_p: float = 0.9
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1
            or self.frequency_penalty != 0
            or self.presence_penalty != 0
        )


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty for tokens already seen (bool (batch, vocab)): positive logits are divided
    by `penalty`, negative ones multiplied, so a penalty > 1 always makes them less likely."""
    if penalty == 1:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def frequency_presence_penalty(
    logits: torch.Tensor, counts: torch.Tensor, frequency: float, presence: float
) -> torch.Tensor:
    """OpenAI's penalties: logit -= frequency * count + presence * (count > 0), where counts
    (batch, vocab) are how often each token was generated so far."""
    if frequency == 0 and presence == 0:
        return logits
    counts = counts.to(logits.dtype)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value are all kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probabilities sum to >= p.
    A token is kept when the mass strictly before it is < p, so the top token always is."""
    if p >= 1:
        return logits
    # The nucleus is usually a few dozen tokens: find it among the top few candidates and sort
    # the whole vocabulary only when they hold less than p (a full sort of 128K logits is
    # ~10 ms on 2 cores, a fifth of a 1B decode step; top 64 is ~0.3 ms).
    normaliser = logits.logsumexp(dim=-1, keepdim=True)
    for candidates in (*NUCLEUS_CANDIDATES, logits.shape[-1]):
        candidates = min(candidates, logits.shape[-1])
        top, order = torch.topk(logits, candidates, dim=-1)  # sorted, largest first
        probs = (top - normaliser).exp()
        if candidates == logits.shape[-1] or bool((probs.sum(-1) >= p).all()):
            break
    keep_sorted = probs.cumsum(dim=-1) - probs < p
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is >= min_p times the top token's probability."""
    if min_p <= 0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_penalties(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """seen: tokens of the prompt or generated so far (repetition penalty, as transformers);
    counts: generated tokens only (frequency/presence, as OpenAI)."""
    if seen is not None:
        logits = repetition_penalty(logits, seen, params.repetition_penalty)
    if counts is not None:
        logits = frequency_presence_penalty(
            logits, counts, params.frequency_penalty, params.presence_penalty
        )
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p. Needs temperature > 0."""
    logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token ids (batch,) from logits (batch, vocab). A seeded generator makes the draw
    reproducible."""
    logits = apply_penalties(logits.float(), params, seen, counts)
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, params).softmax(dim=-1)
    return draw(probs, generator)


def draw(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of non-negative `weights` (..., n), with probability proportional to
    its weight: `torch.multinomial` over the row's non-zero entries in vocabulary order when
    they are few (after top-p, usually a few dozen: ~0.1 ms where the whole 49K row takes
    ~1.1 ms on 2 cores), over the whole row otherwise. multinomial's exponential race keeps a
    seeded draw stable under rounding-sized changes of the weights (a batch recomputed after
    preemption), which inverting a float32 cumulative sum over 128K tiny steps does not."""
    rows = weights.reshape(-1, weights.shape[-1])
    support = rows > 0
    if int(support.sum(-1).max()) * SPARSE_DRAW > rows.shape[-1]:
        picked = torch.multinomial(rows, 1, generator=generator).squeeze(-1)
    else:
        picked = torch.stack([
            kept[torch.multinomial(row[kept], 1, generator=generator)[0]]
            for row, kept in zip(rows, (s.nonzero().squeeze(-1) for s in support))
        ])  # fmt: skip
    return picked.reshape(weights.shape[:-1])


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under the raw model distribution: log-softmax of the unmodified logits,
    before penalties, temperature and filters."""
    return logits.float().log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
