"""Curation: extraction quality, dedup quality and pipeline throughput, herd against its peers.

    python benchmarks/curate.py [--pages 497] [--corpus out/corpus] [--skip-throughput]

Extraction, on python3.11-doc pages against their reST sources (`_sources/*.rst.txt`, markup
stripped): content recall (share of the source's lines of 4+ words found in the output) and
boilerplate precision (share of the output's lines found in the source); a line is found when
80% of its word trigrams are, or, for a line of one or two words, its words are (line breaks
and markup differ between source and page), and precision by volume: the share of the output's word trigrams found in the source (a line
that merges a boilerplate phrase into content passes the line test but not this one), for herd's extractor,
plain trafilatura (its "txt" output), resiliparse (main content) and datatrove's Trafilatura
step (its defaults: favour_precision).

Dedup: MinHash (herd's defaults: 5-word shingles, 14 bands x 8 rows) on pairs of extracted
pages with 0-40% of their words replaced, and on pairs of different pages, against the exact
Jaccard similarity of the shingle sets (a pair is a true duplicate at Jaccard >= 0.75);
ccNet line dedup against a Counter over the same buckets.

Throughput (2 worker processes, same WARC files): herd's recipes/curate-web.toml against a
FineWeb-style datatrove pipeline of its built-in steps (WarcReader, URLFilter, Trafilatura,
Gopher repetition and quality filters, then its four MinHash stages); docs/s and peak RSS.
datatrove's WarcReader stops the task with EOFError on the corpus's truncated file, so it
reads the eight intact files only.
datatrove's filters need spacy, tldextract, pyahocorasick and fasteners, which herd does not.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

DOCS = Path("/usr/share/doc/python3.11/html")
ROOT = Path(__file__).resolve().parents[1]


# -- extraction ---------------------------------------------------------------------------------


def words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


RENDERED = {"versionadded": "New in version", "versionchanged": "Changed in version",
            "deprecated": "Deprecated since version", "note": "Note", "seealso": "See also",
            "warning": "Warning", "impl-detail": "CPython implementation detail:"}  # fmt: skip


def rst_lines(source: str) -> list[str]:
    """The source's text lines without reST markup (roles, literals, directives, underlines)."""
    out = []
    for line in source.split("\n"):
        s = line.strip()
        if not s or re.fullmatch(r"([=\-~^\"'`#*+<>_:.])\1{2,}", s):
            continue
        directive = re.match(r"\.\. ([\w:-]+)::\s*(.*)", s)
        if directive:  # rendered as its argument, with the words Sphinx puts before it
            name, argument = directive.groups()
            s = f"{RENDERED.get(name, '')} {argument}".strip()
            if not s:
                continue
        elif s.startswith(".. "):  # comments, targets
            continue
        if re.match(r":\w[\w-]*:", s):  # field lists / directive options
            continue
        s = re.sub(r":[\w:.-]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", s)  # :role:`text <target>`
        s = re.sub(r"`([^`<]*?)\s*<[^>]*>`_+", r"\1", s)
        s = s.replace("``", "").replace("`", "").replace("**", "").replace("*", "")
        out.append(s)
    return out


def grams(text: str) -> list[tuple]:
    w = words(text).split()
    return [tuple(w[i : i + 3]) for i in range(len(w) - 2)]


def found(line: str, other_grams: set, other_text: str) -> bool:
    """At least 80% of the line's word trigrams are in the other side (markup and line breaks
    differ between a reST source and a rendered page, so exact line matches undercount both
    ways); a line of one or two words must appear in the other side's words."""
    g = grams(line)
    if not g:
        return f" {words(line)} " in other_text
    return sum(x in other_grams for x in g) >= 0.8 * len(g)


def score(output: str, truth_lines: list[str]) -> tuple[float, float, float]:
    truth_text = " " + " ".join(words(t) for t in truth_lines) + " "
    truth_grams = set(grams(truth_text))
    out_lines = [line for line in output.split("\n") if words(line)]
    out_text = " " + " ".join(words(line) for line in out_lines) + " "
    out_grams = set(grams(out_text))
    long_truth = [t for t in truth_lines if len(words(t).split()) >= 4]
    recall = sum(found(t, out_grams, out_text) for t in long_truth) / max(1, len(long_truth))
    precision = sum(found(line, truth_grams, truth_text) for line in out_lines) / max(
        1, len(out_lines)
    )
    # by volume: a boilerplate phrase merged into a content line still counts against it
    volume = [g for line in out_lines for g in grams(line)]
    by_volume = sum(g in truth_grams for g in volume) / max(1, len(volume))
    return recall, precision, by_volume


def extractors() -> dict:
    import trafilatura
    from datatrove.pipeline.extractors import Trafilatura
    from resiliparse.extract.html2text import extract_plain_text

    from herd.curate.extract import html_to_text

    datatrove_step = Trafilatura()
    return {
        "herd": html_to_text,
        "trafilatura (txt)": lambda h: trafilatura.extract(h) or "",
        "resiliparse (main content)": lambda h: extract_plain_text(h, main_content=True),
        "datatrove Trafilatura step": lambda h: datatrove_step.extract(h) or "",
    }


