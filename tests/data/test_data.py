"""Token shards and the packed loader: shard contents, skip-on-rerun, packing that loses and
invents nothing, document ids and positions, rank sharding, determinism and exact resume."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import herd
from herd.data import PackedLoader, load_shards, tokenize_corpus

TEXTS = [
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "To be, or not to be, that is the question.",
    "All the world's a stage, and all the men and women merely players.",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("corpus")
    docs = list(TEXTS)
    for i, text in enumerate(TEXTS):
        (root / f"play{i}.txt").write_text(text * (3 + i))
    docs = [t * (3 + i) for i, t in enumerate(TEXTS)]
    lines = [f"Line {i}: " + " ".join(["word"] * (5 + 7 * i)) for i in range(12)]
    (root / "more.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    return root, docs + lines


@pytest.fixture(scope="module")
def shards(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    return out, tokenize_corpus([corpus[0]], out, "smollm2", workers=2)


def test_shards_hold_each_document_with_eos(corpus, shards):
    tokenizer = herd.load_tokenizer("smollm2")
    _, docs = corpus
    _, written = shards
    found = []
    for shard in written:
        ids, offsets = shard.token_ids(), shard.offsets()
        assert offsets[0] == 0 and offsets[-1] == len(ids) == shard.tokens
        found += [ids[a:b].tolist() for a, b in itertools.pairwise(offsets)]
    expected = [tokenizer.encode(d) + [tokenizer.eos_id] for d in docs]
    assert Counter(map(tuple, found)) == Counter(map(tuple, expected))


def test_rerun_skips_finished_shards_and_refuses_other_inputs(corpus, shards, tmp_path):
    out, written = shards
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*.bin")}
    again = tokenize_corpus([corpus[0]], out, "smollm2")
    assert [s.tokens for s in again] == [s.tokens for s in written]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.bin")} == stamps
    (tmp_path / "other.txt").write_text("something else")
    with pytest.raises(ValueError, match="other inputs"):
        tokenize_corpus([tmp_path / "other.txt"], out, "smollm2")
    with pytest.raises(FileNotFoundError, match="herd tokenize"):
        load_shards(tmp_path)


def epoch(loader: PackedLoader) -> list:
    return [loader.batch(0, step) for step in range(loader.batches_per_epoch)]


def test_packing_loses_and_invents_nothing(shards):
    out, written = shards
    # batch size 1 draws every window of the epoch, so the stream can be put back together
    loader = PackedLoader(out, seq_len=15, batch_size=1, seed=3)
    assert loader.batches_per_epoch == loader.windows_per_epoch
    eos = herd.load_tokenizer("smollm2").eos_id
    windows = {}
    for step, batch in enumerate(epoch(loader)):
        assert batch.tokens.shape == (1, 15)
        assert (batch.targets[:, :-1] == batch.tokens[:, 1:]).all()
        for row, k in enumerate(loader.window_ids(0, step)):
            windows[k] = batch.tokens[row].tolist() + [batch.targets[row, -1].item()]
    # the windows are drawn shuffled; in stream order they are the packed documents
    assert list(windows) != sorted(windows)
    stream = [token for k in sorted(windows) for token in windows[k]]
    # whole documents in the packed stream are exactly corpus documents, each at most once
    docs = Counter()
    for shard in written:
        ids, offsets = shard.token_ids(), shard.offsets()
        docs.update(tuple(ids[a:b].tolist()) for a, b in itertools.pairwise(offsets))
    pieces, current = Counter(), []
    for token in stream:
        current.append(token)
        if token == eos:
            pieces[tuple(current)] += 1
            current = []
    first = next(iter(pieces))  # the stream starts at a document start
    assert first in docs
    assert not pieces - docs


def write_shard(directory: Path, index: int, docs: list[list[int]]) -> None:
    """A shard written directly, in herd tokenize's layout, from given token ids."""
    ids = np.asarray([t for d in docs for t in d], dtype=np.uint32)
    offsets = np.cumsum([0] + [len(d) for d in docs]).astype(np.int64)
    stem = directory / f"{index:05d}"
    ids.tofile(stem.with_suffix(".bin"))
    np.save(stem.with_suffix(".idx.npy"), offsets)
    meta = {"source": "test", "tokens": len(ids), "documents": len(docs)}
    stem.with_suffix(".json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def numbered(tmp_path_factory) -> tuple[Path, Counter]:
    """Three shards of 3 + 7 + 5 documents of 1..40 tokens, 600 tokens in all; every token id
    is unique (its place in the corpus, offset by 1000; 0 ends each document), so a token drawn
    twice or never is seen."""
    out = tmp_path_factory.mktemp("numbered")
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=15)
    lengths[-1] += 600 - 15 - lengths.sum()  # exactly 600 tokens with the end-of-text ids
    assert lengths.min() >= 1 and lengths.sum() + 15 == 600
    docs, next_id = [], 1000
    for n in lengths:
        docs.append(list(range(next_id, next_id + n)) + [0])
        next_id += n
    for i, (a, b) in enumerate([(0, 3), (3, 10), (10, 15)]):
        write_shard(out, i, docs[a:b])
    return out, Counter(t for d in docs for t in d if t)


