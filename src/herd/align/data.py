"""Preference data: prompts with two or more responses ranked best first (edited > chosen >
rejected, as the paper collects them), encoded by the model's chat format and packed so each
prompt is encoded once for all its responses.

A packed group is the prompt (all but its last token) followed by each response in a seeded
shuffled order, each led by a copy of the prompt's last token, whose logits predict the
response's first token. The response parts attend to the prompt and to themselves only
(`herd.model.masks.shared_prompt_mask`) and their positions continue from the prompt, so a
response computes exactly as it would after the prompt alone. Groups are placed first-fit in
rows, never split; one that does not fit a row is left out and counted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from herd.finetune.data import DataError, checked_dialog
from herd.finetune.pack import SFTLoader
from herd.train.trainer import IGNORE


@dataclass(frozen=True)
class Preference:
    """A prompt (the messages before the answer) and its responses, best first."""

    prompt: tuple[dict[str, Any], ...]
    responses: tuple[str, ...]

    def dialog(self, response: int = 0) -> list[dict[str, Any]]:
        return [*self.prompt, {"role": "assistant", "content": self.responses[response]}]


@dataclass
class ReadStats:
    pairs: int = 0  # records kept
    identical: int = 0  # records left with one distinct response, dropped
    empty: int = 0  # records left with fewer than two non-empty responses, dropped


def read_preferences(path: str | Path, stats: ReadStats | None = None) -> list[Preference]:
    """Preference JSONL, one record per line, in any of these shapes:
      {"prompt": str | [messages], "chosen": str, "rejected": str, "edited"?: str}
      {"prompt": ..., "responses": [best, ..., worst]}
      {"chosen": [messages], "rejected": [messages]}  (TRL's conversational form: the shared
                                                       messages are the prompt)
    Empty responses and repeats of a better one are removed; a record left with fewer than
    two is dropped and counted in `stats`."""
    stats = stats if stats is not None else ReadStats()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such preference file")
    kept = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            prompt, responses = _ranking_of(record, where)
            nonempty = [r for r in responses if r.strip()]
            distinct = list(dict.fromkeys(r.strip() for r in nonempty))
            if len(nonempty) < 2:
                stats.empty += 1
            elif len(distinct) < 2:
                stats.identical += 1
            else:
                firsts = {r.strip(): r for r in reversed(nonempty)}  # the best-ranked copy
                kept.append(Preference(prompt, tuple(firsts[r] for r in distinct)))
    stats.pairs += len(kept)
    if not kept:
        raise DataError(f"{path}: no usable preference records (each needs two distinct answers)")
    return kept


def _ranking_of(record: Any, where: str) -> tuple[tuple[dict[str, Any], ...], list[str]]:
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object")
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if "prompt" not in record and isinstance(chosen, list) and isinstance(rejected, list):
        return _conversational(chosen, rejected, where)
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f'{where}: "prompt" must be a string or a non-empty list of messages')
    if "responses" in record:
        responses = record["responses"]
    elif isinstance(chosen, str) and isinstance(rejected, str):
        responses = [*([record["edited"]] if record.get("edited") else []), chosen, rejected]
    else:
        raise DataError(
            f'{where}: expected "chosen" and "rejected" strings (and optionally "edited") or '
            '"responses" (best first)'
        )
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise DataError(f'{where}: "responses" must be a list of strings, best first')
    messages = checked_prompt(prompt, where)
    return tuple(messages), list(responses)


def checked_prompt(messages: list[Any], where: str) -> list[dict[str, Any]]:
    """The messages before a response: roles known, and not ending with the assistant."""
    checked_dialog([*messages, {"role": "assistant", "content": ""}], where)
    if messages[-1].get("role") == "assistant":
        raise DataError(f"{where}: the prompt ends with an assistant message; it needs a user turn")
    return list(messages)


def _conversational(chosen: list, rejected: list, where: str):
    for name, dialog in (("chosen", chosen), ("rejected", rejected)):
        if (
            not dialog
            or not isinstance(dialog[-1], Mapping)
            or dialog[-1].get("role") != ("assistant")
        ):
            raise DataError(f'{where}: "{name}" must end with an assistant message')
    if chosen[:-1] != rejected[:-1]:
        raise DataError(f'{where}: "chosen" and "rejected" must share every message but the last')
    prompt = checked_prompt(list(chosen[:-1]), where)
    return tuple(prompt), [str(chosen[-1]["content"]), str(rejected[-1]["content"])]


# -- encoding -------------------------------------------------------------------------------


@dataclass
class Group:
    """A prompt's ids and, per response (best first), its ids and which of them are scored."""

    prompt: list[int]
    responses: list[list[int]]
    scored: list[list[bool]]


