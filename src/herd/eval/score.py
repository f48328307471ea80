"""Scoring: log-likelihoods of a question's choices with its context computed once, generative
answers by greedy decoding, and the metrics (accuracy, length-normalised accuracy, exact match,
bootstrap standard errors).

Choices share their context in one row: the context's tokens, then every continuation's, laid
end to end, with a mask under which a continuation sees the context and its own earlier tokens
but no other continuation, and positions that restart after the context for each. One forward
pass of that row gives every choice's log-likelihood; K choices cost one context, not K.
Continuations are tokenised as lm-eval does: the context and context + continuation are
encoded whole, and the continuation is what the second adds (trailing spaces of the context
move to the continuation first).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from herd.eval.batch import common_prefix
from herd.eval.sandbox import run_program
from herd.eval.tasks import CodeProblem, Problem, Question
from herd.infer.cache import KVCache


@dataclass
class ChoiceScores:
    logprobs: list[float]  # summed over each continuation's tokens
    greedy: list[bool]  # every token of the continuation is the argmax


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's `_encode_pair` makes them."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    bos = getattr(tokenizer, "add_bos", tokenizer.bos_id is not None)
    whole = tokenizer.encode(context + continuation, bos=bos)
    head = tokenizer.encode(context, bos=bos)
    return head, whole[len(head) :]


def _row(context: list[int], continuations: list[list[int]]):
    """Tokens, positions, branch ids (0: context, i: continuation i) and the predictor index of
    every continuation token, for one shared-context row. A continuation's last token is only
    ever predicted, never an input, so the row holds all but the last of each."""
    if not context:  # the first continuation token would have nothing to be predicted from
        raise ValueError("a question's context is empty and the tokenizer adds no BOS")
    tokens, positions, branch = list(context), list(range(len(context))), [0] * len(context)
    predictors = []
    for i, cont in enumerate(continuations, 1):
        start = len(tokens)
        tokens += cont[:-1]
        positions += range(len(context), len(context) + len(cont) - 1)
        branch += [i] * (len(cont) - 1)
        # token j of the continuation is predicted by the one before it (the context's last first)
        predictors.append([len(context) - 1] + list(range(start, start + len(cont) - 1)))
    return tokens, positions, branch, predictors


def _length(context: Sequence[int], continuations: Sequence[Sequence[int]]) -> int:
    return len(context) + sum(len(c) - 1 for c in continuations)


def fits(context: Sequence[int], continuations: Sequence[Sequence[int]], window: int) -> bool:
    """Every continuation can be scored after the whole context within `window` positions."""
    return len(context) + max(len(c) for c in continuations) - 1 <= window


def score_choices(
    model, tokenizer, questions: Sequence[Question], window: int | None = None,
    max_tokens: int = 1024,
) -> list[ChoiceScores]:  # fmt: skip
    """Log-likelihood of every choice of every question (see `score_rows`)."""
    return score_rows(model, [encode_question(tokenizer, q) for q in questions], window, max_tokens)


def encode_question(tokenizer, q: Question) -> tuple[list[int], list[list[int]]]:
    """(context ids, [continuation ids]) of a question, each pair encoded as lm-eval does."""
    pairs = [encode_pair(tokenizer, q.context, c) for c in q.choices]
    return pairs[0][0], [cont for _, cont in pairs]


SHARED_KEY = 16  # rows whose contexts open with the same this many tokens share a prefix


@torch.no_grad()
def score_rows(
    model, rows: Sequence[tuple[list[int], list[list[int]]]], window: int | None = None,
    max_tokens: int = 1024,
) -> list[ChoiceScores]:  # fmt: skip
    """Log-likelihoods of (context ids, [continuation ids]) rows, a few rows per forward pass
    (as many as fit `max_tokens` padded tokens; on 2 CPU cores 1024 ran 1.3-1.5x faster than
    4096, its activations staying in cache).

    Rows whose contexts begin alike (the few-shot exemplars of a task or subject) have their
    common prefix computed once, and its keys and values serve every row of the group. A row
    whose choices do not fit the window together is scored one choice at a time, and a
    context too long for its continuation loses its oldest tokens, as lm-eval's `hf` backend
    truncates."""
    window = window or model.config.max_seq_len
    units = []  # (row, choice indices, context, continuations)
    for r, (context, conts) in enumerate(rows):
        if _length(context, conts) <= window:
            units.append((r, list(range(len(conts))), context, conts))
            continue
        for j, cont in enumerate(conts):
            if len(cont) > window:
                raise ValueError(
                    f"a continuation of {len(cont)} tokens exceeds the {window}-token window"
                )
            units.append((r, [j], context[-(window + 1 - len(cont)) :], [cont]))
    groups: dict[tuple, list[int]] = {}
    for u, (_, _, context, _) in enumerate(units):
        groups.setdefault(
            tuple(context[:SHARED_KEY]) if len(context) > SHARED_KEY else (), []
        ).append(u)
    alone = [u for key, members in groups.items() if len(members) == 1 or not key for u in members]
    groups = {k: m for k, m in groups.items() if len(m) > 1 and k}
    if alone:  # rows that share no prefix are batched together
        groups[()] = alone
    logprobs: list[list[float]] = [[0.0] * len(conts) for _, conts in rows]
    greedy: list[list[bool]] = [[False] * len(conts) for _, conts in rows]
    for key, members in groups.items():
        contexts = [units[u][2] for u in members]
        # each context keeps at least its last token, the predictor of its first choice token
        shared = min(common_prefix(contexts), min(map(len, contexts)) - 1) if key else 0
        prefix = _prefix_cache(model, units[members[0]][2][:shared]) if shared else None
        order = sorted(members, key=lambda u: -_length(*units[u][2:]))
        at = 0
        while at < len(order):
            width = max(1, _length(*units[order[at]][2:]) - shared)
            batch = [units[u] for u in order[at : at + max(1, max_tokens // width)]]
            rests = [(context[shared:], conts) for _, _, context, conts in batch]
            for (r, choices, _, _), scores in zip(batch, _score_batch(model, rests, width, prefix)):
                for j, lp, g in zip(choices, scores.logprobs, scores.greedy):
                    logprobs[r][j], greedy[r][j] = lp, g
            at += len(batch)
    return [ChoiceScores(lp, g) for lp, g in zip(logprobs, greedy)]


def _prefix_cache(model, prefix: list[int]) -> KVCache:
    device = model.tok_embeddings.weight.device
    cache = KVCache.for_model(model, 1, len(prefix))
    model(torch.tensor([prefix], device=device), cache=cache, last_only=True)
    return cache


def _score_batch(model, rows, width: int, prefix: KVCache | None = None) -> list[ChoiceScores]:
    """One forward over `rows` laid out by `_row`, after `prefix`'s cached tokens (which every
    row sees whole) when there is one."""
    device = model.tok_embeddings.weight.device
    built = [_row(*row) for row in rows]
    n, shared = len(built), 0 if prefix is None else prefix.length
    tokens = torch.zeros(n, width, dtype=torch.long)
    positions = torch.zeros(n, width, dtype=torch.long)
    branch = torch.full((n, width), -1, dtype=torch.long)
    for r, (t, p, b, _) in enumerate(built):
        tokens[r, : len(t)], positions[r, : len(t)] = torch.tensor(t), torch.tensor(p)
        branch[r, : len(b)] = torch.tensor(b)
    q, k = branch[:, :, None], branch[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = causal & ((k == 0) | (k == q)) & (k >= 0)
    mask |= torch.eye(width, dtype=torch.bool)  # padding attends to itself (no empty rows)
    keep = torch.zeros(n, width, dtype=torch.bool)  # only predictors need the output layer
    for r, (_, _, _, predictors) in enumerate(built):
        for pred in predictors:
            keep[r, pred] = True
    index = (keep.flatten().cumsum(0) - 1).view(n, width)
    cache = None
    if prefix is not None:
        cache = KVCache.for_model(model, n, shared + width)
        for layer in range(len(cache.keys)):
            cache.keys[layer][:, :, :shared] = prefix.keys[layer]
            cache.values[layer][:, :, :shared] = prefix.values[layer]
        cache.advance(shared)
        mask = torch.cat([torch.ones(n, width, shared, dtype=torch.bool), mask], dim=2)
    logits = model(
        tokens.to(device), (positions + shared).to(device), mask[:, None].to(device),
        cache=cache, keep=keep.to(device),
    )  # fmt: skip
    logprobs = F.log_softmax(logits.float(), dim=-1).cpu()
    out = []
    for r, (_, _, _, predictors) in enumerate(built):
        sums, greedy = [], []
        for cont, pred in zip(rows[r][1], predictors):
            target = torch.tensor(cont)
            picked = logprobs[index[r, pred]]
            sums.append(float(picked.gather(1, target[:, None]).sum()))
            greedy.append(bool((picked.argmax(-1) == target).all()))
        out.append(ChoiceScores(sums, greedy))
    return out


def choice_metrics(questions: Sequence[Question], scores: Sequence[ChoiceScores]) -> dict:
    """acc (highest log-likelihood) and acc_norm (per character of the continuation, as
    lm-eval's acc_norm), with per-question records."""
    correct, correct_norm, records = [], [], []
    for q, s in zip(questions, scores):
        pick = int(np.argmax(s.logprobs))
        norm = [lp / max(1, len(c)) for lp, c in zip(s.logprobs, q.choices)]
        pick_norm = int(np.argmax(norm))
        correct.append(pick == q.gold)
        correct_norm.append(pick_norm == q.gold)
        records.append(
            {
                "id": q.id,
                "gold": q.gold,
                "prediction": pick,
                "prediction_norm": pick_norm,
                "logprobs": s.logprobs,
                "correct": pick == q.gold,
            }
        )
    return {"acc": summary(correct), "acc_norm": summary(correct_norm), "records": records}


NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def extract_answer(text: str) -> str | None:
    """The number a chain of thought ends on: the first after the last "answer is" or "####"
    when it says so, else the last number; commas and a trailing ".0" dropped."""
    for marker in ("answer is", "####"):
        if marker in text and (found := NUMBER.findall(text[text.rindex(marker) :])):
            return _plain(found[0])
    found = NUMBER.findall(text)
    return _plain(found[-1]) if found else None


def _plain(number: str) -> str:
    number = number.replace(",", "")
    return number.removesuffix(".0")


def answer_metrics(problems: Sequence[Problem], outputs: Sequence[str]) -> dict:
    """Exact match of the answers extracted from greedy completions."""
    correct, records = [], []
    for p, text in zip(problems, outputs):
        predicted = extract_answer(text)
        correct.append(predicted == p.answer)
        records.append(
            {"id": p.id, "target": p.answer, "prediction": predicted, "output": text,
             "correct": predicted == p.answer}
        )  # fmt: skip
    return {"exact_match": summary(correct), "records": records}


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from n samples of which c pass (Chen et al. 2021):
    1 - C(n - c, k) / C(n, k), as a product to stay exact for large n."""
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def code_metrics(
    problems: Sequence[CodeProblem], outputs: Sequence[str], timeout: float = 10.0,
    replies: bool = False,
) -> dict:  # fmt: skip
    """Each completion executed with its problem's tests in the sandbox: pass@1. replies: the
    outputs are chat replies, whose first fenced code block (or whole text) follows the prompt,
    so a reply that rewrites the whole function replaces the prompt's stub."""
    passed, records = [], []
    for p, text in zip(problems, outputs):
        code = "\n" + fenced_code(text) if replies else text
        outcome = run_program(p.program(code), timeout=timeout)
        passed.append(outcome.passed)
        records.append(
            {"id": p.id, "completion": text, "status": outcome.status, "correct": outcome.passed}
        )
    return {"pass@1": summary(passed), "records": records}


FENCE = re.compile(r"```[a-zA-Z0-9_+-]*\n(.*?)(?:```|$)", re.DOTALL)


def fenced_code(text: str) -> str:
    """The first ``` fenced block of a reply (an unclosed one runs to the end), else the text."""
    found = FENCE.search(text)
    return found.group(1) if found else text


def summary(correct: Sequence[bool], resamples: int = 1000, seed: int = 0) -> dict:
    """Mean, bootstrap standard error (seeded) and n."""
    values = np.asarray(correct, dtype=np.float64)
    if len(values) == 0:
        return {"mean": math.nan, "stderr": math.nan, "n": 0}
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    return {"mean": float(values.mean()), "stderr": float(means.std(ddof=1)), "n": len(values)}
