"""`herd eval` from the command line: the score table, results.json and per-item records, and
an unknown task named with the known ones."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from herd.cli.main import app

runner = CliRunner()


def test_eval_prints_scores_and_writes_records(tmp_path):
    args = ["eval", "--tasks", "arc_easy,boolq", "--limit", "3", "--out", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "arc_easy" in result.output and "acc_norm" in result.output
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["task"] for r in results] == ["arc_easy", "boolq"]
    assert all(r["acc"]["n"] == 3 for r in results)
    records = (tmp_path / "boolq.jsonl").read_text().splitlines()
    assert len(records) == 3 and {"gold", "prediction", "logprobs"} <= set(json.loads(records[0]))


def test_unknown_task_lists_the_known_ones():
    result = runner.invoke(app, ["eval", "--tasks", "arc_easy,mmlu_pro"])
    assert result.exit_code == 1
    assert "unknown task(s) mmlu_pro" in result.output and "hellaswag" in result.output
