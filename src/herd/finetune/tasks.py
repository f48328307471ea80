"""Tasks whose answers can be checked exactly: a seeded generator of unit conversions (answered
with the number and unit alone), and exact-match scoring of a model on any chat JSONL whose
last assistant turn is the answer. The SFT demo trains on some conversions and scores held-out
ones before and after.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# (from, to, factor): 1 `from` is `factor` `to`.
CONVERSIONS = (
    ("km", "m", 1000),
    ("m", "cm", 100),
    ("cm", "mm", 10),
    ("kg", "g", 1000),
    ("g", "mg", 1000),
    ("l", "ml", 1000),
    ("h", "min", 60),
    ("min", "s", 60),
    ("day", "h", 24),
    ("week", "day", 7),
)
PHRASES = (
    "Convert {n} {a} to {b}.",
    "How many {b} are in {n} {a}?",
    "{n} {a} is how many {b}?",
    "Express {n} {a} in {b}.",
)


@dataclass(frozen=True)
class Item:
    """A prompt (the messages before the answer) and the exact answer expected."""

    prompt: tuple[dict[str, str], ...]
    answer: str

    @classmethod
    def question(cls, text: str, answer: str) -> Item:
        return cls(({"role": "user", "content": text},), answer)

    def dialog(self) -> list[dict[str, str]]:
        return [*self.prompt, {"role": "assistant", "content": self.answer}]


def unit_conversions(n: int, seed: int) -> list[Item]:
    """`n` distinct conversion questions with their exact answers ("4500 m")."""
    rng, items, seen = random.Random(seed), [], set()
    while len(items) < n:
        a, b, factor = rng.choice(CONVERSIONS)
        count = rng.randint(2, 99)
        question = rng.choice(PHRASES).format(n=count, a=a, b=b)
        if question not in seen:
            seen.add(question)
            items.append(Item.question(question, f"{count * factor} {b}"))
    return items


def write_dialogs(items: Sequence[Item], path: str | Path) -> Path:
    """The items as chat JSONL (OpenAI messages), the format `herd finetune` reads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": i.dialog()}) + "\n" for i in items))
    return path


def read_items(path: str | Path) -> list[Item]:
    """Items of a chat JSONL file: each dialog's last message (an assistant turn) is the answer."""
    from herd.finetune.data import DataError, read_chat_jsonl

    items = []
    for number, dialog in enumerate(read_chat_jsonl(path), 1):
        if dialog[-1]["role"] != "assistant":
            raise DataError(f"{path}: dialog {number} does not end with the assistant's answer")
        items.append(Item(tuple(dialog[:-1]), str(dialog[-1]["content"])))
    return items


def exact_match(llama: Any, items: Sequence[Item], max_new_tokens: int = 16) -> float:
    """Share of items a `herd.Llama` answers exactly (greedy, whitespace stripped)."""
    fmt = llama.chat_format
    prompts = [fmt.encode_dialog(list(i.prompt), add_generation_prompt=True) for i in items]
    answers = llama.generate(prompts, max_new_tokens=max_new_tokens, temperature=0)
    right = sum(
        fmt.decode_assistant(a.token_ids)["content"].strip() == i.answer
        for a, i in zip(answers, items)
    )
    return right / len(items)
