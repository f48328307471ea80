"""Model-based classifiers (paper §3.1.1-3.1.2): a teacher labels a sample of documents, a
student learns the labels, and a step scores every document with the student.

Two tasks, each a `Task` (its labels, teacher question and heuristic teacher): `QUALITY`
("would this be referenced by Wikipedia / is it educational") and `DOMAIN` (code, math and
reasoning, or general text; the data mix reads it). Teachers: a Llama chat model asked the
task's question (the label whose answer word has the most next-token probability; SmolLM2
ships offline), or a heuristic one where no model is wanted. Students: fastText, as the paper
uses at scale, and the distillation the paper also does into a small transformer: a herd
model's mean-pooled final hidden states under a trained linear head (the backbone frozen), so
any checkpoint herd reads can be the encoder.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from rich.progress import track

STOP_WORDS = frozenset((
    "the", "of", "and", "to", "a", "in", "is", "that", "it", "for", "as", "with", "was", "on",
    "be", "by", "this", "are", "or", "from", "at", "an", "which", "not", "have", "has", "can",
    "but", "if", "they", "their", "its", "one", "all", "you", "we",
))  # fmt: skip


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[str, ...]
    question: str  # {text} stands for the document
    answers: dict[str, tuple[str, ...]]  # label -> the answer words that mean it
    heuristic: Callable[[str], str]


def heuristic_quality(text: str) -> str:
    """ "hq" for prose-like text: 80+ words of mostly letters, stop words at 20%+ of the words,
    most non-empty lines ending a sentence; "lq" otherwise."""
    words = re.findall(r"[\w']+", text.lower())
    if len(words) < 80:
        return "lq"
    letters = sum(c.isalpha() for c in text) / max(1, len(text))
    stop = sum(w in STOP_WORDS for w in words) / len(words)
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    ended = sum(ln[-1] in ".!?:\"')" for ln in lines) / max(1, len(lines))
    return "hq" if letters > 0.7 and stop > 0.2 and ended > 0.4 else "lq"


CODE_LINE = re.compile(
    r"^\s*(>>>|\.\.\.|def |class |import |from \S+ import|return\b|if .*:$|for .*:$|#include|"
    r"[A-Za-z_][\w.\[\]]* = |[\w.]+\(.*\)$|[{}]$)|;\s*$"
)
MATH = re.compile(r"\\(frac|sum|int|sqrt|alpha|beta|pi|cdot|leq|geq)|\d\s*[-+*/^×÷=<>]\s*-?\d")
MATH_WORDS = frozenset((
    "theorem", "proof", "lemma", "equation", "equals", "solve", "integer", "integers", "prime",
    "sum", "product", "fraction", "fractions", "probability", "derivative", "integral", "matrix",
    "rational", "arithmetic", "mean", "variance", "logarithm", "exponent", "polynomial",
))  # fmt: skip


def heuristic_domain(text: str) -> str:
    """ "math" when arithmetic, TeX or mathematical vocabulary make 1.2% of the words, else
    "code" when a quarter of the non-empty lines look like source code, else "general"."""
    words = re.findall(r"[a-z]+", text.lower())
    math = len(MATH.findall(text)) + sum(w in MATH_WORDS for w in words)
    if words and math / len(words) >= 0.012:
        return "math"
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if lines and sum(bool(CODE_LINE.search(ln)) for ln in lines) / len(lines) >= 0.25:
        return "code"
    return "general"


QUALITY = Task(
    "quality",
    ("hq", "lq"),
    "Here is a web page:\n\n{text}\n\nWould this page be useful as a reference for a "
    "Wikipedia article or as educational material? Answer yes or no.",
    {"hq": (" yes", "Yes"), "lq": (" no", "No")},
    heuristic_quality,
)
DOMAIN = Task(
    "domain",
    ("code", "math", "general"),
    "Here is a web page:\n\n{text}\n\nIs this page mainly source code, mathematics and "
    "reasoning, or something else? Answer code, math or other.",
    {"code": (" code", "Code"), "math": (" math", "Math"), "general": (" other", "Other")},
    heuristic_domain,
)
TASKS = {t.name: t for t in (QUALITY, DOMAIN)}


def answer_ids(tokenizer, words: Sequence[str]) -> list[int]:
    ids = []
    for word in words:
        pieces = tokenizer.encode(word)
        if len(pieces) != 1:
            raise ValueError(f"answer word {word!r} is {len(pieces)} tokens; use one-token words")
        ids += pieces
    return ids


def llm_teacher(model: str, task: Task, question: str = "", max_tokens: int = 384) -> Callable:
    """A labeller asking `model` (a chat checkpoint) the task's question (or `question`) about
    each text; the label is the one whose answer words get the most probability."""
    from herd.infer import Llama

    llama = Llama.load(model, dtype=torch.float32)
    tok = llama.tokenizer
    answers = {label: answer_ids(tok, words) for label, words in task.answers.items()}

    def label(text: str) -> str:
        excerpt = tok.decode(tok.encode(text)[:max_tokens])
        dialog = [{"role": "user", "content": (question or task.question).format(text=excerpt)}]
        prompt = list(llama.chat_format.encode_dialog(dialog, add_generation_prompt=True))
        with torch.no_grad():
            logits = llama.model(torch.tensor([prompt]), last_only=True)[0, -1]
        return max(answers, key=lambda k: float(torch.logsumexp(logits[answers[k]], 0)))

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


class Classifier(Protocol):
    labels: tuple[str, ...]

    def scores(self, texts: Sequence[str]) -> list[dict[str, float]]: ...


class FastText:
    """A fastText model trained on `__label__NAME text` lines."""

    def __init__(self, path: str | Path):
        import fasttext

        self.model = fasttext.load_model(str(path))
        self.labels = tuple(lab.removeprefix("__label__") for lab in self.model.get_labels())

    @classmethod
    def train(cls, pairs: Sequence[tuple[str, str]], out: Path, epoch: int = 25) -> FastText:
        import fasttext

        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            for text, label in pairs:
                f.write(f"__label__{label} {one_line(text)}\n")
        # Ten threads, no fewer: fastText's DenseMatrix::uniform gives each thread a tenth of the
        # input matrix, so with under ten the rest keeps whatever the allocator returned (zeros
        # from a fresh mmap here, garbage on CI, where training hit NaN). Ten cover it all.
        model = fasttext.train_supervised(f.name, epoch=epoch, wordNgrams=2, lr=0.5, thread=10,
                                          seed=0, verbose=0)  # fmt: skip
        Path(f.name).unlink()
        out.parent.mkdir(parents=True, exist_ok=True)
        model.save_model(str(out))
        return cls(out)

    def scores(self, texts: Sequence[str]) -> list[dict[str, float]]:
        out = []
        for text in texts:
            labels, probs = self.model.predict(one_line(text), k=len(self.labels))
            out.append({lab.removeprefix("__label__"): float(p) for lab, p in zip(labels, probs)})
        return out


SPEC_FILE, HEAD_FILE = "classifier.json", "head.safetensors"
WEIGHT_DECAYS = (1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


def fit_linear(x: torch.Tensor, target: torch.Tensor, classes: int, weight_decay: float,
               steps: int = 300) -> torch.nn.Linear:  # fmt: skip
    """Multinomial logistic regression by L-BFGS, L2 penalty on the weights."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(x), target)
        loss = loss + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return linear


