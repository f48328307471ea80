"""metrics.jsonl: only a torn last line is forgiven, and the rewrite on resume cannot lose the
run's history however it is interrupted."""

from __future__ import annotations

import json

import pytest

from herd.train import metrics as metrics_module
from herd.train.metrics import MetricsCorrupt, MetricsWriter, read_metrics


def write(path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def records(n: int) -> list[str]:
    return [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, n + 1)]


def test_a_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(records(3)) + '\n{"step": 4, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


@pytest.mark.parametrize("bad", ['{"step": 2, "lo', "garbage", "[1, 2]", '{"loss": 1.0}'])
def test_a_malformed_line_before_the_last_is_an_error_naming_it(tmp_path, bad):
    path = tmp_path / "metrics.jsonl"
    lines = records(4)
    lines[1] = bad
    write(path, lines)
    with pytest.raises(MetricsCorrupt, match=r"metrics\.jsonl:2: "):
        read_metrics(path)


def test_resume_keeps_the_records_up_to_the_checkpoint(tmp_path):
    write(tmp_path / "metrics.jsonl", records(6))
    writer = MetricsWriter(tmp_path, resume_step=4, tensorboard=False)
    writer.write(5, {"loss": 0.5})
    writer.close()
    got = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5] and got[-1]["loss"] == 0.5


def test_a_crash_while_rewriting_on_resume_keeps_the_old_history(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    write(path, records(6))
    before = path.read_bytes()
    calls, real_dumps = 0, json.dumps

    def dumps_then_crash(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 3:  # two records out, then the process "dies"
            raise KeyboardInterrupt
        return real_dumps(*args, **kwargs)

    monkeypatch.setattr(metrics_module.json, "dumps", dumps_then_crash)
    with pytest.raises(KeyboardInterrupt):
        MetricsWriter(tmp_path, resume_step=4, tensorboard=False)
    assert calls == 3
    assert path.read_bytes() == before
