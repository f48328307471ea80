"""Hugging Face `tokenizer.json` vocabularies, run by the `tokenizers` library: byte-level BPE
(Llama 3, SmolLM2, GPT-2 style) and the others it runs (Llama 2's SentencePiece-style BPE...)."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from herd.tokenizer.base import Tokenizer

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"
MODEL_CONFIG_FILE = "config.json"
# What a Hugging Face directory's tokenizer consists of; copied as they are from HF to HF.
FILES = (
    TOKENIZER_FILE,
    CONFIG_FILE,
    "special_tokens_map.json",
    GENERATION_CONFIG_FILE,
    CHAT_TEMPLATE_FILE,
)

# transformers writes "no limit" as 1e30; anything this large is not a real context length.
_NO_LIMIT = 10**9


def _byte_alphabet() -> tuple[str, ...]:
    """GPT-2's spelling of bytes as printable characters, which byte-level BPE vocabularies use:
    printable Latin-1 bytes stand for themselves, the other 68 take U+0100.. in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, shifted = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(0x100 + shifted))
            shifted += 1
    return tuple(chars)


BYTE_CHARS = _byte_alphabet()
# str.translate table from a spelling back to Latin-1 bytes; characters outside the alphabet
# become U+FFFF, which Latin-1 cannot encode.
_UNSPELL = {
    **{i: 0xFFFF for i in range(0x100 + 68)},
    **{ord(char): byte for byte, char in enumerate(BYTE_CHARS)},
}


def spell_bytes(data: bytes) -> str:
    """A byte string as a byte-level vocabulary spells it (b" the" -> "Ġthe")."""
    return "".join([BYTE_CHARS[b] for b in data])


def unspell(token: str) -> bytes | None:
    """The bytes a byte-level token spelling stands for; None if it is not such a spelling."""
    try:
        return token.translate(_UNSPELL).encode("latin-1")
    except UnicodeEncodeError:
        return None


