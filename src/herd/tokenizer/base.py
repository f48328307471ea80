"""What every herd tokenizer offers, and the streaming decoder built on it."""

from __future__ import annotations

import codecs
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

REPLACEMENT_CHAR = "\ufffd"
T = TypeVar("T")


class Tokenizer(ABC):
    """Text <-> token ids.

    `encode` never turns text into special tokens: "<|eot_id|>" typed by a user is ordinary
    text. Only trusted text (a chat formatter's own markup) is encoded with `special=True`.
    """

    #: number of token ids the embedding must have (base tokens + special tokens)
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    #: ids that end generation (end of text, end of turn, end of message, ...)
    stop_ids: tuple[int, ...]
    #: special token text -> id
    special_tokens: dict[str, int]
    #: the checkpoint's own Jinja chat template, if it has one
    chat_template: str | None = None
    #: every token stands for a fixed byte string (`token_bytes`), so decoding is concatenation
    byte_level: bool = False

    @abstractmethod
    def _encode(self, text: str, special: bool) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens appear as their text. Bytes that do not form valid
        UTF-8 become U+FFFD."""

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for; only byte-level vocabularies have them."""
        raise NotImplementedError(f"{type(self).__name__} is not a byte-level vocabulary")

    def encode(
        self, text: str, bos: bool = False, eos: bool = False, *, special: bool = False
    ) -> list[int]:
        """Token ids of `text`.

        Args:
            text: the text.
            bos: prepend the beginning-of-sequence token.
            eos: append the end-of-sequence token.
            special: parse special-token text such as "<|eot_id|>" into special tokens. Only for
                trusted text; user text must keep the default.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        ids = self._encode(text, special)
        if bos:
            ids.insert(0, _require(self.bos_id, "bos"))
        if eos:
            ids.append(_require(self.eos_id, "eos"))
        return ids

    def encode_batch(
        self,
        texts: Iterable[str],
        bos: bool = False,
        eos: bool = False,
        num_threads: int | None = None,
    ) -> list[list[int]]:
        """`encode` of each text, spread over threads (the BPE cores release the GIL)."""
        return _map_threads(lambda t: self.encode(t, bos, eos), list(texts), num_threads)

    def encode_batch_numpy(
        self,
        texts: Iterable[str],
        bos: bool = False,
        eos: bool = False,
        num_threads: int | None = None,
    ) -> list[np.ndarray]:
        """Like `encode_batch`, as uint32 arrays. Building Python lists needs the GIL, so this
        scales better over threads; it is what token shards are written from."""
        return _map_threads(lambda t: self._encode_numpy(t, bos, eos), list(texts), num_threads)

    def _encode_numpy(self, text: str, bos: bool, eos: bool) -> np.ndarray:
        return np.asarray(self.encode(text, bos, eos), dtype=np.uint32)

    def stream_decoder(self) -> StreamDecoder:
        """An incremental decoder: feed ids one at a time, get text as it becomes complete."""
        if self.byte_level:
            return ByteStreamDecoder(self)
        return WindowStreamDecoder(self)

    def __len__(self) -> int:
        return self.vocab_size


def _map_threads(fn: Callable[[str], T], texts: list[str], num_threads: int | None) -> list[T]:
    threads = num_threads or min(len(texts), os.cpu_count() or 1)
    if threads <= 1:
        return [fn(t) for t in texts]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, texts))


def _require(token_id: int | None, what: str) -> int:
    if token_id is None:
        raise ValueError(f"this tokenizer has no {what} token")
    return token_id


class StreamDecoder(ABC):
    """Turns a stream of token ids into text deltas whose concatenation equals `decode` of the
    whole stream. A character split across tokens is held back until it is complete."""

    @abstractmethod
    def add(self, token_id: int) -> str:
        """Feed one id; returns the text that became complete (often "")."""

    @abstractmethod
    def flush(self) -> str:
        """End of stream: whatever is still held back (incomplete bytes become U+FFFD)."""

    def extend(self, ids: Iterable[int]) -> str:
        return "".join(self.add(i) for i in ids)


class ByteStreamDecoder(StreamDecoder):
    """For byte-level vocabularies: an incremental UTF-8 decoder over the tokens' bytes."""

    def __init__(self, tokenizer: Tokenizer):
        self._bytes_of = tokenizer.token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self._utf8.decode(self._bytes_of(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class WindowStreamDecoder(StreamDecoder):
    """For vocabularies that are not byte-level (SentencePiece-style decoders depend on
    context): decode a short window of recent ids and emit what it added, waiting while the
    window ends in an incomplete character."""

    def __init__(self, tokenizer: Tokenizer):
        self._decode = tokenizer.decode
        self._ids: list[int] = []
        self._prefix = 0  # window start: ids before it are fully emitted
        self._read = 0  # ids before it have had their text emitted

    def _delta(self, final: bool) -> str:
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) <= len(before) or (after.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before) :]

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._delta(final=False)

    def flush(self) -> str:
        return self._delta(final=True)
