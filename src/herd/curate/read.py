"""Readers: WARC files that may be truncated or corrupt, and folders of HTML pages.

JSONL and Parquet come from datatrove's own readers (`reader` in herd.curate.pipeline)."""

from __future__ import annotations

import datetime as dt
import os
import zlib

from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.pipeline.readers.warc import WarcReader as DatatroveWarcReader
from datatrove.utils.logging import logger
from warcio.exceptions import ArchiveLoadFailed

from herd.curate.extract import decode_html


class WarcReader(DatatroveWarcReader):
    """WARC/WARC.gz responses as documents (HTML text, url, date); a file that ends early or
    is corrupt keeps the records read before the damage and is counted as `damaged_files`."""

    name = "WARC (herd)"

    def read_file(self, filepath: str):
        records = super().read_file(filepath)
        while True:
            try:
                document = next(records)
            except StopIteration:
                return
            except (EOFError, OSError, ValueError, zlib.error, ArchiveLoadFailed) as e:
                logger.warning(f"{filepath}: unreadable after this point ({type(e).__name__}: {e})")
                self.stat_update("damaged_files")
                return
            yield document


class HtmlFolderReader(BaseDiskReader):
    """Every .html file under a folder, as one document: the URL is `base_url` + its path, the
    date `date` or the file's modification time; undecodable bytes are counted and skipped."""

    name = "HTML folder"

    def __init__(self, data_folder: str, base_url: str, date: str = "", **kwargs):
        super().__init__(data_folder, glob_pattern="**/*.html", **kwargs)
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.date = date

    def read_file(self, filepath: str):
        with self.data_folder.open(filepath, "rb") as f:
            raw = f.read()
        html = decode_html(raw)
        if html is None:
            self.stat_update("undecodable")
            return
        date = self.date or dt.datetime.fromtimestamp(
            os.path.getmtime(self.data_folder.resolve_paths(filepath)), dt.timezone.utc
        ).strftime("%Y-%m-%dT%H:%M:%SZ")
        yield self.get_document_from_dict(
            {"text": html, "id": filepath, "url": self.base_url + filepath, "date": date},
            filepath,
            0,
        )
