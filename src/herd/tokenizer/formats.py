"""A checkpoint's tokenizer, found wherever its format keeps it, and written in any format:
Hugging Face tokenizer.json, Meta's tiktoken tokenizer.model, or GGUF metadata."""

from __future__ import annotations

import importlib.resources
import json
import logging
from pathlib import Path

import gguf

from herd.config.embedded import EMBEDDED, embedded_path
from herd.tokenizer import gguf_vocab
from herd.tokenizer.base import Tokenizer
from herd.tokenizer.hf import (
    TOKENIZER_FILE,
    HFTokenizer,
    added_token,
    bos_post_processor,
    bpe_json,
    spell_bytes,
    unspell,
)
from herd.tokenizer.llama3 import (
    OFFICIAL_RANKS,
    TiktokenTokenizer,
    llama3,
    load_ranks,
    save_ranks,
    special_token_names,
)

__all__ = [
    "FORMATS",
    "find_tokenizer",
    "gguf_fields",
    "load_tokenizer",
    "save_tokenizer",
    "tiktoken_ranks",
    "to_hf",
]

log = logging.getLogger(__name__)

FORMATS = ("hf", "meta", "gguf")
META_TOKENIZER_FILE = "tokenizer.model"
GGUF_TOKENIZER_FILE = "tokenizer.gguf"
_GGUF_MAGIC = b"GGUF"


# ---------------------------------------------------------------- finding a tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer that belongs to a checkpoint, or a tokenizer file.

    Args:
        path: a Hugging Face directory (tokenizer.json), a Meta directory (tokenizer.model, the
            tiktoken ranks; a tokenizer.json there wins), a .gguf file or a directory holding
            one (its embedded vocabulary), a bare tokenizer.json or tokenizer.model, the name
            of an embedded model ("smollm2"), or "llama3" for the official Llama 3 tokenizer.

    Raises:
        FileNotFoundError: nothing at `path`, or no tokenizer there.
        ValueError: a tokenizer file herd cannot read (corrupt, or an unsupported kind).
    """
    if str(path) == "llama3" and not Path(path).exists():
        from herd.tokenizer.llama3 import llama3

        return llama3()
    path = _locate(Path(path))
    if _is_gguf(path):
        return HFTokenizer.from_gguf_file(path)
    if path.name == TOKENIZER_FILE:  # its directory holds the rest of its configuration
        return HFTokenizer.from_dir(path.parent)
    if path.suffix == ".json":
        return HFTokenizer.from_file(path)
    return _load_ranks_file(path)


def find_tokenizer(path: str | Path) -> Path:
    """The file that holds the tokenizer of a checkpoint (what `load_tokenizer` would read).

    Raises:
        FileNotFoundError: nothing at `path`, or no tokenizer there.
    """
    path = _locate(Path(path))
    if _is_gguf(path) and gguf.Keys.Tokenizer.MODEL not in gguf_vocab.read_tokenizer_fields(path):
        raise FileNotFoundError(
            f"{path}: has no tokenizer (no {gguf.Keys.Tokenizer.MODEL} metadata)"
        )
    return path


def _locate(path: Path) -> Path:
    """A tokenizer file: `path` itself, or the one in a checkpoint directory or embedded model."""
    if not path.exists():
        if str(path) not in EMBEDDED:
            raise FileNotFoundError(f"{path}: no such file or directory")
        path = embedded_path(str(path))
    if not path.is_dir():
        return path
    for name in (TOKENIZER_FILE, META_TOKENIZER_FILE):
        if (path / name).is_file():
            return path / name
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
    raise FileNotFoundError(
        f"{path}: no tokenizer: expected {TOKENIZER_FILE} (Hugging Face), "
        f"{META_TOKENIZER_FILE} (Meta) or a single .gguf file, found {found}"
    )


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == _GGUF_MAGIC


def _load_ranks_file(path: Path) -> TiktokenTokenizer:
    """A tiktoken ranks file; the official Llama 3 one gives the shared `llama3()` tokenizer."""
    package, name = OFFICIAL_RANKS
    try:
        official = importlib.resources.files(package) / name
        is_official = (
            official.is_file()
            and path.stat().st_size == len(data := official.read_bytes())
            and path.read_bytes() == data
        )
    except ModuleNotFoundError:
        is_official = False
    if is_official:
        return llama3()
    return TiktokenTokenizer(load_ranks(path), name=path.name)


# ---------------------------------------------------------------- converting


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """BPE merges equivalent to tiktoken's ranks: every split of a token into two tokens, in the
    order of the merged token's rank, then of the parts' ranks."""
    found = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = ranks.get(token[:cut]), ranks.get(token[cut:])
            if left is not None and right is not None:
                found.append((rank, left, right, token[:cut], token[cut:]))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _hf_from_tiktoken(tokenizer: TiktokenTokenizer) -> HFTokenizer:
    from herd.tokenizer.chat import LLAMA3_CHAT_TEMPLATE

    vocab = {spell_bytes(token): rank for token, rank in tokenizer.ranks.items()}
    merges = [(spell_bytes(a), spell_bytes(b)) for a, b in derive_merges(tokenizer.ranks)]
    specials = [added_token(i, text, special=True) for text, i in tokenizer.special_tokens.items()]
    bos_text = next(t for t, i in tokenizer.special_tokens.items() if i == tokenizer.bos_id)
    data = bpe_json(
        vocab,
        merges,
        added=specials,
        pre_tokenizer=gguf_vocab.PRE_TOKENIZERS["llama-bpe"].hf,
        # tiktoken takes a whole pre-token when it is a token, whatever the merges would do
        ignore_merges=True,
        post_processor=bos_post_processor(bos_text, tokenizer.bos_id),
    )
    return HFTokenizer(
        json.dumps(data, ensure_ascii=False),
        bos=tokenizer.bos_id,
        eos=tokenizer.eos_id,
        pad=getattr(tokenizer, "pad_id", None),
        stop=tokenizer.stop_ids,
        chat_template=tokenizer.chat_template or LLAMA3_CHAT_TEMPLATE,
        add_bos=True,
    )


def to_hf(tokenizer: Tokenizer) -> HFTokenizer:
    """The tokenizer as a Hugging Face tokenizer.json (tiktoken BPE becomes an equivalent
    byte-level BPE with merges derived from the ranks)."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer
    if isinstance(tokenizer, TiktokenTokenizer):
        return _hf_from_tiktoken(tokenizer)
    raise TypeError(f"cannot write a {type(tokenizer).__name__} as a Hugging Face tokenizer")


