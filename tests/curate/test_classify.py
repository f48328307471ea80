"""The classifiers: fastText and the transformer student learn a teacher's labels, the steps
score, threshold and tag domains, the transformer's features are transformers' hidden states,
and the LLM teacher's verdict is the answer word with the most probability as transformers
computes it."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys

import pytest
import torch
from datatrove.data import Document

from herd.curate.classify import (
    DOMAIN,
    QUALITY,
    Domain,
    Quality,
    TransformerClassifier,
    heuristic_domain,
    heuristic_quality,
    llm_teacher,
    train_classifiers,
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


def labelled_texts(rng: random.Random) -> list[str]:
    prose = [p for p in shakespeare_paragraphs(200) if heuristic_quality(p) == "hq"][:80]
    texts = prose + [junk(rng) for _ in range(80)]
    rng.shuffle(texts)
    assert sum(heuristic_quality(t) == "hq" for t in texts) == len(prose) >= 40
    return texts


def test_fasttext_learns_the_teacher(tmp_path):
    rng = random.Random(0)
    texts = labelled_texts(rng)
    report = train_classifiers(texts, QUALITY, heuristic_quality, tmp_path / "q.bin")
    assert report.labelled == len(texts) and report.held_out == len(texts) - int(len(texts) * 0.8)
    (fasttext,) = report.students
    assert fasttext.accuracy >= 0.9 > report.majority

    step = Quality(str(tmp_path / "q.bin"), threshold=0.5)
    good = Document(text=next(t for t in texts if heuristic_quality(t) == "hq"), id="g")
    bad = Document(text=junk(rng), id="b")
    assert step.filter(good) is True and good.metadata["quality"] >= 0.5
    assert step.filter(bad) == (False, "low_quality") and bad.metadata["quality"] < 0.5


WEIGHTS_AFTER_TRAINING = """
import sys
from pathlib import Path
import numpy as np
from herd.curate.classify import FastText
pairs = [(f"the cat sat on mat number {i} today", "hq") for i in range(20)]
pairs += [(f"x{i} 200 GET /api {i}ms", "lq") for i in range(20)]
weights = FastText.train(pairs, Path(sys.argv[1]), epoch=2).model.get_input_matrix()
print(float(np.abs(weights).max()))
"""


def test_fasttext_initialises_every_weight(tmp_path):
    # The allocator told to hand out heap memory filled with a pattern byte: weights fastText
    # failed to initialise then read as huge numbers instead of a fresh mmap's zeros (as on CI).
    env = {"MALLOC_PERTURB_": "42", "MALLOC_MMAP_THRESHOLD_": "4000000000", "PATH": ""}
    command = [sys.executable, "-c", WEIGHTS_AFTER_TRAINING, str(tmp_path / "m.bin")]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    assert float(run.stdout) < 10  # initialised within 1/dim, moved by a few small steps


def test_transformer_student_features_are_transformers_hidden_states(llama3_base):
    from transformers import AutoModel

    student = TransformerClassifier(str(llama3_base), QUALITY.labels, max_tokens=24,
                                    tokenizer="llama3")  # fmt: skip
    texts = [shakespeare_paragraphs(3)[2], "short text", "def f(x):\n    return x + 1\n" * 3]
    ours = student.features(texts, batch=2)  # padded batches of mixed lengths
    theirs = AutoModel.from_pretrained(llama3_base, dtype=torch.float32).eval()
    for text, row in zip(texts, ours):
        ids = student.tokenizer.encode(text, bos=True)[:24]
        with torch.no_grad():
            hidden = theirs(torch.tensor([ids])).last_hidden_state[0]
        assert torch.allclose(row, hidden.mean(0), atol=1e-5)


def test_transformer_student_learns_the_teacher_and_reloads(tmp_path, llama3_base):
    from herd.tokenizer import load_tokenizer, save_tokenizer

    base = tmp_path / "base"  # the random llama3-vocabulary model with its tokenizer beside it
    shutil.copytree(llama3_base, base)
    save_tokenizer(load_tokenizer("llama3"), base, "hf")
    texts = labelled_texts(random.Random(1))
    out = tmp_path / "q.bin"
    report = train_classifiers(texts, QUALITY, heuristic_quality, out, transformer=str(base),
                               max_tokens=48)  # fmt: skip
    _fasttext, transformer = report.students
    assert transformer.student.startswith("transformer") and transformer.accuracy >= 0.9
    assert transformer.accuracy > report.majority
    step = Quality(str(tmp_path / "q-transformer"), threshold=0.5)  # reloaded from its folder
    for text in texts[-8:]:
        doc = Document(text=text, id="x")
        kept = step.filter(doc)
        assert (kept is True) == (doc.metadata["quality"] >= 0.5)
    with pytest.raises(ValueError, match="not quality labels"):
        train_classifiers(texts[:10], QUALITY, lambda t: "maybe", out)


def test_domain_teacher_and_step(tmp_path):
    code = [
        (
            "import os\n\ndef main():\n    for name in os.listdir('.'):\n        "
            "print(name)\n    return 0\n\nmain()"
        ),
        ">>> import json\n>>> json.dumps({'a': None})\n'{\"a\": null}'\n",
    ]
    math = [
        (
            "Solve 3x + 5 = 20. Subtract 5: 3x = 15, so x = 5. The proof of the theorem "
            "follows: the sum 2 + 2 = 4 and 7 * 6 = 42, every prime p > 2 is odd."
        )
    ]
    general = shakespeare_paragraphs(3)
    assert [heuristic_domain(t) for t in code + math] == ["code", "code", "math"]
    assert {heuristic_domain(t) for t in general} == {"general"}
    rng = random.Random(0)
    texts = [rng.choice(code + math) + f" {i}" for i in range(60)] + shakespeare_paragraphs(60)
    rng.shuffle(texts)
    report = train_classifiers(texts, DOMAIN, heuristic_domain, tmp_path / "d.bin")
    assert set(report.counts) == {"code", "math", "general"}
    step = Domain(str(tmp_path / "d.bin"))
    docs = [Document(text=code[0], id="c"), Document(text=general[0], id="g"),
            Document(text=general[1], id="de", metadata={"language": "de"})]  # fmt: skip
    for doc in docs:
        assert step.filter(doc) is True
    assert [d.metadata["domain"] for d in docs] == ["code", "general", "multilingual"]
    assert abs(sum(docs[0].metadata["domain_scores"].values()) - 1) < 1e-3


def test_missing_model_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="herd curate train-classifier"):
        Quality(str(tmp_path / "none.bin"))


@pytest.mark.parametrize("task", [QUALITY, DOMAIN])
def test_llm_teacher_picks_the_likeliest_answer_like_transformers(
    task, smollm2_transformers, smollm2_transformers_tokenizer
):
    label = llm_teacher("smollm2", task, max_tokens=64)
    tok = smollm2_transformers_tokenizer
    for text in (shakespeare_paragraphs(1)[0], "buy now cheap 1234 click here " * 8,
                 "def add(a, b):\n    return a + b\n" * 4):  # fmt: skip
        excerpt = tok.decode(tok.encode(text, add_special_tokens=False)[:64])
        messages = [{"role": "user", "content": task.question.format(text=excerpt)}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
        with torch.no_grad():
            logits = smollm2_transformers(ids).logits[0, -1]
        mass = {
            lab: float(torch.logsumexp(logits[[tok.encode(w, add_special_tokens=False)[0]
                                               for w in words]], 0))
            for lab, words in task.answers.items()
        }  # fmt: skip
        assert label(text) == max(mass, key=mass.get)
