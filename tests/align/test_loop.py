"""`herd align`: the stages of two rounds on a tiny model, each round's directory and report,
and a loop killed in its DPO stage resuming there without redoing the earlier stages.

The verifier here is a stand-in (a response is "right" when its length is even): a random
model never answers arithmetic, and the real verifiers are tested in test_sample.py."""

from __future__ import annotations

import json

import pytest

from herd.align import loop, sample
from herd.align.loop import Aligner
from herd.config.align import align_from_dict
from herd.config.train import ConfigError


def even_length(prompt, response: str) -> float:
    return float(len(response) % 2 == 0)


@pytest.fixture
def fake_verifier(monkeypatch):
    monkeypatch.setattr(sample, "verify", even_length)
    monkeypatch.setattr(loop, "verify", even_length)


def recipe(base, out, **align) -> dict:
    stage = {"steps": 2, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0}
    return {
        "align": {"base": str(base), "dir": str(out), "method": "lora", "seq_len": 128,
                  "threads": 2, **align},
        "task": {"train": 6, "test": 4},
        "sample": {"k": 4, "max_new_tokens": 8, "temperature": 1.0},
        "lora": {"rank": 4, "alpha": 8},
        "reward": stage, "sft": stage, "dpo": {**stage, "steps": 3},
        "average": {"models": ["sft", "dpo"]},
    }  # fmt: skip


class Killed(Exception):
    pass


def test_two_rounds_and_resume_after_a_kill(llama3_pair, tmp_path, fake_verifier):
    out = tmp_path / "align"
    config = align_from_dict(recipe(llama3_pair[0], out, rounds=2))

    def dies_in_dpo(trainer, name):
        if name == "dpo":
            trainer.fit(lambda step, r: (_ for _ in ()).throw(Killed()) if step == 2 else None)
        else:
            trainer.fit()

    with pytest.raises(Killed):
        Aligner(config, train=dies_in_dpo, say=lambda s: None).run()
    state = json.loads((out / "round-1" / "state.json").read_text())
    assert list(state) == ["sample", "reward", "select", "sft"]
    samples = out / "round-1" / "samples" / "samples.jsonl"
    stamp = samples.stat().st_mtime_ns
    assert (out / "round-1" / "dpo" / "checkpoints").is_dir()  # step 1 was saved, not 2

    trained = []
    reports = Aligner(config, train=lambda t, n: (trained.append((n, t.step)), t.fit()),
                      say=lambda s: None).run()  # fmt: skip
    assert samples.stat().st_mtime_ns == stamp  # round 1 was not sampled again
    assert trained[0] == ("dpo", 1)  # resumed from its checkpoint, not from step 0
    assert [n for n, _ in trained[1:]] == ["reward", "sft", "dpo"]  # round 2 whole
    assert [r["round"] for r in reports] == [1, 2]
    r1 = json.loads((out / "round-1" / "report.json").read_text())
    assert set(r1["accuracy"]) == {"start", "sft", "dpo", "final"}
    assert 0 <= r1["win_rate"] <= 1
    assert r1["model"] == str(out / "round-1" / "model")
    assert (out / "round-1" / "reward" / "model" / "config.json").is_file()
    assert r1["samples"]["preemptions"] == 0 and r1["samples"]["samples"] == 24
    first = json.loads((out / "round-1" / "select" / "sft.jsonl").read_text().splitlines()[0])
    assert len(first["messages"][-1]["content"]) % 2 == 0  # a verified-right best
    round2 = json.loads((out / "round-2" / "state.json").read_text())
    assert round2["report"]["accuracy"]["start"] == r1["accuracy"]["final"]


def test_align_recipe_errors(tmp_path):
    with pytest.raises(ConfigError, match="base is required"):
        align_from_dict({})
    with pytest.raises(ConfigError, match="k >= 2"):
        align_from_dict({"align": {"base": "x"}, "sample": {"k": 1}})
    with pytest.raises(ConfigError, match="unknown section"):
        align_from_dict({"align": {"base": "x"}, "ppo": {}})
