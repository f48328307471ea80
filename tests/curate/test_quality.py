"""The quality classifier: fastText learns a teacher's labels, the step scores and thresholds,
and the LLM teacher's verdict is P(yes) against P(no) as transformers computes it."""

from __future__ import annotations

import random

import pytest
import torch
from datatrove.data import Document

from herd.curate.quality import (
    QUESTION,
    Quality,
    heuristic_label,
    llm_teacher,
    train_classifier,
)
from tests.curate.test_steps import shakespeare_paragraphs


def junk(rng: random.Random) -> str:
    kinds = [
        lambda: "\n".join(f"12:{rng.randint(0, 59):02d} GET /api/v{rng.randint(1, 3)} 200 "
                          f"{rng.randint(100, 999)}ms" for _ in range(40)),
        lambda: "\n".join(rng.choice(["Home", "About us", "Login", "Cart", "Sitemap", "FAQ",
                                      "Terms", "Contact", "Blog"]) for _ in range(60)),
        lambda: " ".join(f"{rng.choice('abcdef')}{rng.randint(0, 99999)}" for _ in range(150)),
    ]  # fmt: skip
    return rng.choice(kinds)()


def test_fasttext_learns_the_teacher(tmp_path):
    rng = random.Random(0)
    prose = [p for p in shakespeare_paragraphs(200) if heuristic_label(p)][:80]
    texts = prose + [junk(rng) for _ in range(80)]
    rng.shuffle(texts)
    assert sum(map(heuristic_label, texts)) == len(prose) >= 40
    report = train_classifier(texts, heuristic_label, tmp_path / "q.bin")
    assert report.labelled == len(texts) and report.held_out == len(texts) - int(len(texts) * 0.8)
    assert report.accuracy >= 0.9 > report.majority

    step = Quality(str(tmp_path / "q.bin"), threshold=0.5)
    good, bad = Document(text=prose[0], id="g"), Document(text=junk(rng), id="b")
    assert step.filter(good) is True and good.metadata["quality"] >= 0.5
    assert step.filter(bad) == (False, "low_quality") and bad.metadata["quality"] < 0.5


def test_missing_model_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="herd curate train-classifier"):
        Quality(str(tmp_path / "none.bin"))


def test_llm_teacher_compares_yes_and_no_like_transformers(smollm2_transformers,
                                                           smollm2_transformers_tokenizer):  # fmt: skip
    label = llm_teacher("smollm2", max_tokens=64)
    tok = smollm2_transformers_tokenizer
    for text in (shakespeare_paragraphs(1)[0], "buy now cheap 1234 click here " * 8):
        assert isinstance(label(text), bool)
        excerpt = tok.decode(tok.encode(text, add_special_tokens=False)[:64])
        messages = [{"role": "user", "content": QUESTION.format(text=excerpt)}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
        with torch.no_grad():
            logits = smollm2_transformers(ids).logits[0, -1]
        yes = [
            tok.encode(" yes", add_special_tokens=False)[-1],
            tok.encode("Yes", add_special_tokens=False)[-1],
        ]
        no = [
            tok.encode(" no", add_special_tokens=False)[-1],
            tok.encode("No", add_special_tokens=False)[-1],
        ]
        want = bool(torch.logsumexp(logits[yes], 0) > torch.logsumexp(logits[no], 0))
        assert label(text) == want
