"""The data mix: rates that reach the target token shares (renormalised over the domains there
are, none above max_repeat), seeded per-document draws, and a recipe whose written tokens match
the targets, the same for 1 and 3 tasks."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest

from herd.config.curate import curate_from_dict
from herd.config.train import ConfigError, load_config
from herd.curate import pipeline
from herd.curate.mix import PAPER_MIX, copies, mix_rates
from herd.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("max_repeat", [1.0, 3.0])
def test_rates_reach_the_renormalised_targets(max_repeat):
    available = {"general": 90_000, "code": 30_000, "math": 4_000, "other": 5_000}
    rates, missing = mix_rates(available, PAPER_MIX, max_repeat)
    assert missing == ["multilingual"] and rates["other"] == 0.0
    written = {d: rates[d] * t for d, t in available.items()}
    total = sum(written.values())
    norm = 0.50 + 0.25 + 0.17
    for d in ("general", "math", "code"):
        assert written[d] / total == pytest.approx(PAPER_MIX[d] / norm, rel=1e-9)
    assert max(rates.values()) == pytest.approx(max_repeat)  # the scarcest domain, math, used up
    assert rates["math"] == pytest.approx(max_repeat) and all(
        r <= max_repeat for r in rates.values()
    )
    with pytest.raises(ValueError, match="no tokens in any target domain"):
        mix_rates({"other": 10}, PAPER_MIX)


def test_draws_are_seeded_per_document_and_average_the_rate():
    ids = [f"doc-{i}" for i in range(20_000)]
    for rate in (0.3, 2.5):
        n = np.array([copies(i, rate, seed=0) for i in ids])
        assert set(n) == {int(rate), int(rate) + 1} and abs(n.mean() - rate) < 0.02
    assert [copies(i, 0.5, 0) for i in ids[:50]] == [copies(i, 0.5, 0) for i in ids[:50]]
    assert [copies(i, 0.5, 0) for i in ids[:50]] != [copies(i, 0.5, 1) for i in ids[:50]]


def write_corpus(folder: Path) -> dict[str, int]:
    """Three JSONL files of documents tagged with domains (multilingual by language only)."""
    rng = random.Random(0)
    words = {"general": ["the", "king", "said", "that", "all", "is", "well", "in", "the", "land"],
             "code": ["def", "return", "import", "self", "print", "for", "in", "range", "x", "y"],
             "math": ["sum", "of", "3", "and", "4", "equals", "7", "prime", "integer", "proof"]}  # fmt: skip
    count = {"general": 500, "code": 150, "math": 60, "multilingual": 40}
    docs = []
    for domain, n in count.items():
        for i in range(n):
            vocab = words.get(domain, ["der", "die", "das", "und", "ist", "nicht"])
            text = " ".join(rng.choice(vocab) for _ in range(rng.randint(20, 80)))
            meta = {"language": "de"} if domain == "multilingual" else {"domain": domain}
            docs.append({"id": f"{domain}-{i}", "text": text, "metadata": meta})
    rng.shuffle(docs)
    folder.mkdir(parents=True)
    for k in range(3):
        with gzip.open(folder / f"{k}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs[k::3])
    return count


def run(folder: Path, out: Path, tasks: int, *extra: str) -> dict[str, int]:
    sets = [f"curate.input={folder}", "curate.reader=jsonl", f"curate.output={out}",
            f"curate.tasks={tasks}", 'curate.steps=["mix", "tokenize"]', *extra]  # fmt: skip
    config = load_config(ROOT / "recipes" / "curate-web.toml", sets, build=curate_from_dict)
    pipeline.run(config, quiet=True)
    tok = load_tokenizer("llama3")
    tokens: dict[str, int] = {}
    for f in sorted((out / "documents").glob("*.jsonl.gz")):
        with gzip.open(f, "rt") as lines:
            for line in lines:
                d = json.loads(line)
                domain = d["metadata"].get("domain", "multilingual")
                tokens[domain] = tokens.get(domain, 0) + len(tok.encode(d["text"]))
    shards = [json.loads(p.read_text()) for p in (out / "tokens").glob("0*.json")]
    assert sum(s["tokens"] for s in shards) >= sum(tokens.values())  # the mix was tokenized
    return tokens


def test_recipe_writes_the_target_mix_for_any_task_split(tmp_path):
    folder = tmp_path / "in"
    write_corpus(folder)
    one = run(folder, tmp_path / "one", 1, "mix.max_repeat=2.0")
    three = run(folder, tmp_path / "three", 3, "mix.max_repeat=2.0")
    assert one == three
    total = sum(one.values())
    for domain, share in PAPER_MIX.items():
        assert one[domain] / total == pytest.approx(share, abs=0.03), domain
    plan = json.loads((tmp_path / "one" / "mix.json").read_text())
    assert plan["missing"] == [] and max(d["rate"] for d in plan["domains"].values()) == 2.0


def test_mix_must_come_last(tmp_path):
    with pytest.raises(ConfigError, match="mix must come last"):
        load_config(ROOT / "recipes" / "curate-web.toml",
                    [f"curate.input={tmp_path}", 'curate.steps=["mix", "pii"]'],
                    build=curate_from_dict)  # fmt: skip
