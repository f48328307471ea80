"""Safety: drop pages of blocked domains, mask personal information in the text."""

from __future__ import annotations

import ipaddress
import os
import re
import tarfile
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter

from herd.curate.corpus import hash64, member


def _hashes(domains: Iterable[str]) -> np.ndarray:
    out = {hash64(d) for d in (d.strip().lower().rstrip(".") for d in domains) if d}
    return np.unique(np.fromiter(out, dtype=np.uint64, count=len(out)))


def default_blocklist() -> np.ndarray:
    """datatrove's shipped adult-domain list, hashed and sorted; cached beside herd's other
    caches (HERD_CACHE, default ~/.cache/herd) because hashing 4.5M names takes seconds."""
    import datatrove

    archive = Path(datatrove.__file__).parent / "assets" / "url_filterblacklistsv0_3_0.tar.gz"
    cache = Path(os.environ.get("HERD_CACHE", Path.home() / ".cache" / "herd"))
    cached = cache / f"blocklist-{archive.stat().st_size}.npy"
    if cached.exists():
        return np.load(cached, mmap_mode="r")  # pages are read as lookups touch them
    with tarfile.open(archive) as tar:
        names = tar.extractfile("domains").read().decode("utf-8", "replace").splitlines()
    hashes = _hashes(names)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".{os.getpid()}.npy")
    np.save(tmp, hashes)
    os.replace(tmp, cached)
    return hashes


def parent_domains(host: str) -> list[str]:
    """a.b.example.com -> [a.b.example.com, b.example.com, example.com, com]."""
    parts = host.lower().rstrip(".").split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


class Blocklist(BaseFilter):
    """Pages whose URL's host, or a domain above it, is on a blocklist."""

    name = "blocklist"

    def __init__(self, default: bool = True, lists: list[str] = (), exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.default = default
        self.lists = list(lists)
        self._blocked: np.ndarray | None = None

    def blocked(self) -> np.ndarray:
        if self._blocked is None:
            parts = [default_blocklist()] if self.default else []
            for path in self.lists:
                if not Path(path).is_file():
                    raise FileNotFoundError(f"[blocklist] lists: {path}: no such file")
                parts.append(_hashes(Path(path).read_text().splitlines()))
            if len(parts) == 1:
                self._blocked = parts[0]
            else:
                self._blocked = (
                    np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)
                )
        return self._blocked

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        url = doc.metadata.get("url")
        if not url:
            return True
        host = urlsplit(url).hostname or ""
        hashes = np.array([hash64(d) for d in parent_domains(host)], dtype=np.uint64)
        if member(self.blocked(), hashes).any():
            return False, "blocked_domain"
        return True


EMAIL = re.compile(r"\b[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# NANP and international forms: (555) 123-4567, 555-123-4567, +44 20 7946 0958, +1.555.123.4567
PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?!\w)"
)


def _valid_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class PIIMask(PipelineStep):
    """Email addresses, IPv4/IPv6 addresses and phone numbers in the text replaced by tags."""

    name = "pii"
    type = "PII"

    def __init__(self, email: str = "[EMAIL]", ip: str = "[IP]", phone: str = "[PHONE]"):
        super().__init__()
        self.tags = {"email": email, "ip": ip, "phone": phone}

    def mask(self, text: str) -> tuple[str, dict[str, int]]:
        counts = {"email": 0, "ip": 0, "phone": 0}

        def sub(kind: str, check=None):
            def replace(m: re.Match) -> str:
                if check and not check(m.group(0)):
                    return m.group(0)
                counts[kind] += 1
                return self.tags[kind]

            return replace

        text = EMAIL.sub(sub("email"), text)
        text = IPV6.sub(sub("ip", _valid_ip), text)
        text = IPV4.sub(sub("ip", _valid_ip), text)
        text = PHONE.sub(sub("phone"), text)
        return text, counts

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        for doc in data:
            self.stat_update("total")
            with self.track_time():
                doc.text, counts = self.mask(doc.text)
            for kind, n in counts.items():
                if n:
                    self.stat_update(f"masked_{kind}", value=n)
            self.stat_update("forwarded")
            yield doc
