"""Run tasks on a model: `evaluate(llama, "arc_challenge", limit=100)`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from herd.eval.batch import complete, fit
from herd.eval.niah import run_niah
from herd.eval.score import (
    answer_metrics,
    choice_metrics,
    code_metrics,
    encode_question,
    fits,
    score_rows,
)
from herd.eval.tasks import get_task

OVERFLOW = ("skip", "truncate")


def evaluate(
    llama: Any,
    task: str,
    limit: int | None = None,
    shots: int | None = None,
    max_new_tokens: int = 256,
    overflow: str = "skip",
    max_batch: int = 32,
    lengths: Sequence[int] | None = None,
    trials: int = 1,
    controls: bool = False,
    chat: bool = False,
) -> dict:
    """Scores of one task on a `herd.Llama`: metrics (mean, stderr, n), per-item records and
    `skipped`, the items whose prompt does not fit the model's window. `limit` takes the
    task's first items; `shots` defaults to the task's first setting. overflow "truncate"
    scores those items on their prompt's last tokens instead of skipping them.

    Needle in a haystack takes `lengths` (default: 256 doubling to the window), `trials` per
    (length, depth) cell and, with `controls`, scores prompts whose needles carry other
    values too.

    chat: a generative task's prompt goes to the model as one user message in its chat format
    (and a code reply's fenced block is what runs)."""
    spec = get_task(task)
    shots = spec.shots[0] if shots is None else shots
    if shots not in spec.shots:
        raise ValueError(
            f"{task} comes with {' or '.join(map(str, spec.shots))} shots, not {shots}"
        )
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {', '.join(OVERFLOW)}, not {overflow!r}")
    if spec.kind == "niah":
        needles, retrieve = spec.needles
        result = run_niah(llama, lengths, needles=needles, retrieve=retrieve, trials=trials,
                          controls=controls)  # fmt: skip
        return {"task": task, "shots": 0, "skipped": 0, **result}
    items = spec.load(shots)[:limit]
    window = llama.max_seq_len
    if spec.kind == "choice":
        rows = [encode_question(llama.tokenizer, q) for q in items]
        kept = [i for i, row in enumerate(rows) if overflow == "truncate" or fits(*row, window)]
        scores = score_rows(llama.model, [rows[i] for i in kept], window)
        result = choice_metrics([items[i] for i in kept], scores)
    else:
        max_new_tokens = min(max_new_tokens, window - 1)
        encode = _as_user_message(llama) if chat else llama.encode
        prompts = [fit(encode(p.prompt), window - max_new_tokens, overflow) for p in items]
        kept = [i for i, ids in enumerate(prompts) if ids is not None]
        stop = () if chat else spec.stop  # a chat reply ends at the end-of-turn token
        done = complete(
            llama, [prompts[i] for i in kept], max_new_tokens, stop, max_batch=max_batch
        )
        texts = [d.text for d in done]
        if spec.kind == "code":
            result = code_metrics([items[i] for i in kept], texts, replies=chat)
        else:
            result = answer_metrics([items[i] for i in kept], texts)
    return {"task": task, "shots": shots, "skipped": len(items) - len(kept), **result}


def _as_user_message(llama):
    def encode(prompt: str) -> list[int]:
        message = {"role": "user", "content": prompt.strip()}
        return llama.chat_format.encode_dialog([message], add_generation_prompt=True)

    return encode