def extraction(pages: int) -> list[tuple]:
    pairs = []
    for src in sorted((DOCS / "_sources").rglob("*.rst.txt")):
        page = DOCS / (str(src.relative_to(DOCS / "_sources")).removesuffix(".rst.txt") + ".html")
        if page.exists():
            pairs.append((page.read_text("utf-8"), rst_lines(src.read_text("utf-8"))))
    pairs = pairs[:pages]
    rows = []
    for name, fn in extractors().items():
        start = time.perf_counter()
        scores = [score(fn(html), truth) for html, truth in pairs]
        seconds = time.perf_counter() - start
        recall, precision, by_volume = (sum(s[k] for s in scores) / len(scores) for k in range(3))
        rows.append((name, recall, precision, by_volume, len(pairs) / seconds))
    return rows


# -- dedup --------------------------------------------------------------------------------------


def dedup_quality(texts: list[str], work: Path) -> list[tuple]:
    from herd.curate.dedup import MinHashDedup

    step = MinHashDedup(str(work))
    rng = random.Random(0)
    rows = []

    def jaccard(a: str, b: str) -> float:
        sa, sb = set(step.shingles(a).tolist()), set(step.shingles(b).tolist())
        return len(sa & sb) / max(1, len(sa | sb))

    def candidate(a: str, b: str) -> bool:
        return bool(
            (step.band_hashes(step.signature(a)) == step.band_hashes(step.signature(b))).any()
        )

    texts = [t for t in texts if len(t.split()) > 100][:150]
    for rate in (0.0, 0.02, 0.05, 0.1, 0.2, 0.4):
        pairs = []
        for t in texts:
            w = t.split()
            edited = " ".join(x if rng.random() > rate else rng.choice(("lorem", "ipsum", "quux"))
                              for x in w)  # fmt: skip
            pairs.append((t, edited))
        truth = [jaccard(a, b) >= 0.75 for a, b in pairs]
        found = [candidate(a, b) for a, b in pairs]
        rows.append((f"{int(rate * 100)}% words edited", *prf(truth, found)))
    unrelated = [(texts[i], texts[(i + 7) % len(texts)]) for i in range(len(texts))]
    truth = [jaccard(a, b) >= 0.75 for a, b in unrelated]
    found = [candidate(a, b) for a, b in unrelated]
    rows.append(("different pages", *prf(truth, found)))
    return rows


def prf(truth: list[bool], found: list[bool]) -> tuple[int, int, float, float]:
    tp = sum(t and f for t, f in zip(truth, found))
    precision = tp / max(1, sum(found)) if any(found) else 1.0
    recall = tp / max(1, sum(truth)) if any(truth) else 1.0
    return sum(truth), sum(found), precision, recall


