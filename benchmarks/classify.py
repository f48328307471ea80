"""Curation classifiers: fastText against the distilled transformer student, on held-out teacher
labels (the paper distils its Llama teacher into both, fastText at scale and DistilRoBERTa).

    python benchmarks/classify.py [--documents out/curated/documents] [--sample 300]
                                  [--teachers heuristic,smollm2] [--student smollm2]

For the quality and the domain task and each teacher, the teacher labels the same `sample`
documents (shuffled, seed 0); both students learn the first 80% and are scored on the rest:
fastText (herd's settings: 25 epochs, word bigrams) and a linear head on the student model's
mean-pooled final hidden states of each document's first `max_tokens` tokens (weight decay
picked on a held-out quarter of the training part). The documents are those
`herd curate recipes/curate-web.toml` kept from the offline corpus (python3.11-doc and
Shakespeare pages).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from herd.curate import classify

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--documents", type=Path, default=ROOT / "out" / "curated" / "documents")
    parser.add_argument("--sample", type=int, default=300)
    parser.add_argument("--teachers", default="heuristic,smollm2")
    parser.add_argument("--student", default="smollm2", help="the transformer student's base")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench-classify")
    args = parser.parse_args()
    if not args.documents.is_dir():
        raise SystemExit(
            f"{args.documents}: no documents; run `python scripts/curate_corpus.py out/corpus` "
            "and `herd curate recipes/curate-web.toml` first"
        )
    console = Console(width=120)
    texts = classify.read_texts(args.documents, args.sample)
    cut = int(len(texts) * 0.8)
    start = time.perf_counter()
    student = classify.TransformerClassifier(args.student, ("x",), args.max_tokens)
    features = student.features(texts, progress=True)
    feature_s = time.perf_counter() - start
    table = Table(title=f"{len(texts)} documents ({cut} train / {len(texts) - cut} held out); "
                  f"held-out accuracy against the teacher")  # fmt: skip
    for column in ("task", "teacher", "labels", "fastText", f"transformer ({args.student})",
                   "commonest label", "teacher s"):  # fmt: skip
        table.add_column(
            column, justify="left" if column in ("task", "teacher", "labels") else "right"
        )
    for task in (classify.QUALITY, classify.DOMAIN):
        for name in args.teachers.split(","):
            start = time.perf_counter()
            teacher = task.heuristic if name == "heuristic" else classify.llm_teacher(name, task)
            labels = [teacher(t) for t in texts]
            teacher_s = time.perf_counter() - start
            test = labels[cut:]
            pairs = list(zip(texts, labels))
            fasttext = classify.FastText.train(pairs[:cut], args.work / f"{task.name}-{name}.bin")
            ft = classify.accuracy(fasttext, pairs[cut:])
            student.labels = task.labels
            student.fit(features[:cut], labels[:cut])
            predicted = student.probabilities(features[cut:]).argmax(-1).tolist()
            tr = sum(task.labels[p] == lab for p, lab in zip(predicted, test)) / len(test)
            majority = max(Counter(test).values()) / len(test)
            counts = ", ".join(f"{k} {v}" for k, v in sorted(Counter(labels).items()))
            table.add_row(task.name, name, counts, f"{100 * ft:.1f}%", f"{100 * tr:.1f}%",
                          f"{100 * majority:.1f}%", f"{teacher_s:.0f}")  # fmt: skip
            console.print(f"{task.name} / {name}: fastText {ft:.3f}, "
                          f"transformer {tr:.3f}, majority {majority:.3f}")  # fmt: skip
    console.print(table)
    console.print(f"student features: {feature_s:.0f} s for {len(texts)} documents "
                  f"({args.max_tokens} tokens each at most)")  # fmt: skip


if __name__ == "__main__":
    main()
