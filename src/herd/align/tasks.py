"""Prompts with checkable answers and their verifiers: the paper scores math with the final
answer and code with its unit tests (§4.3). A prompt file is JSONL, one per line:

    {"prompt": str | [messages], "answer"?: str, "tests"?: str}
    {"messages": [..., {"role": "assistant", "content": ANSWER}]}   (herd's exact-match files)

`answer` is checked against the number a response ends on (or, when it is no number, its whole
stripped text); `tests` are Python statements run after the response's code in herd's sandbox
(herd.eval.sandbox: own process, time and memory limits, no writes outside its directory).
The embedded task is seeded arithmetic word problems, kept apart from every evaluation set.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from herd.eval.sandbox import run_program
from herd.eval.score import extract_answer, fenced_code
from herd.finetune.data import DataError


@dataclass(frozen=True)
class Prompt:
    messages: tuple[dict[str, Any], ...]
    answer: str | None = None
    tests: str | None = None

    @property
    def checkable(self) -> bool:
        return self.answer is not None or self.tests is not None

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": list(self.messages)}
        if self.answer is not None:
            out["answer"] = self.answer
        if self.tests is not None:
            out["tests"] = self.tests
        return out


def read_prompts(path: str | Path) -> list[Prompt]:
    from herd.align.data import checked_prompt

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompt file")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object")
        answer = record.get("answer")
        if "messages" in record and "prompt" not in record:
            messages = list(record["messages"])
            if messages and messages[-1].get("role") == "assistant":
                answer = str(messages.pop()["content"]) if answer is None else answer
        else:
            messages = record.get("prompt")
            if isinstance(messages, str):
                messages = [{"role": "user", "content": messages}]
        if not isinstance(messages, list) or not messages:
            raise DataError(f'{where}: expected "prompt" (a string or messages) or "messages"')
        tests = record.get("tests")
        prompts.append(
            Prompt(tuple(checked_prompt(messages, where)), None if answer is None else str(answer),
                   tests)
        )  # fmt: skip
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def write_prompts(prompts: Sequence[Prompt], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p.record()) + "\n" for p in prompts))
    return path


def answer_correct(response: str, answer: str) -> bool:
    """Whether a response ends on the expected answer: the number it concludes with (see
    herd.eval.score.extract_answer) or, for a non-numeric answer, its whole text."""
    expected = extract_answer(answer)
    if expected is not None and expected == answer.strip().replace(",", "").removesuffix(".0"):
        return extract_answer(response) == expected
    return response.strip() == answer.strip()


def passes_tests(response: str, tests: str, timeout: float = 10.0) -> bool:
    """The response's code (its first fenced block, else all of it) followed by the tests,
    run in the sandbox: passes if it exits 0 in time."""
    return run_program(fenced_code(response) + "\n\n" + tests, timeout=timeout).passed


def verify(prompt: Prompt, response: str, timeout: float = 10.0) -> float | None:
    """1.0 or 0.0 where the prompt can be checked, else None."""
    if prompt.answer is not None:
        return float(answer_correct(response, prompt.answer))
    if prompt.tests is not None:
        return float(passes_tests(response, prompt.tests, timeout))
    return None


# -- the embedded task ------------------------------------------------------------------------

NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Farah", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea")
THINGS = ("apples", "stamps", "marbles", "books", "coins", "shells", "cards", "pencils")
INSTRUCTION = "Solve the problem. End your reply with 'The answer is N.'"


def _problem(rng: random.Random) -> tuple[str, int]:
    name, other = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    a, b = rng.randint(2, 40), rng.randint(2, 20)
    kind = rng.randrange(4)
    if kind == 0:
        return (
            f"{name} has {a} {thing} and gets {b} more from {other}. How many {thing} does {name} have now?",
            a + b,
        )
    if kind == 1:
        a += b
        return (
            f"{name} has {a} {thing} and gives {b} to {other}. How many {thing} does {name} have left?",
            a - b,
        )
    if kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return (
            f"{name} buys {a} boxes with {b} {thing} in each. How many {thing} is that in total?",
            a * b,
        )
    c = rng.randint(2, 10)
    return (
        f"{name} has {a} {thing}, finds {b} more and then loses {c}. How many {thing} does {name} have?",
        a + b - c,
    )


def arithmetic_problems(n: int, seed: int) -> list[Prompt]:
    """`n` distinct one- and two-step word problems with their answers, seeded."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        question, answer = _problem(rng)
        if question in seen:
            continue
        seen.add(question)
        out.append(Prompt(({"role": "user", "content": f"{question} {INSTRUCTION}"},), str(answer)))
    return out