def tiktoken_ranks(tokenizer: Tokenizer) -> dict[bytes, int] | None:
    """tiktoken ranks that tokenize exactly as `tokenizer` does, when it is Llama 3's kind of
    BPE (its pattern, whole-token lookup, merges in rank order, Llama 3's special tokens);
    None otherwise."""
    if isinstance(tokenizer, TiktokenTokenizer):
        return tokenizer.ranks
    if not isinstance(tokenizer, HFTokenizer) or not tokenizer.byte_level:
        return None
    data = tokenizer.tokenizer_json
    model = data["model"]
    if data.get("normalizer") or not model.get("ignore_merges"):
        return None
    try:
        if gguf_vocab.pre_tokenizer_name(data.get("pre_tokenizer"), True) != "llama-bpe":
            return None
    except ValueError:
        return None
    added_ids = {t["id"] for t in data["added_tokens"]}
    # vocabularies built from GGUF also list the special tokens in the BPE vocabulary
    vocab = {token: i for token, i in model["vocab"].items() if i not in added_ids}
    if sorted(vocab.values()) != list(range(len(vocab))):
        return None
    if [(t["content"], t["id"], t["special"]) for t in data["added_tokens"]] != [
        (text, i, True) for text, i in special_token_names(len(vocab)).items()
    ]:
        return None
    ranks = {unspell(token): rank for token, rank in vocab.items()}
    if None in ranks or len(ranks) != len(vocab):
        return None
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    derived = [(spell_bytes(a), spell_bytes(b)) for a, b in derive_merges(ranks)]
    return ranks if merges == derived else None


def gguf_fields(
    source: Tokenizer | str | Path, vocab_size: int | None = None
) -> dict[str, gguf.GGUFValue]:
    """The `tokenizer.*` GGUF metadata (key -> `gguf.GGUFValue`) for a tokenizer, as llama.cpp
    reads it, padded with unused tokens up to `vocab_size` (the model's embedding rows).

    `source` may also be a path (see `load_tokenizer`); a GGUF's own fields are then copied as
    they are, whatever kind of vocabulary they describe."""
    if not isinstance(source, Tokenizer):
        path = find_tokenizer(source)
        if _is_gguf(path):
            fields = gguf_vocab.read_tokenizer_fields(path)
            return gguf_vocab.padded(fields, vocab_size or 0)
        source = load_tokenizer(path)
    return gguf_vocab.gguf_fields(to_hf(source), vocab_size)


# ---------------------------------------------------------------- writing


def save_tokenizer(
    tokenizer: Tokenizer,
    path: str | Path,
    format: str = "hf",
    *,
    model_max_length: int | None = None,
) -> list[Path]:
    """Write `tokenizer` as the format keeps it; returns the files written.

    Args:
        tokenizer: any herd tokenizer.
        path: the checkpoint directory (hf, meta), or for gguf a .gguf file to hold the
            vocabulary alone (a directory gets tokenizer.gguf).
        format: "hf" (tokenizer.json, tokenizer_config.json, generation_config.json), "meta"
            (tokenizer.model for Llama 3's tiktoken BPE; other vocabularies have no Meta form
            and are written as tokenizer.json, which `load_tokenizer` finds there) or "gguf".
        model_max_length: the context length to declare (hf).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown tokenizer format {format!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    if format == "hf":
        return to_hf(tokenizer).save(path, model_max_length)
    if format == "meta":
        return _save_meta(tokenizer, path, model_max_length)
    return _save_gguf(tokenizer, path)


def _save_meta(tokenizer: Tokenizer, directory: Path, model_max_length: int | None) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    ranks = tiktoken_ranks(tokenizer)
    if ranks is not None:
        return [save_ranks(ranks, directory / META_TOKENIZER_FILE)]
    log.info(
        "%s: Meta's tokenizer.model holds only Llama 3's tiktoken BPE; writing this tokenizer as "
        "%s instead",
        directory,
        TOKENIZER_FILE,
    )
    return to_hf(tokenizer).save(directory, model_max_length)


def _save_gguf(tokenizer: Tokenizer, path: Path) -> list[Path]:
    if path.is_dir():
        path = path / GGUF_TOKENIZER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in gguf_fields(tokenizer).items():
        writer.add_key_value(key, value.value, value.type, sub_type=value.sub_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return [path]
