"""`herd sample`: rejection sampling (§4.2.2). For each prompt K responses are drawn (optionally
under one of several system prompts that steer tone and format), scored by a verifier (the
final answer, or unit tests in the sandbox) and/or a reward model, and the best kept for SFT;
the best and the worst, when they differ in score, make a DPO pair.

Sampling runs on herd's serving engine. The K choices of a prompt are one request: the first
computes the prompt and the other K - 1 find its full blocks in the prefix cache, and with
`preempt=False` a choice is admitted only when the cache can hold its whole output, so nothing
is ever recomputed (the paper's rejection-sampling engine does the same).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from herd.align.tasks import Prompt, verify
from herd.infer.sampling import SamplingParams
from herd.serve.engine import Engine, EngineStats, Request, run_to_completion


@dataclass
class Sampled:
    """A prompt's K responses, their verifier scores (None: not checkable) and rewards (None:
    no reward model), best and worst by (verifier, reward)."""

    prompt: Prompt
    system: str | None
    responses: list[str]
    verified: list[float | None]
    rewards: list[float | None] = field(default_factory=list)

    def keys(self) -> list[tuple[float, float]]:
        rewards = self.rewards or [None] * len(self.responses)
        return [(v or 0.0, r or 0.0) for v, r in zip(self.verified, rewards)]

    @property
    def best(self) -> int:
        keys = self.keys()
        return max(range(len(keys)), key=lambda i: keys[i])

    @property
    def worst(self) -> int:
        keys = self.keys()
        return min(range(len(keys)), key=lambda i: keys[i])

    @property
    def messages(self) -> list[dict[str, Any]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.prompt.messages]


@dataclass
class SampleReport:
    prompts: int
    samples: int
    generated_tokens: int
    seconds: float
    # full prompt blocks served from the prefix cache, of all looked up: at most (K - 1) / K,
    # when every block of choices 2..K is served and only the first choice computes them
    prefix_hit_rate: float
    preemptions: int
    solved: int  # prompts with at least one verified-correct sample
    pairs: int  # prompts whose best and worst differ

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds


def draw(
    llama,
    messages: Sequence[Sequence[dict[str, Any]]],
    k: int,
    max_new_tokens: int,
    params: SamplingParams,
    seed: int,
    max_batch: int = 32,
    preempt: bool = False,
    progress: bool = False,
) -> tuple[list[list[str]], EngineStats]:
    """K sampled responses per dialog prompt, and the engine's counters."""
    fmt = llama.chat_format
    prompts = [list(fmt.encode_dialog(list(m), add_generation_prompt=True)) for m in messages]
    longest = max(map(len, prompts)) + max_new_tokens
    if longest > llama.max_seq_len:
        raise ValueError(
            f"a prompt of {longest - max_new_tokens} tokens and {max_new_tokens} new ones exceed "
            f"the {llama.max_seq_len}-token window: lower --max-new-tokens or shorten the prompt"
        )
    engine = Engine(
        llama.model, llama.tokenizer, max_batch=max_batch, max_seq_len=llama.max_seq_len,
        preempt=preempt,
    )  # fmt: skip
    requests = [
        Request(id=str(i), prompt=ids, max_tokens=max_new_tokens, params=params, n=k,
                seed=seed + i * k)
        for i, ids in enumerate(prompts)
    ]  # fmt: skip
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"sampling {k} x {len(prompts)} prompts", total=k * len(prompts))
        events = run_to_completion(engine, requests, lambda e: bar.advance(task))
    texts = [["".join(e.text for e in choice) for choice in events[r.id]] for r in requests]
    return texts, engine.stats


