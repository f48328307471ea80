"""Speculative decoding against independent references: transformers' greedy generate on the
real SmolLM2, and the target's exact distribution (enumerated by full forward passes) under a
chi-square test on a small vocabulary."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

import herd
from herd.infer import Llama, SamplingParams, decode_steps
from herd.infer.speculative import (
    ModelDrafter,
    NgramDrafter,
    SpeculationStats,
    speculative_steps,
)
from tests.conftest import IdsTokenizer, hf_llama

PROMPTS = [
    "The history of the Roman Empire",
    "def quicksort(items):\n    if len(items) <= 1:\n        return items\n",
    "Photosynthesis is the process by which green plants turn sunlight",
]


@pytest.fixture(scope="module")
def smollm2_greedy(smollm2_path, smollm2_transformers, smollm2_transformers_tokenizer):
    """transformers' greedy 64 tokens for each prompt."""
    out = {}
    for text in PROMPTS:
        ids = smollm2_transformers_tokenizer(text).input_ids
        with torch.no_grad():
            gen = smollm2_transformers.generate(
                torch.tensor([ids]), max_new_tokens=64, do_sample=False, top_p=None
            )
        out[text] = gen[0, len(ids) :].tolist()
    return out


@pytest.fixture(scope="module")
def smollm2_target(smollm2_path):
    return Llama.load(smollm2_path, dtype=torch.float32)


@pytest.mark.parametrize("draft", ["ngram", "int8"])
def test_speculative_greedy_equals_greedy_on_smollm2(smollm2_target, smollm2_greedy, draft):
    from herd.quantize import quantize_model

    target = smollm2_target.model
    if draft == "ngram":
        drafter = "ngram"
    else:  # SmolLM2 quantized to int8: a draft that is mostly, not always, right
        drafter = quantize_model(copy.deepcopy(target), "int8")
    llm = Llama(target, smollm2_target.tokenizer, draft=drafter, draft_tokens=4)
    for text in PROMPTS:
        completion = llm.generate(text, max_new_tokens=64, temperature=0, stop_ids=[])[0]
        assert completion.token_ids == smollm2_greedy[text], text
    stats = llm.speculation
    assert stats.drafted > 0 and 0 < stats.accepted < stats.drafted  # both paths were taken
    if draft == "int8":
        assert stats.acceptance > 0.5


# --- the sampled distribution on a small vocabulary ----------------------------------------

VOCAB = 8
PROMPT = [1, 2, 1, 2, 3]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    def build(seed):
        path = tmp_path_factory.mktemp(f"vocab8-{seed}")
        hf_llama(vocab_size=VOCAB, seed=seed, n_heads=4, n_kv_heads=2).save_pretrained(path)
        return herd.load_model(path).eval()

    return build(0), build(1)


def exact_joint(model, params: SamplingParams, positions: int) -> dict[tuple, float]:
    """P(first `positions` new tokens) under `params`, by a forward pass over every prefix."""
    from herd.infer.sampling import filter_logits

    joint = {(): 1.0}
    for _ in range(positions):
        prefixes = list(joint)
        batch = torch.tensor([PROMPT + list(p) for p in prefixes])
        with torch.no_grad():
            logits = model(batch)[:, -1].float()
        probs = filter_logits(logits, params).softmax(-1)
        joint = {p + (t,): joint[p] * float(probs[i, t])
                 for i, p in enumerate(prefixes) for t in range(VOCAB)}  # fmt: skip
    return joint


def chi_square_p(samples: list[tuple], expected: dict[tuple, float]) -> float:
    """p-value of the observed counts against `expected` probabilities, cells with fewer than
    5 expected draws pooled."""
    n, seen = len(samples), Counter(samples)
    big = [c for c, p in expected.items() if p * n >= 5]
    small = [c for c in expected if c not in big]
    observed = [seen[c] for c in big]
    wanted = [expected[c] for c in big]
    if small:
        observed.append(sum(seen[c] for c in small))
        wanted.append(sum(expected[c] for c in small))
    wanted = [w * n / sum(wanted) for w in wanted]  # float32 probabilities sum to 1 +- 1e-7
    return float(chisquare(observed, wanted).pvalue)


