"""GGUF vocabularies: llama.cpp's `tokenizer.*` metadata <-> Hugging Face tokenizer.json.

llama.cpp stores a byte-level BPE (`tokenizer.ggml.model` "gpt2") as its tokens in the GPT-2
byte alphabet, a type per token, the merges, the special ids and the *name* of a pre-tokenizer
(`tokenizer.ggml.pre`), whose regexes live in llama.cpp's own source (llama-vocab.cpp). The
table below gives each name the tokenizer.json pre-tokenizer that splits text the same way.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import gguf
import numpy as np
from gguf import GGUFValue, GGUFValueType, TokenType

from herd.tokenizer.hf import (
    HFTokenizer,
    added_token,
    bos_post_processor,
    bpe_json,
)
from herd.tokenizer.llama3 import PATTERN as LLAMA3_PATTERN

K = gguf.Keys.Tokenizer

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split(pattern: str) -> dict[str, Any]:
    # "Isolated" keeps the text between matches as pieces of its own, as llama.cpp does.
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


def _byte_level(use_regex: bool) -> dict[str, Any]:
    # with use_regex, ByteLevel first splits with GPT2_PATTERN
    return {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": use_regex,
    }


def _sequence(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"type": "Sequence", "pretokenizers": list(steps)}


class PreTokenizer(NamedTuple):
    hf: dict[str, Any]  # tokenizer.json "pre_tokenizer"
    ignore_merges: bool  # a pre-token that is itself a token is not split by merges
    add_bos: bool  # llama.cpp's default when the file has no add_bos_token


_LLAMA3 = _sequence(_split(LLAMA3_PATTERN), _byte_level(False))
_GPT2 = _byte_level(True)
_DIGITS_THEN_GPT2 = _sequence({"type": "Digits", "individual_digits": True}, _byte_level(True))
_QWEN2 = _sequence(_split(QWEN2_PATTERN), _byte_level(False))
_TEKKEN = _sequence(_split(TEKKEN_PATTERN), _byte_level(False))
_DEFAULT = _sequence(
    _split(r"[\p{P}\$\+<=>\^~\|]+"),
    _split(GPT2_PATTERN),
    _split(r"\p{N}+"),
    _split("[0-9][0-9][0-9]"),
    _byte_level(False),
)
_FALCON = _sequence(
    _split(r"[\p{P}\$\+<=>\^~\|`]+"),
    _split(GPT2_PATTERN),
    _split("[0-9][0-9][0-9]"),
    _byte_level(False),
)

# llama.cpp pre-tokenizer name -> how it splits; the first name of each kind is the one written.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    **dict.fromkeys(
        ("llama-bpe", "llama3", "llama-v3", "falcon3"), PreTokenizer(_LLAMA3, True, True)
    ),
    **dict.fromkeys(("smaug-bpe", "dbrx"), PreTokenizer(_LLAMA3, False, False)),
    **dict.fromkeys(
        ("gpt-2", "phi-2", "roberta-bpe", "mpt", "olmo", "jais"), PreTokenizer(_GPT2, False, False)
    ),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        PreTokenizer(_DIGITS_THEN_GPT2, False, False),
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), PreTokenizer(_QWEN2, False, False)),
    "tekken": PreTokenizer(_TEKKEN, True, True),
    "falcon": PreTokenizer(_FALCON, False, False),
    "default": PreTokenizer(_DEFAULT, False, False),
}

# llama.cpp ends generation on these control tokens even when no id field names them.
END_OF_GENERATION_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|eom_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<EOT>",
        "_<EOT>",
        "<｜end▁of▁sentence｜>",
    }
)

_MODEL_NAMES = {
    "llama": "SentencePiece BPE, as Llama 1/2 and Mistral use",
    "bert": "WordPiece",
    "t5": "SentencePiece Unigram",
    "rwkv": "RWKV world",
    "gemma4": "Gemma 4 SentencePiece",
}


# ---------------------------------------------------------------- reading


def read_tokenizer_fields(path: Path) -> dict[str, GGUFValue]:
    """The `tokenizer.*` metadata of a GGUF file, typed so that it can be written back as is.

    Reads the key/value header itself: `gguf.GGUFReader` makes numpy views of every string and
    takes seconds over a 128k-token vocabulary."""
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            view = memoryview(data)
            try:
                return _MetadataReader(view).tokenizer_fields()
            finally:
                view.release()
    except (ValueError, struct.error, IndexError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable GGUF file (truncated or corrupt?): {e}") from None


_SCALARS = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}


class _MetadataReader:
    """GGUF's header: magic, version, tensor count, key/value count, then the key/values."""

    def __init__(self, data: memoryview):
        self.data = data
        if bytes(data[:4]) != b"GGUF":
            raise ValueError("no GGUF magic number")
        version = int.from_bytes(data[4:8], "little")
        # a big-endian file reads as a version with its low half zero
        self.order = "<" if version & 0xFFFF else ">"
        if int.from_bytes(data[4:8], "little" if self.order == "<" else "big") < 2:
            raise ValueError("GGUF version 1 (32-bit counts) is not supported")
        self.pos = 8

    def _unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(self.order + fmt, self.data, self.pos)
        self.pos += struct.calcsize(self.order + fmt)
        return value

    def _string(self) -> str:
        size = self._unpack("Q")
        text = str(self.data[self.pos : self.pos + size], "utf-8", errors="replace")
        self.pos += size
        return text

    def _value(self, kind: GGUFValueType) -> Any:
        if kind == GGUFValueType.STRING:
            return self._string()
        return self._unpack(_SCALARS[kind])

    def _array(self) -> tuple[list[Any], GGUFValueType]:
        kind = GGUFValueType(self._unpack("I"))
        count = self._unpack("Q")
        if kind in _SCALARS:
            dtype = np.dtype(_SCALARS[kind]).newbyteorder(self.order)
            start, self.pos = self.pos, self.pos + dtype.itemsize * count
            return np.frombuffer(self.data, dtype, count, start).tolist(), kind
        if kind == GGUFValueType.STRING:
            return self._strings(count), kind
        return [self._array()[0] for _ in range(count)], kind

    def _strings(self, count: int) -> list[str]:
        # the hot loop over a vocabulary and its merges, so locals and a precompiled struct
        size_of = struct.Struct(self.order + "Q").unpack_from
        data, pos, out = self.data, self.pos, []
        for _ in range(count):
            (size,) = size_of(data, pos)
            out.append(str(data[pos + 8 : pos + 8 + size], "utf-8", errors="replace"))
            pos += 8 + size
        self.pos = pos
        return out

    def tokenizer_fields(self) -> dict[str, GGUFValue]:
        self._unpack("Q")  # tensors
        fields = {}
        for _ in range(self._unpack("Q")):
            key = self._string()
            kind = GGUFValueType(self._unpack("I"))
            if kind == GGUFValueType.ARRAY:
                value, sub_type = self._array()
                field = GGUFValue(value, kind, sub_type)
            else:
                field = GGUFValue(self._value(kind), kind)
            if key.startswith("tokenizer."):
                fields[key] = field
        return fields


