"""Sampling functions on hand-made distributions."""

import math

import pytest
import torch

from herd.infer.sampling import (
    SamplingParams,
    draw,
    filter_logits,
    frequency_presence_penalty,
    min_p_filter,
    repetition_penalty,
    sample,
    token_logprobs,
    top_k_filter,
    top_p_filter,
)

# probabilities 1/2, 1/4, 1/8, 1/8 (exact in binary, so cumulative sums have no rounding),
# listed out of order so that the filters must sort
PROBS = torch.tensor([[0.125, 0.5, 0.125, 0.25]])
LOGITS = PROBS.log() + 3.0  # a shift leaves the softmax unchanged


def support(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


@pytest.mark.parametrize(
    "k,expected", [(1, {1}), (2, {1, 3}), (4, {0, 1, 2, 3}), (0, {0, 1, 2, 3}), (9, {0, 1, 2, 3})]
)
def test_top_k_support(k, expected):
    assert support(top_k_filter(LOGITS, k)) == expected


@pytest.mark.parametrize(
    "p,expected",
    [
        (0.01, {1}),  # the top token is always kept
        (0.5, {1}),  # 1/2 already reaches p
        (0.6, {1, 3}),
        (0.75, {1, 3}),  # exactly 3/4: the smallest set reaching p
        (1.0, {0, 1, 2, 3}),
    ],
)
def test_top_p_support(p, expected):
    assert support(top_p_filter(LOGITS, p)) == expected


def test_top_p_takes_one_of_tied_tokens_when_one_is_enough():
    kept = support(top_p_filter(LOGITS, 0.8))  # 1/2 + 1/4 + 1/8 = 0.875 >= 0.8
    assert len(kept) == 3 and {1, 3} < kept


def nucleus_float64(logits: torch.Tensor, p: float) -> torch.Tensor:
    """The definition by a full sort in float64: keep a token when the mass before it is < p."""
    probs, order = logits.double().softmax(-1).sort(-1, descending=True)
    keep_sorted = probs.cumsum(-1) - probs < p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


@pytest.mark.parametrize("scales", [(8.0, 4.0), (4.0, 2.0), (0.05, 3.0), (0.01, 0.02)])
@pytest.mark.parametrize("p", [0.5, 0.9, 0.99])
def test_top_p_on_a_real_vocabulary_matches_a_float64_sort(scales, p):
    # peaked rows (the nucleus among the first candidates), flat ones (hundreds or thousands
    # of tokens) and batches mixing both
    gen = torch.Generator().manual_seed(int(p * 100))
    logits = torch.randn(len(scales), 49152, generator=gen) * torch.tensor(scales)[:, None]
    kept = torch.isfinite(top_p_filter(logits, p))
    assert torch.equal(kept, nucleus_float64(logits, p))
    assert torch.equal(top_p_filter(logits, p)[kept], logits[kept])


@pytest.mark.parametrize(
    "min_p,expected",
    [(0.0, {0, 1, 2, 3}), (0.25, {0, 1, 2, 3}), (0.3, {1, 3}), (0.5, {1, 3}), (0.6, {1})],
)
def test_min_p_support(min_p, expected):
    assert support(min_p_filter(LOGITS, min_p)) == expected


def test_filters_keep_the_kept_logits_unchanged():
    kept = top_k_filter(LOGITS, 2)
    assert torch.equal(kept[0, [1, 3]], LOGITS[0, [1, 3]])


def test_filters_work_per_row():
    logits = torch.stack([LOGITS[0], LOGITS[0].flip(-1)])
    out = top_k_filter(logits, 1)
    assert torch.isfinite(out).nonzero().tolist() == [[0, 1], [1, 2]]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]
    assert torch.equal(repetition_penalty(logits, seen, 1.0), logits)


def test_frequency_and_presence_penalties():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    counts = torch.tensor([[2, 0, 1, 0]])
    out = frequency_presence_penalty(logits, counts, frequency=0.5, presence=1.0)
    assert out.tolist() == [[1.0 - 1.0 - 1.0, 1.0, 1.0 - 0.5 - 1.0, 1.0]]


def test_temperature_scales_logits():
    params = SamplingParams(temperature=0.5, top_p=1.0)
    assert torch.allclose(filter_logits(LOGITS, params), LOGITS * 2)


def test_greedy_is_argmax_after_penalties():
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    greedy = SamplingParams(temperature=0)
    assert sample(logits, greedy).tolist() == [0]
    penalised = SamplingParams(temperature=0, repetition_penalty=2.0)
    seen = torch.tensor([[True, False, False]])
    assert sample(logits, penalised, seen=seen, counts=torch.zeros(1, 3)).tolist() == [1]


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    logits = torch.zeros(4, 1000)
    params = SamplingParams(temperature=1.0, top_p=1.0)

    def draw(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return [t for _ in range(5) for t in sample(logits, params, gen).tolist()]

    assert draw(0) == draw(0)
    assert draw(0) != draw(1)


def test_sampling_follows_the_filtered_distribution():
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0, top_k=2, top_p=1.0)
    draws = sample(LOGITS.expand(20000, -1), params, gen)
    assert set(draws.unique().tolist()) == {1, 3}
    # renormalised over the support: 2/3 and 1/3
    assert (draws == 1).float().mean().item() == pytest.approx(2 / 3, abs=0.02)


def test_token_logprobs_use_the_raw_distribution():
    tokens = torch.tensor([3])
    assert token_logprobs(LOGITS, tokens).item() == pytest.approx(math.log(0.25), abs=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1.0},
        {"top_k": -1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"min_p": 2.0},
        {"repetition_penalty": 0.0},
    ],
)
def test_invalid_parameters_raise(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_draw_follows_the_weights_and_never_picks_a_zero_weight():
    from scipy.stats import chisquare

    weights = torch.tensor([0.0, 3.0, 0.0, 1.0, 6.0, 0.0])  # unnormalised, zeros at both ends
    rows = draw(weights.expand(40_000, -1), torch.Generator().manual_seed(0))
    counts = torch.bincount(rows, minlength=6)
    assert counts[[0, 2, 5]].sum() == 0
    assert chisquare(counts[[1, 3, 4]].tolist(), [12_000, 4_000, 24_000]).pvalue > 1e-3
    one = draw(weights, torch.Generator().manual_seed(1))  # a single row: a 0-d index
    assert one.dim() == 0 and int(one) in (1, 3, 4)