def sample_runs(target, drafter, params, runs, new_tokens=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    stats = SpeculationStats()
    out = []
    for _ in range(runs):
        steps = speculative_steps(target, drafter, PROMPT, new_tokens, params, generator,
                                  k=3, stats=stats)  # fmt: skip
        out.append(tuple(s.tokens[0] for s in steps))
    return out, stats


@pytest.mark.parametrize(
    "drafter_kind, params",
    [
        ("model", SamplingParams(temperature=1.0, top_p=1.0)),
        ("model", SamplingParams(temperature=0.7, top_k=5, top_p=1.0)),
        ("ngram", SamplingParams(temperature=1.0, top_p=0.95)),
    ],
)
def test_sampled_speculation_has_the_targets_distribution(models, drafter_kind, params):
    target, draft = models
    drafter = ModelDrafter(draft) if drafter_kind == "model" else NgramDrafter(max_n=2)
    runs, stats = sample_runs(target, drafter, params, runs=1500)
    assert stats.drafted > 1000 and 0 < stats.accepted < stats.drafted
    exact = exact_joint(target, params, 4)
    # tokens 2-3 come from a verified round of drafts; token 4 may be a bonus token
    pairs = {}
    for seq, p in exact.items():
        pairs[seq[1:3]] = pairs.get(seq[1:3], 0.0) + p
    fourth = {}
    for seq, p in exact.items():
        fourth[seq[3:]] = fourth.get(seq[3:], 0.0) + p
    assert chi_square_p([r[1:3] for r in runs], pairs) > 1e-3
    assert chi_square_p([r[3:] for r in runs], fourth) > 1e-3
    if drafter_kind == "model":  # the test can tell distributions apart: not the draft's
        draft_pairs = {}
        for seq, p in exact_joint(draft, params, 3).items():
            draft_pairs[seq[1:3]] = draft_pairs.get(seq[1:3], 0.0) + p
        assert chi_square_p([r[1:3] for r in runs], draft_pairs) < 1e-6


@pytest.mark.parametrize("compile", [False, True])
def test_greedy_speculation_with_penalties_equals_plain_decode(models, compile):
    target, draft = models
    params = SamplingParams(temperature=0, repetition_penalty=1.3, frequency_penalty=0.5)
    plain = [s.tokens[0] for s in decode_steps(target, [PROMPT], 24, params)]
    for drafter in (ModelDrafter(draft), NgramDrafter()):
        steps = speculative_steps(target, drafter, PROMPT, 24, params, k=4, logprobs=True,
                                  compile=compile)  # fmt: skip
        ours = list(steps)
        assert [s.tokens[0] for s in ours] == plain
    reference = list(decode_steps(target, [PROMPT], 24, params, logprobs=True))
    torch.testing.assert_close(
        torch.tensor([s.logprobs[0] for s in ours]),
        torch.tensor([s.logprobs[0] for s in reference]),
        atol=1e-5,
        rtol=0,
    )


def test_ngram_drafter_proposes_what_followed_the_last_match():
    drafter = NgramDrafter(max_n=3)
    params = SamplingParams(temperature=0)
    assert drafter.propose([5, 6, 7, 8, 9, 5, 6, 7], 3, params, None) == ([8, 9, 5], None)
    assert drafter.propose([5, 6, 7, 8, 9, 5], 2, params, None) == ([6, 7], None)  # 1-gram
    assert drafter.propose([1, 2, 3], 4, params, None) == ([], None)
    assert drafter.propose([4], 4, params, None) == ([], None)


def test_ngram_drafter_finds_the_latest_longest_match():
    """Against a plain search on random contexts over small vocabularies (many matches)."""

    def latest_match(context, k, max_n, min_n):
        for n in range(min(max_n, len(context) - 1), min_n - 1, -1):
            for start in range(len(context) - n - 1, -1, -1):
                if context[start : start + n] == context[-n:]:
                    return context[start + n : start + n + k]
        return []

    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0)
    for trial in range(400):
        vocab, length = 2 + trial % 7, 1 + trial % 60
        context = torch.randint(0, vocab, (length,), generator=gen).tolist()
        max_n = 1 + trial % 4
        drafter = NgramDrafter(max_n=max_n, min_n=1 + trial % max_n)
        expected = latest_match(context, 3, drafter.max_n, drafter.min_n)
        assert drafter.propose(context, 3, params, None) == (expected, None), context


