"""The Llama 3 tokenizer: tiktoken BPE over the official 128,000 ranks plus 256 special tokens."""

from __future__ import annotations

import base64
import binascii
import importlib.resources
import re
from collections.abc import Iterator, Sequence
from collections.abc import Set as AbstractSet
from numbers import Integral
from pathlib import Path

import numpy as np
import tiktoken

from herd.tokenizer.base import Tokenizer

# The official pre-tokenisation pattern (llama-models `tokenizer.py`).
PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256
NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: the assistant waits for a tool result
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",  # 128011 in the text vocabulary, as llama-models has it
)
STOP_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")

# tiktoken's core is only safe on slices of at most 400k characters, and its BPE is quadratic
# in the length of one pre-token, so the reference also cuts runs of more than 25k whitespace or
# non-whitespace characters. The cut points change the ids, so herd cuts exactly where it does.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(rf"(?<!\S)\S{{{MAX_RUN_CHARS + 1},}}|(?<!\s)\s{{{MAX_RUN_CHARS + 1},}}")
# A run longer than MAX_RUN_CHARS covers a multiple of MAX_RUN_CHARS, and reaches at least
# HALF_RUN characters to one side of it, so probing those points rules out long runs cheaply.
_HALF_RUN = MAX_RUN_CHARS // 2
_HALF_RUN_AT = re.compile(rf"\S{{{_HALF_RUN}}}|\s{{{_HALF_RUN}}}")

_NONE: frozenset[str] = frozenset()

OFFICIAL_RANKS = ("llama_models.llama3", "tokenizer.model")


def special_token_names(num_base: int) -> dict[str, int]:
    """The 256 special tokens and their ids, which follow the base vocabulary."""
    reserved = (
        f"<|reserved_special_token_{i}|>"
        for i in range(2, 2 + NUM_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS))
    )
    names = (*NAMED_SPECIAL_TOKENS, *reserved)
    return {name: num_base + i for i, name in enumerate(names)}


def load_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a tiktoken BPE file: one `base64(token) rank` pair per line."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(
            f"{path}: not a tiktoken BPE ranks file (binary content; a SentencePiece "
            "tokenizer.model from Llama 1/2 is not supported, load its tokenizer.json instead)"
        ) from None
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise ValueError(
                f"{path}:{number}: expected `<base64 token> <rank>`, got {line[:80]!r}"
            ) from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps or repeats")
    return ranks


def save_ranks(ranks: dict[bytes, int], path: str | Path) -> Path:
    """Write ranks in the tiktoken BPE format (Meta's `tokenizer.model`)."""
    path = Path(path)
    lines = (f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=_rank))
    path.write_text("".join(lines), encoding="ascii")
    return path


def _rank(item: tuple[bytes, int]) -> int:
    return item[1]


def split_long_runs(text: str) -> Iterator[str]:
    """Cut `text` where the reference does: 400k-character slices, then within each slice
    every run of whitespace or non-whitespace longer than 25k characters every 25k."""
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        chunk = text[start : start + MAX_ENCODE_CHARS]
        if len(chunk) <= MAX_RUN_CHARS:
            yield chunk
            continue
        if not _may_have_long_run(chunk):
            yield chunk
            continue
        begin = 0
        for run in _LONG_RUN.finditer(chunk):
            for cut in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                yield chunk[begin:cut]
                begin = cut
        yield chunk[begin:]


def _may_have_long_run(chunk: str) -> bool:
    probe = _HALF_RUN_AT.match
    return any(
        probe(chunk, at) or (at >= _HALF_RUN and probe(chunk, at - _HALF_RUN))
        for at in range(0, len(chunk), MAX_RUN_CHARS)
    )


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE with the Llama 3 pattern and special tokens."""

    byte_level = True

    def __init__(self, ranks: dict[bytes, int], name: str = "llama3"):
        self.ranks = ranks
        self.special_tokens = special_token_names(len(ranks))
        self.vocab_size = len(ranks) + NUM_SPECIAL_TOKENS
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_ids = tuple(self.special_tokens[t] for t in STOP_TOKENS)
        self.encoding = tiktoken.Encoding(
            name=name, pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self._all_special = frozenset(self.special_tokens)
        self._bytes = [b""] * self.vocab_size
        for token, rank in ranks.items():
            self._bytes[rank] = token
        for text, token_id in self.special_tokens.items():
            self._bytes[token_id] = text.encode()

    @classmethod
    def from_file(cls, path: str | Path) -> TiktokenTokenizer:
        return cls(load_ranks(path), name=Path(path).name)

    def _encode(self, text: str, special: bool) -> list[int]:
        return self._encode_array(text, special).tolist()

    def _encode_numpy(self, text: str, bos: bool, eos: bool) -> np.ndarray:
        ids = self._encode_array(text, special=False)
        if bos or eos:
            ids = np.concatenate([[self.bos_id] * bos, ids, [self.eos_id] * eos]).astype(np.uint32)
        return ids

    def _encode_array(self, text: str, special: bool) -> np.ndarray:
        allowed = self._all_special if special else _NONE
        if len(text) <= MAX_RUN_CHARS:
            return self._encode_piece(text, allowed)
        pieces = [self._encode_piece(piece, allowed) for piece in split_long_runs(text)]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _encode_piece(self, text: str, allowed: AbstractSet[str]) -> np.ndarray:
        # encode_to_numpy keeps the GIL released for all of the BPE work (encode_ordinary builds
        # its Python list inside), so threads scale better; ids are the same.
        try:
            return self.encoding.encode_to_numpy(
                text, allowed_special=allowed, disallowed_special=()
            )
        except UnicodeEncodeError:
            # lone surrogates: the same repair tiktoken's encode applies, so ids match it
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self.encoding.encode_to_numpy(
                text, allowed_special=allowed, disallowed_special=()
            )

    def decode(self, ids: Sequence[int]) -> str:
        try:
            data = self.encoding.decode_bytes(ids)
        except (KeyError, OverflowError, TypeError):
            raise ValueError(_bad_ids(ids, self.vocab_size)) from None
        return data.decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(_bad_ids([token_id], self.vocab_size))
        return self._bytes[token_id]


def _bad_ids(ids: Sequence[int], vocab_size: int) -> str:
    bad = [i for i in ids if not (isinstance(i, Integral) and 0 <= i < vocab_size)][:5]
    return f"token ids {bad} are outside this tokenizer's vocabulary [0, {vocab_size})"


def llama3() -> TiktokenTokenizer:
    """The official Llama 3 tokenizer (128,256 ids), from the ranks file `llama-models` ships."""
    global _LLAMA3
    if _LLAMA3 is None:
        package, name = OFFICIAL_RANKS
        try:
            resource = importlib.resources.files(package) / name
        except ModuleNotFoundError:
            raise RuntimeError(
                "the Llama 3 tokenizer file ships in the `llama-models` package: "
                "pip install llama-models"
            ) from None
        with importlib.resources.as_file(resource) as path:
            _LLAMA3 = TiktokenTokenizer.from_file(path)
    return _LLAMA3


_LLAMA3: TiktokenTokenizer | None = None