def _typed(field: Any) -> GGUFValue:
    kind = field.types[0]
    sub_type = field.types[-1] if kind == GGUFValueType.ARRAY else None
    return GGUFValue(field.contents(), kind, sub_type)


def _plain(value: Any) -> Any:
    if isinstance(value, GGUFValue):
        return value.value
    if hasattr(value, "contents"):  # gguf.ReaderField
        return value.contents()
    return value


def tokenizer_from_gguf(fields: Mapping[str, Any], source: Path | None = None) -> HFTokenizer:
    """Build the byte-level BPE a GGUF's `tokenizer.*` metadata describes."""
    where = str(source) if source is not None else "GGUF metadata"
    values = {key: _plain(value) for key, value in fields.items()}
    model = values.get(K.MODEL)
    if model is None:
        raise FileNotFoundError(f"{where}: has no tokenizer (no {K.MODEL} metadata)")
    if model != "gpt2":
        kind = _MODEL_NAMES.get(model, "unknown")
        raise ValueError(
            f"{where}: GGUF tokenizer model {model!r} ({kind}) is not supported; herd reads "
            "byte-level BPE vocabularies (tokenizer.ggml.model 'gpt2'), as Llama 3 has"
        )
    pre_name = values.get(K.PRE) or "default"
    pre = PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        raise ValueError(
            f"{where}: unknown GGUF pre-tokenizer {pre_name!r}; herd knows "
            f"{', '.join(sorted(PRE_TOKENIZERS))}"
        )
    tokens = _require(values, K.LIST, where)
    types = values.get(K.TOKEN_TYPE) or [TokenType.NORMAL] * len(tokens)
    merges = [_merge_pair(m, where) for m in _require(values, K.MERGES, where)]
    if len(types) != len(tokens):
        raise ValueError(f"{where}: {len(tokens)} tokens but {len(types)} token types")

    vocab: dict[str, int] = {}
    added = []
    for token_id, (token, kind) in enumerate(zip(tokens, types)):
        # Every token goes into the BPE vocabulary: `tokenizers` gives an added token the id
        # the vocabulary has for its text, and numbers the others after the vocabulary.
        vocab.setdefault(token, token_id)
        if kind in (TokenType.CONTROL, TokenType.USER_DEFINED):
            # llama.cpp matches both whole in the text; only control tokens are "special"
            added.append(added_token(token_id, token, special=kind == TokenType.CONTROL))

    bos, eos = values.get(K.BOS_ID), values.get(K.EOS_ID)
    add_bos = bool(values.get(K.ADD_BOS, pre.add_bos)) and bos is not None
    data = bpe_json(
        vocab,
        merges,
        added=added,
        pre_tokenizer=pre.hf,
        ignore_merges=pre.ignore_merges,
        post_processor=bos_post_processor(tokens[bos], bos) if add_bos else None,
    )
    stop = [values.get(K.EOT_ID), values.get(K.EOM_ID)] + [
        i
        for i, (token, kind) in enumerate(zip(tokens, types))
        if kind == TokenType.CONTROL and token in END_OF_GENERATION_TEXTS
    ]
    return HFTokenizer(
        json.dumps(data, ensure_ascii=False),
        bos=bos,
        eos=eos,
        pad=values.get(K.PAD_ID),
        stop=[s for s in stop if s is not None],
        chat_template=values.get(K.CHAT_TEMPLATE),
        add_bos=add_bos,
        source=source,
        gguf_fields=_typed_fields(fields),
    )


