"""The text of a generated sequence: detokenized incrementally, cut at stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Completion:
    """One generated continuation.

    token_ids are the new tokens only; a stop token that ended generation is included, its text
    is not. finish_reason is "stop" (a stop token or stop string) or "length" (max_new_tokens,
    or the context window, was reached). logprobs (when asked for) are, per new token, its
    log-probability under the raw model distribution (before penalties, temperature, filters).
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[float] | None = None


@dataclass
class GeneratedText:
    """Generation state of one sequence: its new ids, text, logprobs, and whether (and why) it
    is done. Stop tokens and stop strings end it; `pending` gives the text that is safe to
    stream (no part of a possible stop string)."""

    prompt_tokens: int
    budget: int
    stop_ids: frozenset[int]
    stops: tuple[str, ...]
    decoder: Any
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None
    stopped_by_string: bool = False

    def __post_init__(self) -> None:
        if self.budget <= 0:
            self.finish_reason = "length"

    def add(self, token: int, logprob: float | None) -> None:
        if self.finish_reason is not None:
            return
        self.ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if token in self.stop_ids:
            self._finish("stop")
            return
        self._extend(self.decoder.add(token))
        if self.finish_reason is None and len(self.ids) >= self.budget:
            self._finish("length")

    def _finish(self, reason: str) -> None:
        self.finish_reason = reason
        self._extend(self.decoder.flush())

    def _extend(self, delta: str) -> None:
        if not delta or self.stopped_by_string:
            return
        # A stop string may straddle the old text and the new delta.
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0) + 1)
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped_by_string = True
            self.finish_reason = "stop"

    def pending(self) -> str:
        """Text not yet streamed that can no longer turn out to be part of a stop string."""
        end = len(self.text)
        if self.finish_reason is None:
            end -= stop_prefix_length(self.text, self.stops)
        delta, self.emitted = self.text[self.emitted : end], max(self.emitted, end)
        return delta

    def completion(self) -> Completion:
        return Completion(
            self.text,
            self.ids,
            self.finish_reason or "length",
            self.prompt_tokens,
            self.logprobs if self.logprobs else None,
        )


def stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins some stop string."""
    longest = min(len(text), max((len(s) for s in stops), default=1) - 1)
    for n in range(longest, 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return n
    return 0
