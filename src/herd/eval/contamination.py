"""Contamination of benchmarks by training data (paper §5.1.4): for every benchmark example, the
fraction of its token n-grams (default 8) that occur in the training shards; examples at or
above a threshold are "dirty". Scoring a model on the clean and dirty subsets separately shows
whether it does better on what it may have seen.

An example's text is its 0-shot prompt followed by its answer (the gold choice, the reference
answer, the canonical solution), tokenised with the shards' tokenizer. Corpus n-grams are
64-bit rolling hashes, kept sorted in memory (8 bytes per corpus token); n-grams that span two
documents (contain an end-of-text token) are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from herd.data.shards import load_shards
from herd.eval.tasks import CodeProblem, Problem, Question, get_task

BASE = np.uint64(1_000_003)


def ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """Hash of every n-gram of `ids` (len(ids) - n + 1 of them), arithmetic modulo 2**64."""
    ids = np.asarray(ids, dtype=np.uint64)
    count = len(ids) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * BASE + ids[j : j + count] + np.uint64(1)
    return h


def corpus_ngrams(shard_dir: str | Path, n: int = 8, separator: int | None = None) -> np.ndarray:
    """Sorted unique n-gram hashes of every shard in `shard_dir`, without those that contain
    `separator` (the end-of-text id that ends each document)."""
    found = []
    for shard in load_shards(shard_dir):
        ids = np.asarray(shard.token_ids(), dtype=np.int64)
        h = ngram_hashes(ids, n)
        if separator is not None and len(h):
            ends = np.concatenate([[0], np.cumsum(ids == separator)])
            h = h[(ends[n:] - ends[:-n]) == 0]  # no separator among the n tokens
        found.append(h)
    if not found:
        raise ValueError(f"{shard_dir}: no shards (herd tokenize writes them)")
    return np.unique(np.concatenate(found))


def example_text(item) -> str:
    if isinstance(item, Question):
        return item.context + item.choices[item.gold]
    if isinstance(item, Problem):
        return f"{item.prompt} {item.answer}"
    if isinstance(item, CodeProblem):
        return item.prompt + item.canonical
    raise TypeError(f"no text for {type(item).__name__}")


def contamination_scores(tokenizer, corpus: np.ndarray, items: Sequence, n: int = 8) -> list[float]:
    """For each item, the fraction of its n-grams found in `corpus` (0 for an item shorter
    than n tokens)."""
    scores = []
    for item in items:
        h = ngram_hashes(np.asarray(tokenizer.encode(example_text(item))), n)
        if len(h) == 0:
            scores.append(0.0)
            continue
        at = np.searchsorted(corpus, h).clip(max=len(corpus) - 1)
        scores.append(float((corpus[at] == h).mean()) if len(corpus) else 0.0)
    return scores


def task_items(name: str, limit: int | None = None) -> list:
    """A task's items with their 0-shot prompts (its first setting if it has no 0-shot)."""
    task = get_task(name)
    if task.load is None:
        raise ValueError(f"{name} is built for each model; it has no fixed examples to check")
    return task.load(0 if 0 in task.shots else task.shots[0])[:limit]


def contamination_report(
    shard_dir: str | Path, tasks: Sequence[str], tokenizer, llama=None, n: int = 8,
    threshold: float = 0.5, limit: int | None = None,
) -> list[dict]:  # fmt: skip
    """Per task: how many examples are dirty (score >= threshold), the mean score, each
    example's score and, given a model, its score on the clean and the dirty subset."""
    from herd.eval.run import evaluate
    from herd.eval.score import summary

    corpus = corpus_ngrams(shard_dir, n, tokenizer.eos_id)
    report = []
    for name in tasks:
        items = task_items(name, limit)
        scores = contamination_scores(tokenizer, corpus, items, n)
        dirty = {item.id for item, s in zip(items, scores) if s >= threshold}
        entry = {
            "task": name, "n": len(items), "n_dirty": len(dirty), "ngram": n,
            "threshold": threshold, "mean_score": float(np.mean(scores)) if scores else 0.0,
            "examples": [{"id": item.id, "score": s} for item, s in zip(items, scores)],
        }  # fmt: skip
        if llama is not None:
            result = evaluate(llama, name, limit=limit)
            metric = next(m for m in ("acc", "exact_match", "pass@1") if m in result)
            records = result["records"]
            entry["metric"] = metric
            entry["clean"] = summary([r["correct"] for r in records if r["id"] not in dirty])
            entry["dirty"] = summary([r["correct"] for r in records if r["id"] in dirty])
        report.append(entry)
    return report
