"""SFT data: dialogs read from chat JSONL (OpenAI messages, prompt/completion pairs) or from the
layouts the offline chat sets ship in (ShareGPT), and encoded by the model's chat format into
token ids and a loss mask of the tokens to train on."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from herd.config.embedded import EMBEDDED, embedded_path
from herd.tokenizer.chat import ROLES, EncodedDialog

Dialog = list[dict[str, Any]]
# What SFT trains on: every assistant turn (the default), only the last one, or every token.
TRAIN_ON = ("assistant", "last", "all")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


class DataError(ValueError):
    pass


def read_chat_jsonl(path: str | Path) -> Iterator[Dialog]:
    """One dialog per line: {"messages": [...]} (OpenAI's chat format) or {"prompt": ...,
    "completion": ...}. Blank lines are skipped; anything else is an error naming the line."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            yield checked_dialog(_dialog_of(record, where), where)


def _dialog_of(record: Any, where: str) -> Dialog:
    if isinstance(record, Mapping) and isinstance(record.get("messages"), list):
        return list(record["messages"])
    if isinstance(record, Mapping) and {"prompt", "completion"} <= set(record):
        return [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
    raise DataError(f'{where}: expected {{"messages": [...]}} or {{"prompt", "completion"}}')


def checked_dialog(messages: Sequence[Any], where: str) -> Dialog:
    """The dialog, if every message has a known role and it has an assistant turn to train on."""
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has role {role!r}; roles are {', '.join(ROLES)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the dialog has no assistant turn to train on")
    return list(messages)


def sharegpt_dialogs(path: str | Path) -> Iterator[Dialog]:
    """Dialogs of a ShareGPT JSON list ({"conversations": [{"from": "human"|"gpt", "value"}]}),
    read record by record, so a file cut off mid-record gives every complete one. Records with
    other speakers or no assistant turn are skipped."""
    text = Path(path).read_text(encoding="utf-8")
    decoder, at = json.JSONDecoder(), text.index("[") + 1
    while True:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        if at >= len(text) or text[at] == "]":
            return
        try:
            record, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return  # the truncated last record
        turns = record.get("conversations") or []
        if turns and all(t.get("from") in SHAREGPT_ROLES for t in turns):
            dialog = [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]
            if any(m["role"] == "assistant" for m in dialog):
                yield dialog


def encode_for_training(
    chat_format: Any, messages: Dialog, train_on: str = "assistant"
) -> EncodedDialog:
    """Token ids of a whole dialog and, per id, whether its loss counts: assistant output (content,
    tool calls and the closing end-of-turn, not headers) of every turn, of the last turn only, or
    every token."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on {train_on!r}: choose one of {', '.join(TRAIN_ON)}")
    encoded = chat_format.encode_dialog(messages, add_generation_prompt=False, return_mask=True)
    mask = list(encoded.mask)
    if not any(mask):
        raise DataError("the dialog has no assistant output to train on")
    if train_on == "all":
        mask = [True] * len(mask)
    elif train_on == "last":
        end = max(i for i, m in enumerate(mask) if m) + 1
        start = end
        while start > 0 and mask[start - 1]:
            start -= 1
        mask = [start <= i < end for i in range(len(mask))]
    return EncodedDialog(list(encoded.ids), mask)


# A training example: a dialog, or a plain-text document (trained on whole).
Example = Dialog | str


def text_documents(path: str | Path) -> list[str]:
    """Plain-text documents: the file's paragraphs, split at blank lines (indentation kept)."""
    text = Path(path).read_text(encoding="utf-8")
    return [d.strip("\r\n") for d in re.split(r"\n[ \t\r]*\n", text) if d.strip()]


def read_source(path: str | Path, format: str) -> list[Example]:
    """Every example of one source file (or embedded data set, "sharegpt"); `format` is chat,
    sharegpt or text."""
    readers = {"chat": read_chat_jsonl, "sharegpt": sharegpt_dialogs, "text": text_documents}
    if not Path(path).exists() and str(path) in EMBEDDED:
        path = embedded_path(str(path))
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    examples = list(readers[format](path))
    if not examples:
        raise DataError(f"{path}: no {format} examples in the file")
    return examples


def take(examples: Sequence[Example], passes: float, rng: np.random.Generator) -> list[Example]:
    """`passes` epochs of a source: whole copies, then a seeded sample for the fraction."""
    whole, part = int(passes), round((passes - int(passes)) * len(examples))
    picked = list(examples) * whole
    return picked + [examples[i] for i in sorted(rng.permutation(len(examples))[:part])]


def mix(sources: Sequence[tuple[Sequence[Example], float | None, float | None]], seed: int):
    """The training mix of (examples, epochs, weight) sources, shuffled. A source with epochs
    gives that many passes; those with weights share, in proportion, as many examples as they
    hold together (the paper up- and down-samples sources this way); others give one pass."""
    rng = np.random.default_rng(seed)
    weighted = [(len(x), w) for x, _, w in sources if w is not None]
    pool = sum(n for n, _ in weighted)
    total_weight = sum(w for _, w in weighted)
    mixed: list[Example] = []
    for examples, epochs, weight in sources:
        passes = epochs if epochs is not None else 1.0
        if weight is not None:
            passes = weight / total_weight * pool / len(examples)
        mixed += take(examples, passes, rng)
    return [mixed[i] for i in rng.permutation(len(mixed))]


def hold_out(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(kept, held out): a seeded `fraction` of the examples, at least one, set aside."""
    if not fraction:
        return list(examples), []
    order = np.random.default_rng([seed, len(examples)]).permutation(len(examples))
    n = max(1, round(fraction * len(examples)))
    if n >= len(examples):
        raise DataError(f"holding out {n} of {len(examples)} examples leaves none to train on")
    held = set(order[:n].tolist())
    return [x for i, x in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def encode_example(
    tokenizer: Any, example: Example, train_on: str, chat_format: Any = None
) -> EncodedDialog:
    """A dialog through `encode_for_training` with `chat_format`; a text document framed by
    begin-of-text (where the vocabulary has one) and end-of-text, every id trained."""
    if isinstance(example, str):
        ids = tokenizer.encode(example, bos=tokenizer.bos_id is not None, eos=True)
        return EncodedDialog(ids, [True] * len(ids))
    return encode_for_training(chat_format, example, train_on)