def _typed_fields(fields: Mapping[str, Any]) -> dict[str, GGUFValue] | None:
    """The fields with their GGUF types, so they can be copied into another GGUF; None when
    they came as plain values."""
    if all(isinstance(v, GGUFValue) for v in fields.values()):
        return dict(fields)
    if all(hasattr(v, "types") for v in fields.values()):
        return {key: _typed(field) for key, field in fields.items()}
    return None


def _require(values: dict[str, Any], key: str, where: str) -> Any:
    if values.get(key) is None:
        raise ValueError(f"{where}: GGUF tokenizer metadata lacks {key!r}")
    return values[key]


def _merge_pair(merge: str, where: str) -> tuple[str, str]:
    # llama.cpp looks for the separating space from the second character on
    cut = merge.find(" ", 1)
    if cut < 0:
        raise ValueError(f"{where}: malformed merge {merge!r} (expected 'left right')")
    return merge[:cut], merge[cut + 1 :]


# ---------------------------------------------------------------- writing


def _canonical(step: Any) -> Any:
    """A pre-tokenizer without settings that do not change the split (offsets trimming), and
    with one-step sequences unwrapped, for comparison."""
    if isinstance(step, dict):
        if step.get("type") == "Sequence" and len(step.get("pretokenizers", [])) == 1:
            return _canonical(step["pretokenizers"][0])
        return {k: _canonical(v) for k, v in step.items() if k != "trim_offsets"}
    if isinstance(step, list):
        return [_canonical(v) for v in step]
    return step


def pre_tokenizer_name(pre_tokenizer: dict[str, Any] | None, ignore_merges: bool) -> str:
    """The llama.cpp pre-tokenizer name that splits text as this tokenizer.json does."""
    wanted = _canonical(pre_tokenizer)
    for name, pre in PRE_TOKENIZERS.items():
        if _canonical(pre.hf) == wanted and pre.ignore_merges == ignore_merges:
            return name
    raise ValueError(
        "llama.cpp has no pre-tokenizer that splits text as this tokenizer does "
        f"(pre_tokenizer {json.dumps(pre_tokenizer)[:200]}, ignore_merges={ignore_merges}); "
        "it cannot be written to GGUF"
    )


