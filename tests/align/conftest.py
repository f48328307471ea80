"""Preference data and tiny Llama 3-vocabulary models (policy and a distinct reference) shared
by the alignment tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from herd.finetune.tasks import unit_conversions
from tests.conftest import hf_llama


def write_preferences(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def preference_records() -> list[dict]:
    """Unit conversions: the right answer chosen over a wrong one, responses of unequal
    lengths, one prompt with a system turn, one ranking with an edited response."""
    items = unit_conversions(6, seed=3)
    records = []
    for k, item in enumerate(items):
        value, unit = item.answer.split()
        wrong = f"{int(value) * 10} {unit}" if k % 2 else f"I think it is about {value[:-1] or 1}"
        records.append({"prompt": list(item.prompt), "chosen": item.answer, "rejected": wrong})
    records[1]["prompt"] = [
        {"role": "system", "content": "Answer with the number and unit."},
        *records[1]["prompt"],
    ]
    records[2]["edited"] = f"The answer is {items[2].answer}."
    return records


@pytest.fixture(scope="session")
def llama3_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(policy, reference): two random 2-layer models of Llama 3's vocabulary, each saved by
    transformers with the llama3 tokenizer beside it."""
    from herd.tokenizer import load_tokenizer
    from herd.tokenizer.formats import save_tokenizer

    tokenizer = load_tokenizer("llama3")
    paths = []
    for seed in (0, 1):
        path = tmp_path_factory.mktemp(f"llama3-{seed}")
        model = hf_llama(vocab_size=128256, seed=seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.05)
        model.save_pretrained(path)
        save_tokenizer(tokenizer, path, "hf")
        paths.append(path)
    return paths[0], paths[1]
