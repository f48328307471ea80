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
    is corrupt keeps the records before the damage and is counted as `damaged_files`."""

    name = "WARC (herd)"

    def __init__(self, data_folder: str, **kwargs):
        # warcio reads gzip members one by one, so a cut file loses only its last record;
        # decompressing the file as one stream (datatrove's default) loses every buffered one
        super().__init__(data_folder, compression=None, **kwargs)

    def read_file(self, filepath: str):
        from datatrove.pipeline.readers.warc import process_record
        from warcio.archiveiterator import ArchiveIterator

        last = 0  # where the last record read starts
        with self.data_folder.open(filepath, "rb", compression=None) as f:
            records = ArchiveIterator(f)
            try:
                for ri, record in enumerate(records):
                    with self.track_time():
                        data = process_record(record)
                        document = data and self.get_document_from_dict(data, filepath, ri)
                    last = records.get_record_offset()  # after the content: it reads to the end
                    if document:
                        yield document
            except (EOFError, OSError, ValueError, zlib.error, ArchiveLoadFailed) as e:
                return self._damaged(filepath, f"{type(e).__name__}: {e}")
        if filepath.endswith(".gz") and not self._members_complete(filepath, last):
            self._damaged(filepath, "its last gzip member is cut off")

    def _members_complete(self, filepath: str, offset: int) -> bool:
        """The gzip members from `offset` to the end of the file all end properly (warcio
        stops quietly at a truncated one)."""
        with self.data_folder.open(filepath, "rb", compression=None) as f:
            f.seek(offset)
            data = f.read()
        while data:
            member = zlib.decompressobj(wbits=31)
            try:
                member.decompress(data)
            except zlib.error:
                return False
            if not member.eof:
                return False
            data = member.unused_data
        return True

    def _damaged(self, filepath: str, why: str) -> None:
        logger.warning(f"{filepath}: damaged, records after the damage are lost ({why})")
        self.stat_update("damaged_files")


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
