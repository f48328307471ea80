"""Token shards on disk: one per input file, written in parallel, skipped when already done.

A shard is three files in the output directory:
- `NNNNN.bin`: the documents' token ids, uint32, back to back, each document ending with the
  tokenizer's end-of-text id (read with `numpy.memmap`);
- `NNNNN.idx.npy`: int64 offsets of the document starts, plus the end (n_docs + 1 entries);
- `NNNNN.json`: the source file, token and document counts, and how many empty documents
  (no text but whitespace) were skipped. It is written last, by rename, so its presence means
  the shard is complete; a re-run skips those shards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from herd.tokenizer.train import (
    JSONL_SUFFIXES,
    PARQUET_SUFFIXES,
    corpus_files,
    corpus_suffix,
    read_documents,
)


@dataclass(frozen=True)
class Shard:
    path: Path  # without suffix: path.with_suffix(".bin") etc.
    tokens: int
    documents: int
    empty: int = 0  # empty documents skipped

    def token_ids(self) -> np.ndarray:
        return np.memmap(self.path.with_suffix(".bin"), dtype=np.uint32, mode="r")

    def offsets(self) -> np.ndarray:
        return np.load(self.path.with_suffix(".idx.npy"))


def _write_shard(job: tuple[Path, Path, str, int]) -> Shard:
    source, stem, tokenizer_path, batch = job
    from herd.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.eos_id is None:
        raise ValueError(f"{tokenizer_path}: the tokenizer has no end-of-text id to end documents")
    bin_tmp = stem.with_suffix(".bin.tmp")
    offsets, total, empty, pending = [0], 0, 0, []
    with bin_tmp.open("wb") as out:

        def flush() -> None:
            nonlocal total
            for ids in tokenizer.encode_batch_numpy(pending, eos=True, num_threads=1):
                out.write(ids.tobytes())
                total += len(ids)
                offsets.append(total)
            pending.clear()

        for text in read_documents([source]):
            if not text.strip():
                empty += 1
                continue
            pending.append(text)
            if len(pending) >= batch:
                flush()
        flush()
    np.save(stem.with_suffix(".idx.tmp.npy"), np.asarray(offsets, dtype=np.int64))
    os.replace(stem.with_suffix(".idx.tmp.npy"), stem.with_suffix(".idx.npy"))
    os.replace(bin_tmp, stem.with_suffix(".bin"))
    documents = len(offsets) - 1
    meta = {"source": str(source), "tokens": total, "documents": documents, "empty": empty}
    stem.with_suffix(".json.tmp").write_text(json.dumps(meta) + "\n")
    os.replace(stem.with_suffix(".json.tmp"), stem.with_suffix(".json"))
    return Shard(stem, total, documents, empty)


def tokenize_corpus(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    tokenizer: str | Path,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Shard]:
    """Write one shard per input file (.txt/.md, .jsonl, .parquet; directories are searched)
    into `out_dir`, over `workers` processes. Shards already complete are kept as they are.
    `tokenizer` is anything `herd.load_tokenizer` reads. progress(done, total) is called as
    shards finish."""
    files = corpus_files(inputs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    listing = out / "sources.json"
    sources = [str(f.resolve()) for f in files]
    if listing.exists() and json.loads(listing.read_text()) != sources:
        raise ValueError(
            f"{out} holds shards of other inputs (see {listing}): use a new output directory"
        )
    listing.write_text(json.dumps(sources, indent=1) + "\n")
    stems = [out / f"{i:05d}" for i in range(len(files))]
    todo = [
        (
            f,
            stem,
            str(tokenizer),
            64 if corpus_suffix(f) in JSONL_SUFFIXES + PARQUET_SUFFIXES else 1,
        )
        for f, stem in zip(files, stems)
        if not stem.with_suffix(".json").exists()
    ]
    done = len(files) - len(todo)
    if progress:
        progress(done, len(files))
    if todo:
        workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
        with ProcessPoolExecutor(workers) as pool:
            for _ in pool.map(_write_shard, todo):
                done += 1
                if progress:
                    progress(done, len(files))
    return load_shards(out)


def load_shards(directory: str | Path) -> list[Shard]:
    """The complete shards in `directory`, in order."""
    directory = Path(directory)
    shards = []
    for meta_file in sorted(directory.glob("[0-9]*.json")):
        meta = json.loads(meta_file.read_text())
        stem = meta_file.with_suffix("")
        shards.append(Shard(stem, meta["tokens"], meta["documents"], meta.get("empty", 0)))
    if not shards:
        raise FileNotFoundError(f"{directory}: no token shards (run `herd tokenize` first)")
    return shards