def test_draft_must_share_the_vocabulary(models, tmp_path):
    hf_llama(vocab_size=VOCAB + 4).save_pretrained(tmp_path)
    other = herd.load_model(tmp_path)
    with pytest.raises(ValueError, match="vocabulary"):
        Llama(models[0], tokenizer=None, draft=other)


def test_a_draft_with_a_shorter_window_stops_drafting_at_its_end(models, tmp_path):
    import dataclasses

    target, _ = models
    hf_llama(vocab_size=VOCAB, seed=1, n_heads=4, n_kv_heads=2).save_pretrained(tmp_path)
    short = herd.load_model(tmp_path).eval()
    short.config = dataclasses.replace(short.config, max_seq_len=10)
    params = SamplingParams(temperature=0)
    drafter, proposals = ModelDrafter(short), []
    propose = drafter.propose

    def recorded(context, k, params, generator):
        tokens, q = propose(context, k, params, generator)
        proposals.append((len(context), len(tokens)))
        return tokens, q

    drafter.propose = recorded
    steps = speculative_steps(target, drafter, PROMPT, 20, params, k=3)
    assert [s.tokens[0] for s in steps] == [
        s.tokens[0] for s in decode_steps(target, [PROMPT], 20, params)
    ]
    assert any(n for length, n in proposals if length < 10)
    assert all(length + n <= 10 for length, n in proposals if n)  # inside the draft's window
    assert any(length >= 10 for length, _ in proposals)  # rounds went on past it, undrafted


# --- the serving engine's prompt-lookup speculation ------------------------------------------


def test_engine_speculation_greedy_equals_greedy_on_smollm2(smollm2_target, smollm2_greedy):
    """The three prompts at once through the engine with prompt lookup: transformers' tokens."""
    from herd.serve.engine import Engine, Request, run_to_completion

    tokenizer = smollm2_target.tokenizer
    engine = Engine(smollm2_target.model, tokenizer, draft="ngram", draft_tokens=4)
    requests = [
        Request(str(i), tokenizer.encode(text), 64, stop_ids=frozenset())
        for i, text in enumerate(PROMPTS)
    ]
    events = run_to_completion(engine, requests)
    for i, text in enumerate(PROMPTS):
        assert [e.token for e in events[str(i)][0] if e.token is not None] == smollm2_greedy[text]
    stats = engine.speculation
    assert stats.drafted > 0 and 0 < stats.accepted < stats.drafted


RUNS = 4000


def test_engine_speculation_samples_the_targets_distribution(models):
    from herd.serve.engine import Engine, Request, run_to_completion

    target, _ = models
    # Sharp enough that judging a draft against the wrong position's logits shows (p ~1e-42
    # when every position read the first one's); prompt lookup drafts after tokens 1, 2 and 3.
    params = SamplingParams(temperature=0.5, top_p=1.0)
    engine = Engine(target, IdsTokenizer(VOCAB), max_batch=32, block_size=4, max_seq_len=64,
                    draft="ngram", draft_tokens=3)  # fmt: skip
    requests = [Request(str(i), PROMPT, 4, params, seed=i) for i in range(RUNS)]
    events = run_to_completion(engine, requests)
    runs = [tuple(e.token for e in events[str(i)][0] if e.token is not None) for i in range(RUNS)]
    stats = engine.speculation
    assert stats.drafted > 1000 and 0 < stats.accepted < stats.drafted, stats
    exact = exact_joint(target, params, 4)
    pairs, fourth = {}, {}
    for seq, p in exact.items():
        pairs[seq[1:3]] = pairs.get(seq[1:3], 0.0) + p
        fourth[seq[3:]] = fourth.get(seq[3:], 0.0) + p
    assert chi_square_p([r[1:3] for r in runs], pairs) > 1e-3
    assert chi_square_p([r[3:] for r in runs], fourth) > 1e-3
