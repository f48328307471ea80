"""Heuristic filters (paper §3.1.1): repeated n-grams, dirty words, token-distribution outliers."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter

from herd.curate.corpus import CorpusStep, hash64

# -- repetition (Rae et al. 2021, "Gopher" rules) ---------------------------------------------


def top_ngram_fraction(words: list[str], n: int) -> float:
    """Characters of the most frequent word n-gram, times its count, over all word characters
    (0 when no n-gram repeats)."""
    total = sum(map(len, words))
    if len(words) < n or total == 0:
        return 0.0
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    gram, count = counts.most_common(1)[0]
    return 0.0 if count < 2 else min(1.0, sum(map(len, gram)) * count / total)


def duplicated_ngram_fraction(words: list[str], n: int) -> float:
    """Characters of the words covered by some n-gram that occurs more than once, over all word
    characters (a word in several repeated n-grams counts once)."""
    total = sum(map(len, words))
    if len(words) < n or total == 0:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    covered = np.zeros(len(words), dtype=bool)
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i : i + n] = True
    return sum(len(w) for w, c in zip(words, covered) if c) / total


class Repetition(BaseFilter):
    """Documents whose repeated n-grams cover too much of the text (logs, boilerplate)."""

    name = "repetition"

    def __init__(self, top: dict[str, float], duplicated: dict[str, float], exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.top = {int(n): t for n, t in top.items()}
        self.duplicated = {int(n): t for n, t in duplicated.items()}

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        words = doc.text.split()
        for n, limit in sorted(self.top.items()):
            if top_ngram_fraction(words, n) > limit:
                return False, f"top_{n}gram"
        for n, limit in sorted(self.duplicated.items()):
            if duplicated_ngram_fraction(words, n) > limit:
                return False, f"duplicated_{n}gram"
        return True


# -- dirty words (Raffel et al. 2020) ---------------------------------------------------------

WORDS = re.compile(r"[\w']+")


def default_dirty_words() -> list[str]:
    """datatrove's shipped English list (the one C4's filter uses), lines starting # dropped."""
    import datatrove

    path = Path(datatrove.__file__).parent / "assets" / "banned_words.txt"
    return [w for w in path.read_text().splitlines() if w.strip() and not w.startswith("#")]


class DirtyWords(BaseFilter):
    """Documents with more than `max_count` dirty words that also make up more than
    `max_ratio` of their words; the count and ratio land in metadata either way."""

    name = "dirty_words"

    def __init__(self, lists=(), max_count=3, max_ratio=0.002, exclusion_writer=None):
        super().__init__(exclusion_writer)
        words: list[str] = []
        for path in lists:
            if not Path(path).is_file():
                raise FileNotFoundError(f"[dirty_words] lists: {path}: no such file")
            words += [w for w in Path(path).read_text().splitlines() if w.strip()]
        words = words or default_dirty_words()
        normal = {" ".join(WORDS.findall(w.lower())) for w in words} - {""}
        self.single = {w for w in normal if " " not in w}
        self.phrases = sorted(w for w in normal if " " in w)
        self.max_count, self.max_ratio = max_count, max_ratio

    def count(self, text: str) -> tuple[int, int]:
        """(dirty words and phrases, words) in `text`."""
        words = WORDS.findall(text.lower())
        count = sum(w in self.single for w in words)
        if self.phrases:
            joined = f" {' '.join(words)} "
            count += sum(joined.count(f" {p} ") for p in self.phrases)
        return count, len(words)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        count, words = self.count(doc.text)
        ratio = count / words if words else 0.0
        doc.metadata["dirty_words"] = count
        doc.metadata["dirty_ratio"] = round(ratio, 6)
        if count > self.max_count and ratio > self.max_ratio:
            return False, "dirty_words"
        return True


# -- token-distribution KL divergence ----------------------------------------------------------


class TokenKL(CorpusStep):
    """Documents whose token distribution diverges most from the corpus's: KL(doc || corpus)
    above `threshold`, or the `top_percent` most divergent when no threshold is set."""

    name = "kl"

    def __init__(
        self, work: str, tokenizer="llama3", threshold=0.0, top_percent=1.0, min_tokens=20
    ):
        super().__init__(work)
        self.tokenizer_name = tokenizer
        self.threshold, self.top_percent, self.min_tokens = threshold, top_percent, min_tokens
        self._tokenizer = None

    def token_counts(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        if self._tokenizer is None:
            from herd.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_name)
        ids = np.asarray(self._tokenizer.encode(text, bos=False, eos=False), dtype=np.int64)
        return np.unique(ids, return_counts=True)

    def observe(self, doc, records):
        ids, counts = self.token_counts(doc.text)
        records.setdefault("key", []).append(hash64(doc.id))
        records.setdefault("types", []).append(len(ids))
        records.setdefault("ids", []).extend(ids.tolist())
        records.setdefault("counts", []).extend(counts.tolist())

    def record_arrays(self, records):
        return {
            "key": np.asarray(records.get("key", []), np.uint64),
            "types": np.asarray(records.get("types", []), np.int64),
            "ids": np.asarray(records.get("ids", []), np.int64),
            "counts": np.asarray(records.get("counts", []), np.int64),
        }

    def decide(self, records):
        key, types, ids, counts = (
            np.concatenate([r[k] for r in records]) for k in ("key", "types", "ids", "counts")
        )
        scores, tokens = kl_scores(types, ids, counts)
        scores[(tokens < self.min_tokens) | (types == 0)] = np.nan
        scored = scores[~np.isnan(scores)]
        if self.threshold > 0:
            cutoff = self.threshold
        else:
            cutoff = np.percentile(scored, 100 - self.top_percent) if len(scored) else np.inf
        order = np.argsort(key)
        return {"key": key[order], "score": scores[order], "cutoff": np.array(cutoff)}

    def apply(self, doc, decision):
        keys = decision["key"]
        k = np.uint64(hash64(doc.id))
        at = min(int(np.searchsorted(keys, k)), len(keys) - 1)
        score = float(decision["score"][at]) if len(keys) and keys[at] == k else np.nan
        if np.isnan(score):  # too short to score
            return True
        doc.metadata["kl"] = round(score, 4)
        return (False, "token_outlier") if score > decision["cutoff"] else True