def gguf_fields(tokenizer: HFTokenizer, vocab_size: int | None = None) -> dict[str, GGUFValue]:
    """The `tokenizer.*` GGUF metadata for a byte-level BPE, as llama.cpp's convert_hf_to_gguf
    writes it; ids past the tokenizer's own up to `vocab_size` become unused `[PAD<id>]`."""
    size = max(vocab_size or 0, tokenizer.vocab_size)
    if tokenizer.gguf_fields is not None:
        return padded(tokenizer.gguf_fields, size)
    if not tokenizer.byte_level:
        raise ValueError(
            f"{tokenizer.source or 'this tokenizer'}: only byte-level BPE vocabularies can be "
            "written to GGUF (llama.cpp's 'gpt2' tokenizer model)"
        )
    data = tokenizer.tokenizer_json
    model = data["model"]
    if data.get("normalizer"):
        raise ValueError(
            f"{tokenizer.source or 'this tokenizer'}: has a normaliser "
            f"({data['normalizer'].get('type')}), which GGUF cannot express"
        )
    pre = pre_tokenizer_name(data.get("pre_tokenizer"), bool(model.get("ignore_merges")))
    tokens, types = _tokens_and_types(data, size)
    fields = {
        K.MODEL: _string("gpt2"),
        K.PRE: _string(pre),
        K.LIST: GGUFValue(tokens, GGUFValueType.ARRAY, GGUFValueType.STRING),
        K.TOKEN_TYPE: GGUFValue(types, GGUFValueType.ARRAY, GGUFValueType.INT32),
        K.MERGES: GGUFValue(
            _merge_strings(model["merges"]), GGUFValueType.ARRAY, GGUFValueType.STRING
        ),
        K.ADD_BOS: GGUFValue(tokenizer.add_bos, GGUFValueType.BOOL),
    }
    specials = tokenizer.special_tokens
    ids = {
        K.BOS_ID: tokenizer.bos_id,
        K.EOS_ID: tokenizer.eos_id,
        K.PAD_ID: tokenizer.pad_id,
        # llama.cpp finds these by name too; stating them keeps them ending generation
        K.EOT_ID: specials.get("<|eot_id|>"),
        K.EOM_ID: specials.get("<|eom_id|>"),
    }
    fields.update({k: GGUFValue(v, GGUFValueType.UINT32) for k, v in ids.items() if v is not None})
    if tokenizer.chat_template is not None:
        fields[K.CHAT_TEMPLATE] = _string(tokenizer.chat_template)
    return fields


def _string(value: str) -> GGUFValue:
    return GGUFValue(value, GGUFValueType.STRING)


def _tokens_and_types(data: dict[str, Any], size: int) -> tuple[list[str], list[int]]:
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(TokenType.UNUSED)] * size
    for token, token_id in data["model"]["vocab"].items():
        tokens[token_id], types[token_id] = token, int(TokenType.NORMAL)
    for entry in data["added_tokens"]:
        kind = TokenType.CONTROL if entry["special"] else TokenType.USER_DEFINED
        tokens[entry["id"]], types[entry["id"]] = entry["content"], int(kind)
    return tokens, types


def _merge_strings(merges: list[Any]) -> list[str]:
    pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in merges]
    if any(" " in part for pair in pairs for part in pair):
        raise ValueError("a merge has a space inside a token, which GGUF merges cannot express")
    return [f"{left} {right}" for left, right in pairs]


def padded(fields: Mapping[str, GGUFValue], size: int) -> dict[str, GGUFValue]:
    """Source fields as they are, with unused tokens added if the model's embedding is larger."""
    fields = dict(fields)
    tokens = fields.get(K.LIST)
    missing = size - len(tokens.value) if tokens is not None else 0
    if missing > 0:
        start = len(tokens.value)
        fields[K.LIST] = GGUFValue(
            [*tokens.value, *(f"[PAD{i}]" for i in range(start, size))],
            tokens.type,
            tokens.sub_type,
        )
        for key, filler in ((K.TOKEN_TYPE, int(TokenType.UNUSED)), (K.SCORES, 0.0)):
            if key in fields:
                old = fields[key]
                fields[key] = GGUFValue([*old.value, *[filler] * missing], old.type, old.sub_type)
    return fields