def drawn(loader_args: dict, world: int, epoch: int) -> Counter:
    """Every non-eos token each rank draws in one epoch, inputs and last target of each row."""
    tokens = Counter()
    for rank in range(world):
        loader = PackedLoader(**loader_args, rank=rank, world_size=world)
        for step in range(loader.batches_per_epoch):
            batch = loader.batch(epoch, step)
            rows = torch.cat([batch.tokens, batch.targets[:, -1:]], dim=1)
            tokens.update(t for t in rows.flatten().tolist() if t)
    return tokens


@pytest.mark.parametrize("world, batch_size", [(1, 1), (2, 3), (3, 2), (4, 5)])
def test_every_token_is_drawn_exactly_once_per_epoch_across_ranks(numbered, world, batch_size):
    # windows of 10 tokens (seq_len 9 + 1): 600 tokens are 60 windows, which 1, 6 and 20
    # windows per step divide; the 4 x 5 layout leaves 60 % 20 = 0 as well.
    out, corpus = numbered
    args = {"shards": out, "seq_len": 9, "batch_size": batch_size, "seed": 5}
    assert PackedLoader(**args).windows_per_epoch == 60
    for epoch in (0, 1):
        assert drawn(args, world, epoch) == corpus


def test_a_remainder_is_dropped_whole_and_nothing_repeats(numbered):
    # 600 tokens in windows of 14: 42 windows (12 tokens left over), 7 x 2 ranks x 3 rows;
    # what an epoch misses is the leftover tail and no more.
    out, corpus = numbered
    args = {"shards": out, "seq_len": 13, "batch_size": 3, "seed": 5}
    got = drawn(args, 2, 0)
    assert not got - corpus and max(got.values()) == 1
    missing = sum(corpus.values()) - sum(got.values())
    assert 0 < missing <= 12


def test_document_ids_and_positions_restart_at_boundaries(shards):
    out, _ = shards
    eos = herd.load_tokenizer("smollm2").eos_id
    for batch in epoch(PackedLoader(out, seq_len=31, batch_size=4, seed=0)):
        tokens, ids, pos = batch.tokens.numpy(), batch.doc_ids.numpy(), batch.positions.numpy()
        assert (ids[:, 0] == 0).all() and (pos[:, 0] == 0).all()
        new_doc = np.zeros_like(ids, dtype=bool)
        new_doc[:, 1:] = tokens[:, :-1] == eos  # a document starts after each end-of-text
        assert (np.diff(ids, axis=1) == new_doc[:, 1:]).all()
        expected = np.zeros_like(pos)
        for col in range(1, pos.shape[1]):
            expected[:, col] = np.where(new_doc[:, col], 0, expected[:, col - 1] + 1)
        assert (pos == expected).all()


def test_ranks_partition_the_windows(shards):
    out, _ = shards
    single = PackedLoader(out, seq_len=15, batch_size=2, seed=1)
    ranks = [
        PackedLoader(out, seq_len=15, batch_size=1, seed=1, rank=r, world_size=2) for r in range(2)
    ]
    for step in range(ranks[0].batches_per_epoch):
        whole = single.batch(0, step).tokens
        parts = [r.batch(0, step).tokens for r in ranks]
        assert (whole[0] == parts[0][0]).all() and (whole[1] == parts[1][0]).all()
    with pytest.raises(ValueError, match="rank"):
        PackedLoader(out, seq_len=15, batch_size=2, rank=2, world_size=2)