def line_dedup_exact(texts: list[str], work: Path) -> tuple[int, bool]:
    from datatrove.data import Document

    from herd.curate.corpus import hash64
    from herd.curate.dedup import LineDedup, line_key

    step = LineDedup(str(work), bucket_docs=max(1, len(texts) // 3))
    records: dict = {}
    ids = [f"doc-{i}" for i in range(len(texts))]
    for i, t in zip(ids, texts):
        step.observe(Document(text=t, id=i), records)
    decision = step.prepare(step.decide([step.record_arrays(records)]))
    buckets = decision["buckets"]
    counts = Counter()
    for i, t in zip(ids, texts):
        for line in t.split("\n"):
            if line_key(line):
                counts[(hash64(i) % buckets, hash64(line_key(line)))] += 1
    want = {k for k, c in counts.items() if c > 6}
    return len(want), want == decision["frequent"]


# -- throughput ---------------------------------------------------------------------------------


def run_timed(code: str) -> tuple[float, float, str]:
    """(seconds, peak RSS in MiB of the process and its children, stdout) of python -c code."""
    wrapper = (
        "import resource, time, sys\nstart = time.perf_counter()\n" + code +
        "\nr = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
        " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "print('TIMING', time.perf_counter() - start, r / 1024)\n"
    )  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", wrapper], check=False, capture_output=True, text=True, cwd=ROOT
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    line = [x for x in out.stdout.splitlines() if x.startswith("TIMING")][-1]
    _, seconds, rss = line.split()
    return float(seconds), float(rss), out.stdout


HERD_RUN = """
from herd.config.train import load_config
from herd.config.curate import curate_from_dict
from herd.curate import pipeline
cfg = load_config("recipes/curate-web.toml", ["curate.input={warc}", "curate.output={out}",
                  "curate.tasks=2", "curate.workers=2"], build=curate_from_dict)
pipeline.clean(cfg)
pipeline.run(cfg, quiet=True)
"""

DATATROVE_RUN = """
import shutil
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import WarcReader, JsonlReader
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.filters import URLFilter, GopherRepetitionFilter, GopherQualityFilter
from datatrove.pipeline.writers import JsonlWriter
from datatrove.pipeline.dedup import (MinhashDedupSignature, MinhashDedupBuckets,
    MinhashDedupCluster, MinhashDedupFilter)
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.utils.logging import logger
logger.remove()
out = "{out}"
shutil.rmtree(out, ignore_errors=True)
import xxhash
from datatrove.utils.hashing import HashConfig
# datatrove hashes str with xxhash, which xxhash 4 refuses (datatrove pins xxhash<4)
fast = int(xxhash.VERSION.split(".")[0]) < 4
cfg = MinhashConfig(hash_config=HashConfig(hash_fc="xxhash" if fast else "sha1"))
run = lambda steps, tasks, name: LocalPipelineExecutor(steps, tasks=tasks, workers=min(2, tasks),
    logging_dir=f"{{out}}/logs/{{name}}").run()
run([WarcReader("{warc}", glob_pattern="0*.warc.gz"), URLFilter(), Trafilatura(),
     GopherRepetitionFilter(), GopherQualityFilter(), JsonlWriter(f"{{out}}/base")], 2, "base")
run([JsonlReader(f"{{out}}/base"), MinhashDedupSignature(f"{{out}}/sigs", config=cfg)], 2, "sig")
run([MinhashDedupBuckets(f"{{out}}/sigs", f"{{out}}/buckets", config=cfg)], cfg.num_buckets, "buckets")
run([MinhashDedupCluster(f"{{out}}/buckets", f"{{out}}/remove", config=cfg)], 1, "cluster")
run([JsonlReader(f"{{out}}/base"), MinhashDedupFilter(f"{{out}}/remove"),
     JsonlWriter(f"{{out}}/documents")], 2, "filter")
"""


def count_docs(folder: Path) -> int:
    n = 0
    for f in folder.glob("*.jsonl.gz"):
        with gzip.open(f, "rt") as lines:
            n += sum(1 for _ in lines)
    return n


def throughput(corpus: Path, work: Path) -> list[tuple]:
    warc = corpus / "warc"
    docs = json.loads((corpus / "manifest.json").read_text())["records"]
    herd_s, herd_rss, _ = run_timed(HERD_RUN.format(warc=warc, out=work / "herd"))
    dt_s, dt_rss, _ = run_timed(DATATROVE_RUN.format(warc=warc, out=work / "datatrove"))
    return [
        ("herd curate-web.toml (12 steps)", docs / herd_s, herd_rss,
         count_docs(work / "herd" / "documents"), dt_s / herd_s),
        ("datatrove FineWeb-style (URL, extract, 2 Gopher, MinHash)", docs / dt_s, dt_rss,
         count_docs(work / "datatrove" / "documents"), 1.0),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pages", type=int, default=497)
    parser.add_argument("--corpus", type=Path, default=ROOT / "out" / "corpus")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench-curate")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-quality", action="store_true", help="only the throughput table")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    if not args.skip_quality:
        quality(args, console)
    if args.skip_throughput:
        return
    if not (args.corpus / "manifest.json").exists():
        subprocess.run([sys.executable, "scripts/curate_corpus.py", str(args.corpus)], check=True,
                       cwd=ROOT)  # fmt: skip
    table = Table(title="whole pipeline on the same WARC files, 2 workers")
    for c in ("pipeline", "docs/s", "peak RSS MiB", "docs out", "speed vs datatrove"):
        table.add_column(c, justify="left" if c == "pipeline" else "right")
    for name, speed, rss, out, ratio in throughput(args.corpus, args.work):
        table.add_row(name, f"{speed:.1f}", f"{rss:.0f}", str(out), f"{ratio:.2f}x")
    console.print(table)


def quality(args, console) -> None:
    from rich.table import Table

    rows = extraction(args.pages)
    table = Table(title=f"extraction on {args.pages} python3.11-doc pages vs their reST sources")
    for c in ("extractor", "content recall", "boilerplate precision", "precision (trigrams)",
              "pages/s"):  # fmt: skip
        table.add_column(c, justify="left" if c == "extractor" else "right")
    for name, r, p, v, speed in rows:
        table.add_row(name, f"{100 * r:.1f}%", f"{100 * p:.1f}%", f"{100 * v:.1f}%", f"{speed:.1f}")
    console.print(table)

    from herd.curate.extract import html_to_text

    pages = sorted((DOCS).rglob("*.html"))[:300]
    texts = [html_to_text(p.read_text("utf-8")) for p in pages]
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    table = Table(title="MinHash (5-word shingles, 14 x 8) vs exact Jaccard >= 0.75, page pairs")
    for c in ("pairs", "true dups", "flagged", "precision", "recall"):
        table.add_column(c, justify="left" if c == "pairs" else "right")
    for name, truth, found, p, r in dedup_quality(texts, work):
        table.add_row(name, str(truth), str(found), f"{100 * p:.1f}%", f"{100 * r:.1f}%")
    console.print(table)
    n, exact = line_dedup_exact(texts, work)
    console.print(f"line dedup: {n} (bucket, line) keys above 6 occurrences; equal to a Counter: "
                  f"{'yes' if exact else 'NO'}")  # fmt: skip


if __name__ == "__main__":
    main()
