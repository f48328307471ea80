"""Rejection sampling on the serving engine: the prefix cache serves every full prompt block of
choices 2..K, greedy K=1 equals Llama.generate, no preemption when admission reserves the
whole output, the verifiers (answers; unit tests in the sandbox, which kills an endless loop
and refuses writes outside its directory), and best/worst selection by a reward model."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from herd.align.reward import RewardModel, score_responses
from herd.align.sample import draw, rejection_sample, write_samples
from herd.align.tasks import (
    Prompt,
    answer_correct,
    arithmetic_problems,
    passes_tests,
    read_prompts,
    verify,
    write_prompts,
)
from herd.checkpoint import load_model
from herd.infer import Llama
from herd.infer.sampling import SamplingParams
from herd.serve.engine import Engine, Request, run_to_completion
from herd.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def llama(llama3_pair) -> Llama:
    return Llama(load_model(llama3_pair[0], dtype=torch.float32), load_tokenizer("llama3"))


LONG = [{"role": "system", "content": "You are careful. " * 20},
        {"role": "user", "content": "Count the sheep in the field, one by one."}]  # fmt: skip


def test_every_full_prompt_block_of_later_choices_is_served(llama):
    k = 6
    ids = llama.chat_format.encode_dialog(LONG, add_generation_prompt=True)
    full_blocks = (len(ids) - 1) // 16
    assert full_blocks >= 5
    texts, stats = draw(llama, [LONG], k, 8, SamplingParams(temperature=1.0), seed=0)
    assert len(texts[0]) == k and len(set(texts[0])) > 1  # sampled, seeded per choice
    assert stats.prefix_blocks_queried == k * full_blocks
    assert stats.prefix_blocks_hit == (k - 1) * full_blocks


def test_greedy_single_sample_equals_generate(llama):
    prompts = [[{"role": "user", "content": f"Say a number near {n}."}] for n in (3, 40, 500)]
    texts, _ = draw(llama, prompts, 1, 12, SamplingParams(temperature=0), seed=0)
    fmt = llama.chat_format
    encoded = [fmt.encode_dialog(p, add_generation_prompt=True) for p in prompts]
    expected = llama.generate(encoded, max_new_tokens=12, temperature=0)
    assert [t[0] for t in texts] == [e.text for e in expected]


def test_admission_reserving_the_output_never_preempts(llama):
    """A cache too small for every choice at once: the default engine preempts and recomputes,
    the reserving one waits instead; the seeded samples are the same."""
    ids = llama.chat_format.encode_dialog(LONG, add_generation_prompt=True)

    def run(preempt: bool):
        engine = Engine(llama.model, llama.tokenizer, num_blocks=24, max_seq_len=256,
                        preempt=preempt).start()  # fmt: skip
        params = SamplingParams(temperature=1.0)
        request = Request(id="r", prompt=list(ids), max_tokens=40, params=params, n=8, seed=3,
                          stop_ids=frozenset())  # fmt: skip
        try:
            events = run_to_completion(engine, [request])
        finally:
            engine.stop()
        return ["".join(e.text for e in c) for c in events["r"]], engine.stats

    texts, stats = run(preempt=True)
    reserved, reserved_stats = run(preempt=False)
    assert stats.preemptions > 0
    assert reserved_stats.preemptions == 0
    assert reserved == texts


def test_answer_verifier():
    assert answer_correct("12 + 5 = 17, so the answer is 17.", "17")
    assert answer_correct("He has 1,250 coins", "1250")
    assert not answer_correct("The answer is 17. Then 18.", "18")
    assert not answer_correct("no number", "4")
    assert answer_correct("  4500 m ", "4500 m") and not answer_correct("4500 m", "4500 cm")


def test_code_verifier_runs_tests_in_the_sandbox(tmp_path):
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    assert passes_tests(good, "assert add(2, 3) == 5")
    assert not passes_tests(good.replace("a + b", "a - b"), "assert add(2, 3) == 5")
    start = time.perf_counter()
    assert not passes_tests("while True:\n    pass", "assert True", timeout=2)
    assert time.perf_counter() - start < 10
    target = tmp_path / "escaped.txt"
    writer = f"open({str(target)!r}, 'w').write('x')\ndef add(a, b):\n    return a + b"
    assert not passes_tests(writer, "assert add(1, 1) == 2")
    assert not target.exists()
    assert verify(Prompt(({"role": "user", "content": "add"},), tests="assert add(1, 2) == 3"),
                  good) == 1.0  # fmt: skip


def test_prompt_files_round_trip(tmp_path):
    problems = arithmetic_problems(20, seed=1)
    assert len({p.messages[0]["content"] for p in problems}) == 20
    path = write_prompts(problems, tmp_path / "p.jsonl")
    assert read_prompts(path) == problems
    exact = tmp_path / "em.jsonl"
    exact.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "1+1?"},
                    {"role": "assistant", "content": "2"},
                ]
            }
        )
        + "\n"
    )
    assert read_prompts(exact) == [Prompt(({"role": "user", "content": "1+1?"},), "2")]


def test_best_and_worst_by_reward_model(llama, llama3_pair, tmp_path: Path):
    rm = RewardModel(load_model(llama3_pair[1], dtype=torch.float32))
    with torch.no_grad():
        rm.score.weight.normal_(0, 1.0)
    prompts = [
        Prompt(({"role": "user", "content": f"Name a colour, take {n}."},)) for n in range(3)
    ]
    results, report = rejection_sample(
        llama, prompts, k=4, reward_model=rm.eval(), max_new_tokens=8, seed=1,
        system_prompts=["Be brief.", "Be formal."],
    )  # fmt: skip
    assert report.samples == 12 and report.preemptions == 0
    for r in results:
        rewards = score_responses(rm, llama.tokenizer, r.messages, r.responses)
        assert r.best == max(range(4), key=rewards.__getitem__)
        assert r.worst == min(range(4), key=rewards.__getitem__)
        assert r.system in ("Be brief.", "Be formal.")
    paths = write_samples(results, tmp_path / "out")
    sft = [json.loads(line) for line in paths["sft"].read_text().splitlines()]
    prefs = [json.loads(line) for line in paths["preferences"].read_text().splitlines()]
    assert len(sft) == 3 and len(prefs) == report.pairs == 3
    assert sft[0]["messages"][-1]["content"] == results[0].responses[results[0].best]
    assert prefs[1]["rejected"] == results[1].responses[results[1].worst]


def test_unverifiable_prompts_need_a_reward_model(llama):
    with pytest.raises(ValueError, match="reward model"):
        rejection_sample(llama, [Prompt(({"role": "user", "content": "hi"},))], k=2)