def stop_ids(chat_format: Any) -> set[int]:
    """The ids that end a turn in this chat format (<|eot_id|>, <|eom_id|>, <|im_end|>, ...)."""
    tokenizer = chat_format.tokenizer
    return {*tokenizer.stop_ids, *(() if tokenizer.eos_id is None else [tokenizer.eos_id])}


def encode_response(
    chat_format: Any, prompt: Sequence[Mapping[str, Any]], response: str, mask_formatting: bool
) -> tuple[list[int], list[int], list[bool]]:
    """(prompt ids, response ids, scored) for one response: the response is the whole
    assistant turn as the chat format renders it after the prompt (header, content and the
    end-of-turn token). `mask_formatting` leaves the header and the termination tokens
    unscored (the paper's DPO mask): they are the same in every response."""
    before = chat_format.encode_dialog(list(prompt), add_generation_prompt=False)
    dialog = [*prompt, {"role": "assistant", "content": response}]
    full = chat_format.encode_dialog(dialog, add_generation_prompt=False, return_mask=True)
    if list(full.ids[: len(before)]) != list(before):
        raise DataError("the chat format encodes the prompt differently once a response follows")
    ids, trained = list(full.ids[len(before) :]), list(full.mask[len(before) :])
    if not any(trained):
        raise DataError("the response encodes to no assistant tokens")
    end = max(i for i, t in enumerate(trained) if t) + 1  # template text after the turn: not ours
    ids, trained = ids[:end], trained[:end]
    if mask_formatting:
        stops = stop_ids(chat_format)
        scored = [t and i not in stops for i, t in zip(ids, trained)]
    else:
        scored = [True] * len(ids)
    if not any(scored):
        raise DataError("the response has no content tokens to score")
    return list(before), ids, scored


def encode_group(chat_format: Any, preference: Preference, mask_formatting: bool) -> Group:
    prompt, responses, scored = None, [], []
    for response in preference.responses:
        prompt, ids, mask = encode_response(
            chat_format, preference.prompt, response, mask_formatting
        )
        responses.append(ids)
        scored.append(mask)
    return Group(prompt, responses, scored)


# -- packing --------------------------------------------------------------------------------


@dataclass
class PackStats:
    rows: int = 0
    groups: int = 0
    responses: int = 0
    dropped: int = 0  # groups longer than a row
    scored_tokens: int = 0
    padding: int = 0


@dataclass
class GroupRows:
    """Packed rows (rows, seq_len) and, per response r of all of them, its group, its rank
    (higher is better) and its scored tokens."""

    tokens: np.ndarray
    targets: np.ndarray  # next token where scored, else IGNORE
    positions: np.ndarray
    groups: np.ndarray  # group index within the row; padding is a group of its own
    parts: np.ndarray  # 0 the prompt, k the k-th response placed
    response: np.ndarray  # global response id at each of its tokens, -1 elsewhere
    last: np.ndarray  # bool: a response's last token (where a reward model reads it)
    response_group: np.ndarray  # (responses,) global group id
    response_rank: np.ndarray  # (responses,) 0 the worst of its group
    response_scored: np.ndarray  # (responses,) scored tokens
    stats: PackStats = field(default_factory=PackStats)
    reference: np.ndarray | None = None  # (responses,) reference log-probabilities (DPO)


def group_length(group: Group) -> int:
    return len(group.prompt) - 1 + sum(len(r) + 1 for r in group.responses)


