"""Run tasks on a model: `evaluate(llama, "arc_challenge", limit=100)`."""

from __future__ import annotations

from typing import Any

from herd.eval.score import choice_metrics, generate_answers, run_code, score_choices
from herd.eval.tasks import get_task


def evaluate(
    llama: Any,
    task: str,
    limit: int | None = None,
    shots: int | None = None,
    max_new_tokens: int = 256,
) -> dict:
    """Scores of one task on a `herd.Llama`: metrics (mean, stderr, n) and per-item records.
    `limit` takes the task's first items; `shots` defaults to the task's first setting."""
    spec = get_task(task)
    shots = spec.shots[0] if shots is None else shots
    if shots not in spec.shots:
        raise ValueError(
            f"{task} comes with {' or '.join(map(str, spec.shots))} shots, not {shots}"
        )
    items = spec.load(shots)[:limit]
    if spec.kind == "choice":
        result = choice_metrics(items, score_choices(llama.model, llama.tokenizer, items))
    elif spec.kind == "code":
        result = run_code(llama, items, spec.stop, max_new_tokens)
    else:
        result = generate_answers(llama, items, spec.stop, max_new_tokens)
    return {"task": task, "shots": shots, **result}