class TransformerClassifier:
    """A herd model's mean-pooled final hidden states of a text's first `max_tokens` tokens
    (standardised) under a linear head; the backbone is frozen, only the head is trained."""

    def __init__(self, base: str, labels: Sequence[str], max_tokens: int = 256,
                 tokenizer: str = "", head: dict[str, torch.Tensor] | None = None):  # fmt: skip
        from herd.finetune.trainer import base_tokenizer, load_base
        from herd.tokenizer import load_tokenizer

        self.base, self.labels, self.max_tokens = base, tuple(labels), max_tokens
        self.tokenizer_name = tokenizer or str(base_tokenizer(base))
        self.model = load_base(base).eval()
        self.tokenizer = load_tokenizer(self.tokenizer_name)
        self.head = head

    @torch.no_grad()
    def features(
        self, texts: Sequence[str], batch: int = 8, progress: bool = False
    ) -> torch.Tensor:
        """(len(texts), dim) float32: the mean over each text's tokens of the final hidden state."""
        ids = [self.tokenizer.encode(t, bos=True)[: self.max_tokens] for t in texts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.zeros(len(ids), self.model.config.dim)
        starts = range(0, len(order), batch)
        for start in track(starts, "features") if progress else starts:
            rows = order[start : start + batch]
            width = max(len(ids[i]) for i in rows)
            # right padding: causal attention keeps it out of every real position
            tokens = torch.tensor([ids[i] + [0] * (width - len(ids[i])) for i in rows])
            valid = torch.tensor([[j < len(ids[i]) for j in range(width)] for i in rows])
            hidden = self.model.final_hidden(tokens).float()
            pooled = (hidden * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
            out[rows] = pooled
        return out

    def fit(self, features: torch.Tensor, labels: Sequence[str],
            weight_decay: float | None = None) -> None:  # fmt: skip
        """Train the head (L-BFGS on cross-entropy + weight_decay * |W|²); without a
        weight_decay, the one of WEIGHT_DECAYS that scores best on a quarter of the data held
        out of a first fit."""
        target = torch.tensor([self.labels.index(lab) for lab in labels])
        mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
        x = (features - mean) / std
        if weight_decay is None:
            cut = max(1, int(len(x) * 0.75))
            scores = [((fit_linear(x[:cut], target[:cut], len(self.labels), wd)(x[cut:])
                        .argmax(-1) == target[cut:]).float().mean(), -wd)
                      for wd in WEIGHT_DECAYS]  # fmt: skip
            weight_decay = -max(scores)[1]
        linear = fit_linear(x, target, len(self.labels), weight_decay)
        self.head = {"weight": linear.weight.detach(), "bias": linear.bias.detach(),
                     "mean": mean, "std": std}  # fmt: skip

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        h = self.head
        return torch.softmax((features - h["mean"]) / h["std"] @ h["weight"].T + h["bias"], -1)

    def scores(self, texts: Sequence[str]) -> list[dict[str, float]]:
        probs = self.probabilities(self.features(texts))
        return [dict(zip(self.labels, row.tolist())) for row in probs]

    def save(self, out: Path) -> None:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.head.items()}, str(out / HEAD_FILE))
        spec = {"base": self.base, "tokenizer": self.tokenizer_name, "labels": self.labels,
                "max_tokens": self.max_tokens, "pooling": "mean"}  # fmt: skip
        (out / SPEC_FILE).write_text(json.dumps(spec, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> TransformerClassifier:
        from safetensors.torch import load_file

        spec = json.loads((path / SPEC_FILE).read_text())
        head = load_file(str(path / HEAD_FILE))
        return cls(spec["base"], spec["labels"], spec["max_tokens"], spec["tokenizer"], head)


def load_classifier(path: str | Path, step: str) -> Classifier:
    """A student saved by `herd curate train-classifier`: a fastText file or a transformer
    classifier folder."""
    path = Path(path)
    if (path / SPEC_FILE).is_file():
        return TransformerClassifier.load(path)
    if path.is_file():
        return FastText(path)
    raise FileNotFoundError(
        f"[{step}] model {path}: no such file; train one with `herd curate train-classifier "
        f"RECIPE{'' if step == 'quality' else ' --task ' + step}`"
    )


@dataclass
class StudentReport:
    student: str
    accuracy: float  # against the teacher on the held-out documents
    seconds: float


@dataclass
class ClassifierReport:
    task: str
    labelled: int
    counts: dict[str, int]  # teacher labels
    held_out: int
    majority: float  # always answering the commonest held-out label
    students: list[StudentReport] = field(default_factory=list)


def accuracy(classifier: Classifier, pairs: Sequence[tuple[str, str]]) -> float:
    predicted = [max(s, key=s.get) for s in classifier.scores([t for t, _ in pairs])]
    return sum(p == lab for p, (_, lab) in zip(predicted, pairs)) / max(1, len(pairs))


def train_classifiers(
    texts: Iterable[str],
    task: Task,
    label: Callable[[str], str],
    out: Path,
    transformer: str = "",
    max_tokens: int = 256,
    held_out: float = 0.2,
    progress: bool = False,
) -> ClassifierReport:
    """Label `texts` with the teacher; train fastText (to `out`) and, given a `transformer`
    base checkpoint, a transformer classifier (to OUT-transformer/) on the first 80%, and score
    both against the teacher on the rest."""
    import time

    texts = list(texts)
    labels = [label(t) for t in (track(texts, "teacher") if progress else texts)]
    unknown = set(labels) - set(task.labels)
    if unknown:
        raise ValueError(f"teacher labels {sorted(unknown)} are not {task.name} labels")
    pairs = list(zip(texts, labels))
    cut = max(1, int(len(pairs) * (1 - held_out)))
    train, test = pairs[:cut], pairs[cut:]
    report = ClassifierReport(task.name, len(pairs), dict(Counter(labels)), len(test),
                              max(Counter(lab for _, lab in test).values(), default=0)
                              / max(1, len(test)))  # fmt: skip
    start = time.perf_counter()
    ft = FastText.train(train, out)
    report.students.append(
        StudentReport("fasttext", accuracy(ft, test), time.perf_counter() - start)
    )
    if transformer:
        start = time.perf_counter()
        student = TransformerClassifier(transformer, task.labels, max_tokens)
        features = student.features([t for t, _ in pairs], progress=progress)
        student.fit(features[:cut], [lab for _, lab in train])
        predicted = student.probabilities(features[cut:]).argmax(-1).tolist()
        hits = sum(task.labels[p] == lab for p, (_, lab) in zip(predicted, test))
        student.save(transformer_dir(out))
        report.students.append(StudentReport(f"transformer ({transformer})",
                                             hits / max(1, len(test)),
                                             time.perf_counter() - start))  # fmt: skip
    return report


def transformer_dir(fasttext_path: Path) -> Path:
    return fasttext_path.with_name(f"{fasttext_path.stem}-transformer")


class Quality(BaseFilter):
    """A classifier's P(high quality) into `metadata.quality`; documents below `threshold`
    removed."""

    name = "quality"

    def __init__(self, model: str, threshold: float = 0.5, exclusion_writer=None):
        super().__init__(exclusion_writer)
        load_classifier(model, "quality")  # fail at build time, not in a task
        self.model_path, self.threshold = model, threshold
        self._model: Classifier | None = None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._model is None:
            self._model = load_classifier(self.model_path, "quality")
        score = self._model.scores([doc.text])[0].get("hq", 0.0)
        doc.metadata["quality"] = round(score, 4)
        return True if score >= self.threshold else (False, "low_quality")


class Domain(BaseFilter):
    """The classifier's most likely domain (code, math, general) into `metadata.domain` and its
    probabilities into `metadata.domain_scores`; a document whose language (from the language
    step) is not English is "multilingual". Removes nothing."""

    name = "domain"

    def __init__(self, model: str, english: Sequence[str] = ("en",)):
        super().__init__()
        load_classifier(model, "domain")
        self.model_path, self.english = model, tuple(english)
        self._model: Classifier | None = None

    def filter(self, doc: Document) -> bool:
        if self._model is None:
            self._model = load_classifier(self.model_path, "domain")
        scores = self._model.scores([doc.text])[0]
        doc.metadata["domain_scores"] = {k: round(v, 4) for k, v in scores.items()}
        language = doc.metadata.get("language", "en")
        doc.metadata["domain"] = (
            max(scores, key=scores.get) if language in self.english else "multilingual"
        )
        self.stat_update(f"domain_{doc.metadata['domain']}")
        return True