def added_token(token_id: int, content: str, special: bool) -> dict[str, Any]:
    """A tokenizer.json `added_tokens` entry, matched in raw (unnormalised) text."""
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def bos_post_processor(bos: str, bos_id: int) -> dict[str, Any]:
    """tokenizer.json post-processor that puts BOS in front, as Llama 3's does."""
    processor = tokenizers.processors.TemplateProcessing(
        single=f"{bos} $A:0", pair=f"{bos} $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )
    return json.loads(processor.__getstate__())


BYTE_LEVEL_DECODER = {
    "type": "ByteLevel",
    "add_prefix_space": True,
    "trim_offsets": True,
    "use_regex": True,
}


def bpe_json(
    vocab: dict[str, int],
    merges: Sequence[Sequence[str]],
    *,
    added: Sequence[dict[str, Any]],
    pre_tokenizer: dict[str, Any] | None,
    ignore_merges: bool,
    post_processor: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A byte-level BPE tokenizer.json, as `tokenizers` and transformers read it."""
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": list(added),
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": BYTE_LEVEL_DECODER,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": list(merges),
        },
    }


def _mentions_byte_level(component: Any) -> bool:
    if isinstance(component, dict):
        return component.get("type") == "ByteLevel" or any(
            _mentions_byte_level(v) for v in component.values()
        )
    if isinstance(component, list):
        return any(_mentions_byte_level(v) for v in component)
    return False


def _parse(text: str, source: str) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # the Rust side raises plain Exception for every kind of bad input
        raise ValueError(f"{source}: not a valid tokenizer.json: {e}") from e


TokenRef = int | str | None


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` behind herd's interface.

    `backend` treats special-token text as plain text (`encode_special_tokens`). That flag lives
    on the object and `encode_batch` runs on threads, so trusted text that must parse special
    tokens goes through a second copy, made on first use.
    """

    def __init__(
        self,
        tokenizer_json: str,
        *,
        bos: TokenRef = None,
        eos: TokenRef = None,
        pad: TokenRef = None,
        stop: Iterable[TokenRef] = (),
        chat_template: str | None = None,
        add_bos: bool | None = None,
        model_max_length: int | None = None,
        source: Path | None = None,
        gguf_fields: Mapping[str, Any] | None = None,
    ):
        """
        Args:
            tokenizer_json: the text of a tokenizer.json.
            bos, eos, pad: the token, as id or text.
            stop: tokens that end generation besides `eos`.
            chat_template: the checkpoint's Jinja chat template.
            add_bos: whether the model expects BOS in front of a prompt; None asks the
                tokenizer's post-processor.
            model_max_length: the context length the tokenizer was published with.
            source: where it was read from (a directory is copied as is when saved as HF).
            gguf_fields: the raw `tokenizer.*` GGUF fields it was built from, written back as
                they are when saved as GGUF.
        """
        name = str(source) if source is not None else TOKENIZER_FILE
        if source is not None and source.is_dir():
            name = str(source / TOKENIZER_FILE)
        self.backend = _parse(tokenizer_json, name)
        self.backend.encode_special_tokens = True
        self._special: tokenizers.Tokenizer | None = None
        self._special_lock = threading.Lock()
        self.source = source
        self.gguf_fields = dict(gguf_fields) if gguf_fields is not None else None
        self.chat_template = chat_template
        self.model_max_length = model_max_length

        added = self.backend.get_added_tokens_decoder()
        vocab = self.backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values(), default=-1) + 1
        self.special_tokens = {t.content: i for i, t in sorted(added.items()) if t.special}
        self.bos_id = self._resolve(bos)
        self.eos_id = self._resolve(eos)
        self.pad_id = self._resolve(pad)
        stops = [self.eos_id, *(self._resolve(s) for s in stop)]
        self.stop_ids = tuple(dict.fromkeys(s for s in stops if s is not None))
        if add_bos is None:
            add_bos = self.bos_id is not None and self.backend.encode(
                "", add_special_tokens=True
            ).ids[:1] == [self.bos_id]
        self.add_bos = add_bos

        decoder = self.backend.decoder
        self.byte_level = (
            isinstance(self.backend.model, tokenizers.models.BPE)
            and decoder is not None
            and _mentions_byte_level(json.loads(decoder.__getstate__()))
        )
        self._bytes = self._token_bytes_table(added) if self.byte_level else []

    def _resolve(self, token: TokenRef) -> int | None:
        if token is None or isinstance(token, int):
            return token
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} is not in the vocabulary")
        return token_id

    def _token_bytes_table(self, added: dict[int, tokenizers.AddedToken]) -> list[bytes]:
        table = []
        for token_id in range(self.vocab_size):
            if token_id in added:
                table.append(added[token_id].content.encode())
                continue
            token = self.backend.id_to_token(token_id)
            if token is None:
                table.append(b"")
            else:  # a token outside the byte alphabet (a mislabelled special) stands for itself
                table.append(unspell(token) or token.encode())
        return table

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        """A bare tokenizer.json, without the BOS, EOS and chat template that the files beside
        it in a Hugging Face directory declare (see `from_dir`)."""
        path = Path(path)
        return cls(_read_text(path), source=path)

    @classmethod
    def from_dir(cls, directory: str | Path) -> HFTokenizer:
        """A Hugging Face directory: tokenizer.json, with BOS/EOS, chat template and context
        length from tokenizer_config.json (or chat_template.jinja) and the end-of-generation ids
        from generation_config.json and config.json."""
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: no {TOKENIZER_FILE}")
        config = _read_object(directory / CONFIG_FILE)
        generation = _read_object(directory / GENERATION_CONFIG_FILE)
        model = _read_object(directory / MODEL_CONFIG_FILE)

        def token(key: str) -> TokenRef:
            text = _content(config.get(f"{key}_token"))
            if text is not None:
                return text
            return _first_id(generation.get(f"{key}_token_id", model.get(f"{key}_token_id")))

        template_file = directory / CHAT_TEMPLATE_FILE
        if template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
        else:
            template = _default_template(config.get("chat_template"))
        max_length = config.get("model_max_length")
        add_bos = config.get("add_bos_token")
        return cls(
            _read_text(path),
            bos=token("bos"),
            eos=token("eos"),
            pad=token("pad"),
            stop=[*_ids(generation.get("eos_token_id")), *_ids(model.get("eos_token_id"))],
            chat_template=template,
            add_bos=add_bos if isinstance(add_bos, bool) else None,
            model_max_length=max_length
            if isinstance(max_length, int) and max_length < _NO_LIMIT
            else None,
            source=directory,
        )

    @classmethod
    def from_gguf(cls, fields: Mapping[str, Any], source: Path | None = None) -> HFTokenizer:
        """The vocabulary a GGUF file's `tokenizer.*` metadata describes. `fields` maps keys to
        plain values, `gguf.GGUFValue`s or `gguf.ReaderField`s."""
        from herd.tokenizer.gguf_vocab import tokenizer_from_gguf

        return tokenizer_from_gguf(fields, source)

    @classmethod
    def from_gguf_file(cls, path: str | Path) -> HFTokenizer:
        from herd.tokenizer.gguf_vocab import read_tokenizer_fields

        path = Path(path)
        return cls.from_gguf(read_tokenizer_fields(path), source=path)

    # ---------------------------------------------------------------- the interface

    def _special_backend(self) -> tokenizers.Tokenizer:
        with self._special_lock:
            if self._special is None:
                self._special = tokenizers.Tokenizer.from_str(self.backend.to_str())
                self._special.encode_special_tokens = False
            return self._special

    def _encode(self, text: str, special: bool) -> list[int]:
        backend = self._special_backend() if special else self.backend
        try:
            return backend.encode(text, add_special_tokens=False).ids
        except (UnicodeEncodeError, TypeError):
            # Lone surrogates cannot cross into Rust; like tiktoken, encode them as U+FFFD.
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        if self.byte_level:
            return b"".join(self._bytes[i] for i in ids).decode("utf-8", errors="replace")
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        if not self.byte_level:
            return super().token_bytes(token_id)
        return self._bytes[token_id]

    # ---------------------------------------------------------------- writing

    def token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.backend.id_to_token(token_id)

    def save(self, directory: str | Path, model_max_length: int | None = None) -> list[Path]:
        """Write tokenizer.json, tokenizer_config.json and generation_config.json (BOS and the
        end-of-generation ids) so that transformers' AutoTokenizer loads them. A tokenizer read
        from a Hugging Face directory is copied file for file instead."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.source is not None and self.source.is_dir():
            return _copy_files(self.source, directory)
        self.backend.save(str(directory / TOKENIZER_FILE))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.token_text(self.bos_id),
            "eos_token": self.token_text(self.eos_id),
            "pad_token": self.token_text(self.pad_id),
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            # decoding must give back the text exactly, not "tidy" spaces before punctuation
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length or self.model_max_length or _NO_LIMIT,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        _write_json(directory / CONFIG_FILE, {k: v for k, v in config.items() if v is not None})
        generation = _read_object(directory / GENERATION_CONFIG_FILE)
        generation.update(bos_token_id=self.bos_id, eos_token_id=list(self.stop_ids))
        _write_json(directory / GENERATION_CONFIG_FILE, generation)
        return [
            directory / TOKENIZER_FILE,
            directory / CONFIG_FILE,
            directory / GENERATION_CONFIG_FILE,
        ]

    @property
    def tokenizer_json(self) -> dict[str, Any]:
        return json.loads(self.backend.to_str())


def _copy_files(source: Path, dest: Path) -> list[Path]:
    copied = []
    for name in FILES:
        if (source / name).is_file():
            if (source / name).resolve() != (dest / name).resolve():
                shutil.copyfile(source / name, dest / name)
            copied.append(dest / name)
    return copied


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read a tokenizer.json: {e}") from None


def _read_object(path: Path) -> dict[str, Any]:
    """An optional JSON config file; absent means empty."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if isinstance(value, dict):
        return value
    raise ValueError(f"{path}: expected a JSON object, found {type(value).__name__}")


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _content(token: Any) -> str | None:
    """tokenizer_config.json spells a token as text or as an AddedToken object."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _first_id(value: Any) -> int | None:
    ids = _ids(value)
    return ids[0] if ids else None


def _default_template(value: Any) -> str | None:
    """tokenizer_config.json's chat_template: a string, or named templates of which "default"
    is the one to use."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    return None
