"""Readers: a folder of HTML pages, and WARC files cut short."""

from __future__ import annotations

import io

from herd.curate.read import HtmlFolderReader, WarcReader


def test_html_folder_reader(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.html").write_text("<html><body><p>Hello there</p></body></html>")
    (tmp_path / "b.html").write_bytes(
        '<html><meta charset="iso-8859-1"><body><p>Crème brûlée à la carte, déjà vu, '
        "naïve café, fiancée, Noël et señor.</p></body></html>".encode("latin-1")
    )
    (tmp_path / "c.txt").write_text("not a page")
    reader = HtmlFolderReader(str(tmp_path), base_url="https://site.example", date="2023-05-01")
    docs = {d.id: d for d in reader.run(None, 0, 1)}
    assert set(docs) == {"b.html", "docs/a.html"}
    assert docs["docs/a.html"].metadata["url"] == "https://site.example/docs/a.html"
    assert docs["docs/a.html"].metadata["date"] == "2023-05-01"
    assert "Crème brûlée" in docs["b.html"].text


def test_truncated_warc_keeps_the_records_before_the_damage(tmp_path):
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    buf = io.BytesIO()
    writer = WARCWriter(buf, gzip=True)
    for i in range(6):
        body = f"<html><body><p>{f'page {i} ' * 400}</p></body></html>".encode()
        writer.write_record(writer.create_warc_record(
            f"https://x.example/{i}", "response", payload=io.BytesIO(body),
            http_headers=StatusAndHeaders("200 OK", [("Content-Type", "text/html")], "HTTP/1.1"),
            warc_headers_dict={"WARC-Identified-Payload-Type": "text/html"}))  # fmt: skip
    data = buf.getvalue()
    (tmp_path / "cut.warc.gz").write_bytes(data[: int(len(data) * 0.6)])
    reader = WarcReader(str(tmp_path), glob_pattern="*.warc.gz")
    docs = list(reader.run(None, 0, 1))
    assert 1 <= len(docs) < 6
    assert [d.metadata["url"] for d in docs] == [f"https://x.example/{i}" for i in range(len(docs))]
    assert reader.stats["damaged_files"].total == 1