def rejection_sample(
    llama,
    prompts: Sequence[Prompt],
    k: int = 16,
    reward_model=None,
    system_prompts: Sequence[str] = (),
    max_new_tokens: int = 256,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    max_batch: int = 32,
    progress: bool = False,
) -> tuple[list[Sampled], SampleReport]:
    """Draw, score and rank K responses per prompt. A prompt's system prompt, when some are
    given, is picked by a seeded draw. Prompts need a verifier (answer or tests) unless a
    reward model is given."""
    import time

    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if reward_model is None and not all(p.checkable for p in prompts):
        raise ValueError(
            "some prompts have neither an answer nor tests to verify, and no reward model was "
            'given: pass --reward-model, or add "answer"/"tests" to every prompt'
        )
    rng = np.random.default_rng(seed)
    systems = [
        str(system_prompts[rng.integers(len(system_prompts))]) if system_prompts else None
        for _ in prompts
    ]
    results = [Sampled(p, s, [], []) for p, s in zip(prompts, systems)]
    start = time.perf_counter()
    texts, stats = draw(
        llama, [r.messages for r in results], k, max_new_tokens,
        SamplingParams(temperature=temperature, top_p=top_p), seed, max_batch, progress=progress,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    for result, responses in zip(results, texts):
        result.responses = responses
        result.verified = [verify(result.prompt, r) for r in responses]
    if reward_model is not None:
        from herd.align.reward import score_responses

        for result in results:
            result.rewards = score_responses(
                reward_model, llama.tokenizer, result.messages, result.responses
            )
    report = SampleReport(
        prompts=len(prompts),
        samples=k * len(prompts),
        generated_tokens=stats.generated_tokens,
        seconds=seconds,
        prefix_hit_rate=stats.prefix_blocks_hit / max(stats.prefix_blocks_queried, 1),
        preemptions=stats.preemptions,
        solved=sum(any(v == 1.0 for v in r.verified) for r in results),
        pairs=sum(r.keys()[r.best] > r.keys()[r.worst] for r in results),
    )
    return results, report


def write_samples(results: Sequence[Sampled], out: str | Path) -> dict[str, Path]:
    """OUT/samples.jsonl (every response with its scores), OUT/sft.jsonl (each prompt's best,
    as chat JSONL for herd finetune) and OUT/preferences.jsonl (best vs worst where their
    scores differ, for herd dpo and herd reward train). A prompt whose best response the
    verifier finds wrong gives neither."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.jsonl" for name in ("samples", "sft", "preferences")}
    with (
        paths["samples"].open("w") as samples,
        paths["sft"].open("w") as sft,
        paths["preferences"].open("w") as prefs,
    ):
        for r in results:
            keys = r.keys()
            samples.write(json.dumps({
                **r.prompt.record(), "system": r.system, "responses": r.responses,
                "verified": r.verified, "rewards": r.rewards or None, "best": r.best,
            }) + "\n")  # fmt: skip
            best, worst = r.best, r.worst
            if r.verified[best] == 0.0:
                continue  # a wrong best answer is no SFT target, nor a chosen response
            sft.write(json.dumps({
                "messages": [*r.messages, {"role": "assistant", "content": r.responses[best]}],
                "score": list(keys[best]),
            }) + "\n")  # fmt: skip
            if keys[best] > keys[worst]:
                prefs.write(json.dumps({
                    "prompt": r.messages, "chosen": r.responses[best],
                    "rejected": r.responses[worst], "scores": [list(keys[best]), list(keys[worst])],
                }) + "\n")  # fmt: skip
    return paths


def read_samples(path: str | Path) -> list[Sampled]:
    """The results `write_samples` wrote to OUT/samples.jsonl."""
    results = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        prompt = Prompt(tuple(r["prompt"]), r.get("answer"), r.get("tests"))
        results.append(
            Sampled(prompt, r["system"], r["responses"], r["verified"], r["rewards"] or [])
        )
    return results


def verified_pairs(results: Sequence[Sampled], per_prompt: int = 2) -> list[dict[str, Any]]:
    """Preference records a verifier derives from samples: a right response over a wrong one,
    up to `per_prompt` distinct pairs per prompt (reward-model training data)."""
    records = []
    for r in results:
        right = list(dict.fromkeys(t for t, v in zip(r.responses, r.verified) if v == 1.0))
        wrong = list(dict.fromkeys(t for t, v in zip(r.responses, r.verified) if v == 0.0))
        for chosen, rejected in list(zip(right, wrong))[:per_prompt]:
            records.append({"prompt": r.messages, "chosen": chosen, "rejected": rejected})
    return records
