"""Model-based quality filtering (paper §3.1.1): a teacher labels a sample of documents, a
fastText classifier learns the labels, and the `quality` step scores every document with it.

Teachers: a Llama chat model asked the recipe's question about each document (the answer's
P(yes) against P(no) from the next-token logits; SmolLM2 ships offline), or a heuristic one
(length, alphabetic share, stop words, sentence endings) where no model is wanted."""

from __future__ import annotations

import random
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter

QUESTION = (
    "Here is a web page:\n\n{text}\n\nWould this page be useful as a reference for a "
    "Wikipedia article or as educational material? Answer yes or no."
)
STOP_WORDS = frozenset(
    [
        "the",
        "of",
        "and",
        "to",
        "a",
        "in",
        "is",
        "that",
        "it",
        "for",
        "as",
        "with",
        "was",
        "on",
        "be",
        "by",
        "this",
        "are",
        "or",
        "from",
        "at",
        "an",
        "which",
        "not",
        "have",
        "has",
        "can",
        "but",
        "if",
        "they",
        "their",
        "its",
        "one",
        "all",
        "you",
        "we",
    ]
)


def heuristic_label(text: str) -> bool:
    """Prose-like text: 80+ words of mostly letters, stop words at 20%+ of the words, most
    non-empty lines ending a sentence."""
    words = re.findall(r"[\w']+", text.lower())
    if len(words) < 80:
        return False
    letters = sum(c.isalpha() for c in text) / max(1, len(text))
    stop = sum(w in STOP_WORDS for w in words) / len(words)
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    ended = sum(ln[-1] in ".!?:\"')" for ln in lines) / max(1, len(lines))
    return letters > 0.7 and stop > 0.2 and ended > 0.4


def llm_teacher(model: str, question: str = QUESTION, max_tokens: int = 384) -> Callable:
    """A labeller asking `model` (a chat checkpoint) `question` about each text."""
    import torch

    from herd.infer import Llama

    llama = Llama.load(model, dtype=torch.float32)
    yes = llama.tokenizer.encode(" yes")[-1], llama.tokenizer.encode("Yes")[-1]
    no = llama.tokenizer.encode(" no")[-1], llama.tokenizer.encode("No")[-1]

    def label(text: str) -> bool:
        ids = llama.tokenizer.encode(text)[:max_tokens]
        excerpt = llama.tokenizer.decode(ids)
        dialog = [{"role": "user", "content": question.format(text=excerpt)}]
        prompt = list(llama.chat_format.encode_dialog(dialog, add_generation_prompt=True))
        with torch.no_grad():
            logits = llama.model(torch.tensor([prompt]), last_only=True)[0, -1]
        return bool(torch.logsumexp(logits[list(yes)], 0) > torch.logsumexp(logits[list(no)], 0))

    return label


def read_texts(folder: Path, limit: int) -> list[str]:
    """Up to `limit` documents of the JSONL(.gz) files under `folder`, shuffled (seed 0)."""
    from herd.tokenizer.train import corpus_files, read_documents

    texts = list(read_documents(corpus_files([folder])))
    if not texts:
        raise FileNotFoundError(f"{folder}: no documents to label")
    random.Random(0).shuffle(texts)
    return texts[:limit]


def one_line(text: str) -> str:
    return " ".join(text.split())


@dataclass
class ClassifierReport:
    labelled: int
    positive: int
    held_out: int
    accuracy: float  # of the classifier against the teacher on held-out documents
    majority: float  # always answering the commoner label


def train_classifier(texts: Iterable[str], label: Callable[[str], bool], out: Path,
                     held_out: float = 0.2, epoch: int = 25) -> ClassifierReport:  # fmt: skip
    """Label `texts` with the teacher, train fastText on the first part, score the rest."""
    import fasttext

    labelled = [(one_line(t), label(t)) for t in texts]
    cut = max(1, int(len(labelled) * (1 - held_out)))
    train, test = labelled[:cut], labelled[cut:]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        for text, good in train:
            f.write(f"__label__{'hq' if good else 'lq'} {text}\n")
    model = fasttext.train_supervised(f.name, epoch=epoch, wordNgrams=2, lr=0.5, verbose=0)
    Path(f.name).unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save_model(str(out))
    hits = sum((quality_score(model, t) >= 0.5) == good for t, good in test)
    positive = sum(good for _, good in labelled)
    commoner = max(sum(g for _, g in test), len(test) - sum(g for _, g in test))
    return ClassifierReport(len(labelled), positive, len(test), hits / max(1, len(test)),
                            commoner / max(1, len(test)))  # fmt: skip


def quality_score(model, text: str) -> float:
    """P(high quality) by the fastText model."""
    labels, probs = model.predict(one_line(text), k=2)
    return dict(zip(labels, probs)).get("__label__hq", 0.0)


class Quality(BaseFilter):
    """A fastText classifier's P(high quality) into `metadata.quality`; documents below
    `threshold` removed."""

    name = "quality"

    def __init__(self, model: str, threshold: float = 0.5, exclusion_writer=None):
        super().__init__(exclusion_writer)
        if not Path(model).is_file():
            raise FileNotFoundError(
                f"[quality] model {model}: no such file; train one with "
                "`herd curate train-classifier RECIPE`"
            )
        self.model_path, self.threshold = model, threshold
        self._model = None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._model is None:
            import fasttext

            self._model = fasttext.load_model(self.model_path)
        score = quality_score(self._model, doc.text)
        doc.metadata["quality"] = round(float(score), 4)
        return True if score >= self.threshold else (False, "low_quality")
