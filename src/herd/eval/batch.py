"""Generation for evaluation: every prompt of a task goes to the serving engine at once, so
decoding runs with continuous batching (a finished row's place is taken at the next step) and
the few-shot exemplars that all prompts share are computed once and served from the prefix
cache."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from herd.infer.sampling import SamplingParams
from herd.serve.engine import Engine, Request, run_to_completion


@dataclass(frozen=True)
class Completed:
    text: str  # stop string and stop token excluded
    tokens: int  # tokens generated
    finish_reason: str


def complete(
    llama,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop: Sequence[str] = (),
    params: SamplingParams | None = None,
    seed: int | None = None,
    max_batch: int = 32,
) -> list[Completed]:
    """One completion per prompt (token ids that, with max_new_tokens, fit the window);
    greedy unless `params` say otherwise."""
    engine = Engine(
        llama.model, llama.tokenizer, max_batch=max_batch, max_seq_len=llama.max_seq_len
    )
    requests = [
        Request(
            id=str(i),
            prompt=list(ids),
            max_tokens=max_new_tokens,
            params=params or SamplingParams(temperature=0),
            seed=None if seed is None else seed + i,
            stop=tuple(stop),
        )
        for i, ids in enumerate(prompts)
    ]
    shared = list(prompts[0][: common_prefix(prompts)]) if prompts else []
    if len(prompts) > 1 and len(shared) > engine.cache.blocks.block_size:
        # Computed alone first, the shared few-shot prefix is in the prefix cache before the
        # first batch is admitted (admitted together, every row would compute it).
        run_to_completion(engine, [Request(id="prefix", prompt=shared, max_tokens=1)])
    events = run_to_completion(engine, requests)
    done = []
    for request in requests:
        (choice,) = events[request.id]
        done.append(
            Completed(
                "".join(e.text for e in choice),
                sum(e.token is not None for e in choice),
                choice[-1].finish_reason,
            )
        )
    return done


def common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all (one or more) sequences share."""
    first, n = sequences[0], min(len(s) for s in sequences)
    for s in sequences[1:]:
        n = next((i for i in range(n) if s[i] != first[i]), n)
    return n


def fit(ids: list[int], room: int, overflow: str) -> list[int] | None:
    """A prompt cut to `room` tokens: its last ones when overflow is "truncate", None (skip it)
    when "skip" (evaluate checks the choice)."""
    if len(ids) <= room:
        return ids
    return ids[-room:] if overflow == "truncate" else None
