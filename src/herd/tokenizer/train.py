"""Train a small byte-level BPE vocabulary for tiny from-scratch models.

The result uses Llama 3's pre-tokenisation pattern and its named special tokens (placed after
the learned tokens, as in Llama 3), so the chat format and document packing work unchanged.
It is written as a Hugging Face tokenizer.json that `herd.load_tokenizer` and transformers read.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from herd.tokenizer.llama3 import NAMED_SPECIAL_TOKENS, PATTERN, STOP_TOKENS

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
CORPUS_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES


def corpus_suffix(path: Path) -> str:
    """The suffix that says how to read `path` (".jsonl.gz" counts as one)."""
    return ".jsonl.gz" if path.name.endswith(".jsonl.gz") else path.suffix


def corpus_files(paths: Iterable[str | Path]) -> list[Path]:
    """Text, JSONL and Parquet files named directly or found under directories."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if corpus_suffix(p) in CORPUS_SUFFIXES)
            if not found:
                raise ValueError(
                    f"{path}: no .txt, .md, .jsonl or .parquet files in this directory"
                )
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
    return files


def read_documents(files: Iterable[Path]) -> Iterator[str]:
    """Plain text files are one document each; each JSONL line and each Parquet row holds one
    in its `text` field. A record without a string `text` (missing, null, another type) is an
    error naming the file and line or row; empty texts are passed on as they are."""
    for file in files:
        if corpus_suffix(file) in JSONL_SUFFIXES:
            yield from _jsonl_texts(file)
        elif file.suffix in PARQUET_SUFFIXES:
            yield from _parquet_texts(file)
        else:
            yield file.read_text(encoding="utf-8", errors="replace")


def _jsonl_texts(file: Path) -> Iterator[str]:
    opener = gzip.open if file.name.endswith(".gz") else open
    with opener(file, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(
                    f'{file}:{number}: expected a JSON object with a "text" field'
                ) from None
            if not isinstance(text, str):
                raise TypeError(f'{file}:{number}: "text" must be a string')
            yield text


def _parquet_texts(file: Path) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{file}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{file}: not a readable Parquet file ({e})") from None
    schema = table.schema_arrow
    if "text" not in schema.names:
        raise ValueError(f'{file}: no "text" column (it has {", ".join(schema.names)})')
    kind = schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise TypeError(f'{file}: the "text" column holds {kind}, not strings')
    row = 0
    for batch in table.iter_batches(columns=["text"]):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                raise ValueError(f'{file}: row {row}: "text" is null')
            yield text


def train_bpe(
    documents: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    show_progress: bool = True,
) -> Tokenizer:
    """Learn a byte-level BPE with `vocab_size` ids in total, the special tokens included."""
    specials = list(NAMED_SPECIAL_TOKENS)
    smallest = 256 + len(specials)
    if vocab_size < smallest:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: the 256 byte tokens and "
            f"{len(specials)} special tokens alone need {smallest}"
        )
    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials),
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    # after the learned tokens, like Llama 3's 128000.. ids
    tokenizer.add_special_tokens(specials)
    bos = "<|begin_of_text|>"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, tokenizer.token_to_id(bos))],
    )
    return tokenizer


def save_trained(tokenizer: Tokenizer, out: str | Path) -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json (BOS/EOS, the Llama 3 chat template) and
    generation_config.json (the stop ids: end of text, end of message, end of turn)."""
    from herd.tokenizer.chat import LLAMA3_CHAT_TEMPLATE

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "pad_token": "<|finetune_right_pad_id|>",
        "add_bos_token": True,
        "chat_template": LLAMA3_CHAT_TEMPLATE,
    }
    stops = [tokenizer.token_to_id(t) for t in STOP_TOKENS]
    generation = {"bos_token_id": tokenizer.token_to_id("<|begin_of_text|>"), "eos_token_id": stops}
    files = {"tokenizer_config.json": config, "generation_config.json": generation}
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
    return [out / "tokenizer.json", *(out / name for name in files)]
