"""The paper's three levels of dedup, each a corpus-wide step (herd.curate.corpus).

- URL: one document per normalised URL, the most recent crawl (ties: the smaller id hash).
- Document: MinHash over word shingles, LSH with `bands` x `rows`; every candidate pair
  (optionally only those whose signatures agree on >= threshold of their entries) joins a
  cluster, and each cluster keeps the member with the smallest id hash. datatrove's MinHash
  keeps the member first in (task, position) order, which changes with the task split; herd's
  choice does not.
- Line (ccNet): documents fall into buckets of about `bucket_docs` (by id hash); a line that
  occurs more than `max_count` times in its bucket is removed from every document in it.
  Lines are compared after lower-casing, collapsing white space and mapping digits to 0.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import numpy as np
from datatrove.data import Document

from herd.curate.corpus import CorpusStep, hash64, listed

# -- URL ----------------------------------------------------------------------------------------


def normalize_url(url: str) -> str:
    """Host without www., explicit default ports and case; path without a trailing slash;
    query parameters sorted; no fragment; http and https the same page."""
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower().rstrip(".")
    host = host.removeprefix("www.")
    try:
        port = parts.port
    except ValueError:
        port = None
    if port and port not in (80, 443):
        host = f"{host}:{port}"
    path = re.sub(r"/{2,}", "/", parts.path or "/")
    if len(path) > 1:
        path = path.rstrip("/")
    query = urlencode(sorted(parse_qsl(parts.query, keep_blank_values=True)))
    return host + path + (f"?{query}" if query else "")


def crawl_time(value: Any) -> float:
    """Seconds since the epoch of a WARC-Date or ISO date; -inf when missing or unreadable."""
    if not value:
        return -math.inf
    try:
        when = dt.datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
    except ValueError:
        return -math.inf
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


class URLDedup(CorpusStep):
    """One document per normalised URL: the most recent crawl."""

    name = "url_dedup"

    def observe(self, doc: Document, records: dict[str, list]) -> None:
        url = doc.metadata.get("url")
        if not url:
            return
        records.setdefault("url", []).append(hash64(normalize_url(url)))
        records.setdefault("time", []).append(crawl_time(doc.metadata.get("date")))
        records.setdefault("key", []).append(hash64(doc.id))

    def record_arrays(self, records):
        return {
            "url": np.asarray(records.get("url", []), np.uint64),
            "time": np.asarray(records.get("time", []), np.float64),
            "key": np.asarray(records.get("key", []), np.uint64),
        }

    def decide(self, records):
        url, time, key = (np.concatenate([r[k] for r in records]) for k in ("url", "time", "key"))
        # newest first within a URL; equal dates: the smaller id hash
        order = np.lexsort((key, -time, url))
        first = np.ones(len(order), dtype=bool)
        first[1:] = url[order][1:] != url[order][:-1]
        return {"removed": np.sort(key[order][~first])}

    def apply(self, doc, decision):
        if listed(decision["removed"], doc.id):
            return False, "older_crawl"
        return True


# -- MinHash ------------------------------------------------------------------------------------

PRIME = 4294967291  # the largest prime below 2**32: (a * x + b) stays below 2**64
WORD = re.compile(r"\w+")


class MinHashDedup(CorpusStep):
    """Near-duplicate documents (MinHash LSH): one per cluster is kept."""

    name = "minhash"

    def __init__(self, work: str, shingle=5, bands=14, rows=8, threshold=0.0, seed=1):
        super().__init__(work)
        self.shingle, self.bands, self.rows, self.threshold = shingle, bands, rows, threshold
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, PRIME, bands * rows, dtype=np.uint64)
        self.b = rng.integers(0, PRIME, bands * rows, dtype=np.uint64)
        self._words: dict[str, int] = {}

    def shingles(self, text: str) -> np.ndarray:
        """32-bit hashes of the document's word n-grams (one n-gram if it is shorter)."""
        words = WORD.findall(text.lower())
        if not words:
            return np.zeros(0, np.uint64)
        cache = self._words
        if len(cache) > 1_000_000:
            cache.clear()
        ids = np.fromiter(
            (cache.get(w) or cache.setdefault(w, hash64(w)) for w in words), np.uint64, len(words)
        )
        n = min(self.shingle, len(ids))
        windows = np.lib.stride_tricks.sliding_window_view(ids, n)
        mult = np.uint64(0x9E3779B97F4A7C15) ** np.arange(n, dtype=np.uint64)
        with np.errstate(over="ignore"):
            mixed = (windows * mult).sum(axis=1, dtype=np.uint64)
        return np.unique(mixed >> np.uint64(32))

    def signature(self, text: str) -> np.ndarray:
        x = self.shingles(text)
        if len(x) == 0:
            return np.full(len(self.a), PRIME, np.uint64)
        return ((x[:, None] * self.a[None, :] + self.b[None, :]) % np.uint64(PRIME)).min(axis=0)

    def band_hashes(self, signature: np.ndarray) -> np.ndarray:
        rows = signature.reshape(self.bands, self.rows)
        return np.array([hash64(r.tobytes().hex()) for r in rows], np.uint64)

    def observe(self, doc, records):
        signature = self.signature(doc.text)
        records.setdefault("key", []).append(hash64(doc.id))
        records.setdefault("bands", []).append(self.band_hashes(signature))
        if self.threshold > 0:
            records.setdefault("signature", []).append(signature)

    def record_arrays(self, records):
        n = len(records.get("key", []))
        out = {
            "key": np.asarray(records.get("key", []), np.uint64),
            "bands": np.asarray(records.get("bands", []), np.uint64).reshape(n, self.bands),
        }
        if self.threshold > 0:
            sig = np.asarray(records.get("signature", []), np.uint64)
            out["signature"] = sig.reshape(n, self.bands * self.rows)
        return out

    def decide(self, records):
        key = np.concatenate([r["key"] for r in records])
        bands = np.concatenate([r["bands"] for r in records])
        signature = np.concatenate([r["signature"] for r in records]) if self.threshold else None
        parent = np.arange(len(key))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for band in bands.T:
            order = np.argsort(band, kind="stable")
            values = band[order]
            starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
            ends = np.r_[starts[1:], len(values)]
            for s, e in zip(starts, ends):
                if e - s < 2:
                    continue
                group = order[s:e]
                head = group[np.argmin(key[group])]
                for m in group:
                    if m == head:
                        continue
                    similar = signature is None or (
                        (signature[m] == signature[head]).mean() >= self.threshold
                    )
                    if not similar:
                        continue
                    ra, rb = find(head), find(m)
                    if ra != rb:  # the smaller key becomes the root: each cluster keeps its min
                        parent[max(ra, rb, key=lambda r: key[r])] = min(
                            ra, rb, key=lambda r: key[r]
                        )
        roots = np.array([find(i) for i in range(len(key))], dtype=np.int64)
        return {"removed": np.sort(key[roots != np.arange(len(key))])}

    def apply(self, doc, decision):
        if listed(decision["removed"], doc.id):
            return False, "near_duplicate"
        return True