def test_seeded_and_resumes_exactly(shards):
    out, _ = shards
    a = iter(PackedLoader(out, seq_len=15, batch_size=2, seed=7))
    taken = [next(a) for _ in range(40)]  # crosses into later epochs
    again = PackedLoader(out, seq_len=15, batch_size=2, seed=7)
    assert all((x.tokens == y.tokens).all() for x, y in zip(taken, again))
    other = PackedLoader(out, seq_len=15, batch_size=2, seed=8)
    assert any((x.tokens != y.tokens).any() for x, y in zip(taken, other))

    first = PackedLoader(out, seq_len=15, batch_size=2, seed=7)
    it = iter(first)
    for _ in range(17):
        next(it)
    state = first.state_dict()
    resumed = PackedLoader(out, seq_len=15, batch_size=2, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    rest = iter(resumed)
    for expected in taken[17:]:
        got = next(rest)
        assert (got.tokens == expected.tokens).all() and (got.doc_ids == expected.doc_ids).all()
    with pytest.raises(ValueError, match="seed"):
        PackedLoader(out, seq_len=15, batch_size=2, seed=1).load_state_dict(state)


def test_cli_tokenize(corpus, tmp_path):
    from typer.testing import CliRunner

    from herd.cli.main import app

    runner = CliRunner()
    args = ["tokenize", str(corpus[0]), str(tmp_path / "out"), "--tokenizer", "smollm2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "4 shards, 15 documents" in result.output
    missing = runner.invoke(
        app, ["tokenize", str(tmp_path / "nope"), str(tmp_path / "o2"), "--tokenizer", "smollm2"]
    )
    assert missing.exit_code == 1 and "no such file" in missing.output


def test_parquet_corpus_tokenizes_like_the_same_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = TEXTS + ["Shall I compare thee to a summer's day?"] * 3
    (tmp_path / "jsonl").mkdir()
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    (tmp_path / "jsonl" / "c.jsonl").write_text(lines)
    (tmp_path / "parquet").mkdir()
    table = pa.table({"id": list(range(len(texts))), "text": texts})
    pq.write_table(table, tmp_path / "parquet" / "c.parquet", row_group_size=2)
    # a directory of Parquet files is searched like one of JSONL files
    a = tokenize_corpus([tmp_path / "jsonl"], tmp_path / "a", "smollm2", workers=1)
    b = tokenize_corpus([tmp_path / "parquet"], tmp_path / "b", "smollm2", workers=1)
    assert [(s.tokens, s.documents) for s in a] == [(s.tokens, s.documents) for s in b]
    assert b[0].documents == len(texts)
    assert np.array_equal(a[0].token_ids(), b[0].token_ids())
    assert np.array_equal(a[0].offsets(), b[0].offsets())


def test_empty_and_missing_texts_are_treated_alike_in_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["one", "", "two", "  \n", "three"]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    pq.write_table(pa.table({"text": texts}), tmp_path / "c.parquet")
    for name in ("c.jsonl", "c.parquet"):
        [shard] = tokenize_corpus([tmp_path / name], tmp_path / f"out-{name}", "smollm2")
        assert (shard.documents, shard.empty) == (3, 2), name
        assert load_shards(tmp_path / f"out-{name}")[0].empty == 2

    # a record without text is an error naming where it is, in either format
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"title": "b"}\n')
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "null.parquet")
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "nocol.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    for name, error, says in [
        ("bad.jsonl", ValueError, r"bad\.jsonl:2: expected a JSON object with a \"text\""),
        ("null.parquet", ValueError, r"null\.parquet: row 2: \"text\" is null"),
        ("nocol.parquet", ValueError, r"nocol\.parquet: no \"text\" column \(it has body\)"),
        ("ints.parquet", TypeError, r"ints\.parquet: the \"text\" column holds int64"),
    ]:
        with pytest.raises(error, match=says):
            tokenize_corpus([tmp_path / name], tmp_path / f"out-{name}", "smollm2", workers=1)


def test_cli_reports_skipped_empty_documents(tmp_path):
    from typer.testing import CliRunner

    from herd.cli.main import app

    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n{"text": ""}\n{"text": "b"}\n')
    args = ["tokenize", str(tmp_path / "c.jsonl"), str(tmp_path / "out"), "--tokenizer", "smollm2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # rich wraps long lines
    assert "2 documents" in said and "1 empty document skipped" in said