def kl_scores(
    types: np.ndarray, ids: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(KL(q_doc || p_corpus) in nats, token count) for each document, from its (token id,
    count) runs: document d owns the next types[d] entries of ids/counts."""
    if len(types) == 0:
        return np.zeros(0), np.zeros(0)
    corpus = np.bincount(ids, weights=counts).astype(np.float64)
    p = corpus / corpus.sum()
    starts = np.r_[0, np.cumsum(types)[:-1]]
    doc_of = np.repeat(np.arange(len(types)), types)
    length = np.zeros(len(types))
    np.add.at(length, doc_of, counts)
    q = counts / length[doc_of]
    terms = q * np.log(q / p[ids])
    out = np.zeros(len(types))
    nonempty = types > 0
    out[nonempty] = np.add.reduceat(terms, starts[nonempty]) if len(terms) else 0.0
    return out, length


# -- benchmark decontamination (paper §5.1.4) ----------------------------------------------------


def _spaced(text: str) -> str:
    """White space collapsed: a page reflows an example's lines, which must not hide it."""
    return " ".join(text.split())


class Decontaminate(BaseFilter):
    """Documents that contain a benchmark example: an example whose token n-grams are at least
    `threshold` inside the document (the paper's §5.1.4 score, per document; white space
    collapsed on both sides) is counted in `metadata.contamination`; with `remove`, such a
    document is removed."""

    name = "decontaminate"

    def __init__(self, tasks=("gsm8k", "humaneval", "arc_easy", "arc_challenge", "mmlu"),
                 n=8, threshold=0.5, remove=True, tokenizer="llama3", exclusion_writer=None):  # fmt: skip
        super().__init__(exclusion_writer)
        self.tasks, self.n, self.threshold, self.remove = list(tasks), n, threshold, remove
        self.tokenizer_name = tokenizer
        self._index: dict[str, tuple] | None = None
        self._tokenizer = None

    def index(self) -> dict[str, tuple]:
        """Per task: its unique n-gram hashes, for each the range of (example) entries holding
        it, and each example's n-gram count."""
        if self._index is None:
            from herd.eval.contamination import example_text, ngram_hashes, task_items
            from herd.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_name)
            self._index = {}
            for task in self.tasks:
                texts = [_spaced(example_text(item)) for item in task_items(task)]
                grams = [np.unique(ngram_hashes(i, self.n))
                         for i in self._tokenizer.encode_batch_numpy(texts)]  # fmt: skip
                sizes = np.array([len(g) for g in grams])
                hashes = np.concatenate(grams) if grams else np.zeros(0, np.uint64)
                example = np.repeat(np.arange(len(grams)), sizes)
                order = np.argsort(hashes, kind="stable")
                unique, first = np.unique(hashes[order], return_index=True)
                last = np.r_[first[1:], len(order)]
                self._index[task] = (unique, first, last, example[order], sizes)
        return self._index

    def contaminated(self, text: str) -> dict[str, int]:
        """Per task, how many of its examples the text contains (at `threshold`)."""
        from herd.eval.contamination import ngram_hashes

        index = self.index()
        ids = self._tokenizer.encode(_spaced(text))
        doc = np.unique(ngram_hashes(np.asarray(ids), self.n))
        out = {}
        for task, (unique, first, last, example, sizes) in index.items():
            if len(unique) == 0 or len(doc) == 0:
                continue
            at = np.searchsorted(unique, doc).clip(max=len(unique) - 1)
            at = at[unique[at] == doc]
            if len(at) == 0:
                continue
            lengths = last[at] - first[at]
            entries = np.repeat(first[at] - np.cumsum(np.r_[0, lengths[:-1]]), lengths)
            entries += np.arange(lengths.sum())
            shared = np.bincount(example[entries], minlength=len(sizes))
            hit = int(((shared >= self.threshold * sizes) & (sizes > 0)).sum())
            if hit:
                out[task] = hit
        return out

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        found = self.contaminated(doc.text)
        if found:
            doc.metadata["contamination"] = found
            for task in found:
                self.stat_update(f"overlaps_{task}")
        if self.remove and found:
            return False, f"contaminated_{next(iter(found))}"
        return True