def pack_groups(groups: Sequence[Group], seq_len: int, pad_id: int, seed: int = 0) -> GroupRows:
    stats = PackStats()
    rng = np.random.default_rng(seed)
    rows: list[list[int]] = []
    free: list[int] = []
    placed: list[tuple[int, Group, list[int]]] = []  # (row, group, response order)
    for group in groups:
        need = group_length(group)
        if need > seq_len:
            stats.dropped += 1
            continue
        row = next((r for r, space in enumerate(free) if space >= need), None)
        if row is None:
            rows.append([])
            free.append(seq_len)
            row = len(rows) - 1
        free[row] -= need
        placed.append((row, group, rng.permutation(len(group.responses)).tolist()))
    shape = (len(rows), seq_len)
    tokens = np.full(shape, pad_id, np.int64)
    targets = np.full(shape, IGNORE, np.int64)
    positions = np.zeros(shape, np.int64)
    group_ids = np.zeros(shape, np.int64)
    parts = np.zeros(shape, np.int64)
    response = np.full(shape, -1, np.int64)
    last = np.zeros(shape, bool)
    fill = [0] * len(rows)
    in_row = [0] * len(rows)
    meta_group, meta_rank, meta_scored = [], [], []
    for g, (row, group, order) in enumerate(placed):
        at, local = fill[row], in_row[row]
        p = len(group.prompt)
        tokens[row, at : at + p - 1] = group.prompt[:-1]
        positions[row, at : at + p - 1] = np.arange(p - 1)
        group_ids[row, at : at + p - 1] = local
        at += p - 1
        for part, k in enumerate(order, 1):
            ids, scored = group.responses[k], group.scored[k]
            rid = len(meta_group)
            n = len(ids) + 1
            span = slice(at, at + n)
            tokens[row, span] = [group.prompt[-1], *ids]
            positions[row, span] = np.arange(p - 1, p - 1 + n)
            group_ids[row, span], parts[row, span], response[row, span] = local, part, rid
            targets[row, at : at + n - 1] = np.where(scored, ids, IGNORE)
            last[row, at + n - 1] = True
            meta_group.append(g)
            meta_rank.append(len(group.responses) - 1 - k)
            meta_scored.append(sum(scored))
            stats.responses += 1
            stats.scored_tokens += sum(scored)
            at += n
        fill[row], in_row[row] = at, local + 1
        stats.groups += 1
    for row in range(len(rows)):
        group_ids[row, fill[row] :] = in_row[row]
        positions[row, fill[row] :] = np.arange(seq_len - fill[row])
        stats.padding += seq_len - fill[row]
    stats.rows = len(rows)
    return GroupRows(
        tokens,
        targets,
        positions,
        group_ids,
        parts,
        response,
        last,
        np.asarray(meta_group, np.int64),
        np.asarray(meta_rank, np.int64),
        np.asarray(meta_scored, np.int64),
        stats,
    )


@dataclass
class GroupBatch:
    """Rows of a GroupRows and, per response in them (local ids 0..m-1, the `response`
    entries), its global id, rank, group and reference log-probability (NaN if none yet)."""

    tokens: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    groups: torch.Tensor
    parts: torch.Tensor
    response: torch.Tensor  # local response id per token, -1 outside responses
    last: torch.Tensor
    ids: torch.Tensor  # (m,)
    rank: torch.Tensor  # (m,)
    group_of: torch.Tensor  # (m,)
    reference: torch.Tensor  # (m,) float64

    def to(self, device: torch.device) -> GroupBatch:
        return GroupBatch(*(t.to(device) for t in vars(self).values()))


def rows_batch(rows: GroupRows, picked: np.ndarray) -> GroupBatch:
    """The batch of rows `picked`."""
    response = rows.response[picked]
    ids, local = np.unique(response[response >= 0], return_inverse=True)
    remapped = np.full_like(response, -1)
    remapped[response >= 0] = local
    reference = rows.reference[ids] if rows.reference is not None else np.full(len(ids), np.nan)
    arrays = (
        rows.tokens[picked],
        rows.targets[picked],
        rows.positions[picked],
        rows.groups[picked],
        rows.parts[picked],
        remapped,
        rows.last[picked],
        ids,
        rows.response_rank[ids],
        rows.response_group[ids],
        reference.astype(np.float64),
    )
    return GroupBatch(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays))


def in_order(rows: GroupRows, size: int) -> list[GroupBatch]:
    """Every row once, in order, `size` rows a batch (one pass over all of them)."""
    n = len(rows.tokens)
    return [rows_batch(rows, np.arange(i, min(i + size, n))) for i in range(0, n, size)]


class GroupLoader(SFTLoader):
    """Batches of packed preference rows, shuffled per epoch and resumable like SFTLoader."""

    rows: GroupRows

    def batch(self, epoch: int, step: int) -> GroupBatch:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows.tokens))
        first = step * self.world_size * self.batch_size + self.rank
        picked = order[first : first + self.world_size * self.batch_size : self.world_size]
        return rows_batch(self.rows, picked)