# -- lines (ccNet) ------------------------------------------------------------------------------

DIGITS = str.maketrans("0123456789", "0000000000")


def line_key(line: str) -> str:
    return " ".join(line.lower().split()).translate(DIGITS)


class LineDedup(CorpusStep):
    """Lines that occur more than `max_count` times in their bucket of documents."""

    name = "line_dedup"

    def __init__(self, work: str, bucket_docs=30_000_000, max_count=6, min_chars=1):
        super().__init__(work)
        self.bucket_docs, self.max_count, self.min_chars = bucket_docs, max_count, min_chars

    def line_hashes(self, text: str) -> list[int]:
        return [hash64(k) for k in map(line_key, text.split("\n")) if k]

    def observe(self, doc, records):
        hashes = self.line_hashes(doc.text)
        records.setdefault("key", []).append(hash64(doc.id))
        records.setdefault("lines", []).append(len(hashes))
        records.setdefault("hashes", []).extend(hashes)

    def record_arrays(self, records):
        return {
            "key": np.asarray(records.get("key", []), np.uint64),
            "lines": np.asarray(records.get("lines", []), np.int64),
            "hashes": np.asarray(records.get("hashes", []), np.uint64),
        }

    def decide(self, records):
        key, lines, hashes = (
            np.concatenate([r[k] for r in records]) for k in ("key", "lines", "hashes")
        )
        buckets = max(1, math.ceil(len(key) / self.bucket_docs))
        bucket = np.repeat(key % np.uint64(buckets), lines)
        pairs, counts = np.unique(np.stack([bucket, hashes], axis=1), axis=0, return_counts=True)
        frequent = pairs[counts > self.max_count] if len(pairs) else np.zeros((0, 2), np.uint64)
        return {"buckets": np.array(buckets), "bucket": frequent[:, 0], "hash": frequent[:, 1]}

    def prepare(self, decision):
        return {
            "buckets": int(decision["buckets"]),
            "frequent": set(zip(decision["bucket"].tolist(), decision["hash"].tolist())),
        }

    def apply(self, doc, decision):
        bucket = hash64(doc.id) % decision["buckets"]
        frequent = decision["frequent"]
        kept, removed = [], 0
        for line in doc.text.split("\n"):
            k = line_key(line)
            if k and (bucket, hash64(k)) in frequent:
                removed += 1
            else:
                kept.append(line)
        if removed:
            self.count("lines_removed", value=removed)
            doc.text = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()
        if len(doc.text) < self.min_chars:
            return False, "only_repeated_lines"
        return True
