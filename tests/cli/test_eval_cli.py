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


def test_eval_writes_plots_and_perplexity(tmp_path):
    from herd.quantize.perplexity import shakespeare_text

    (tmp_path / "play.txt").write_text(shakespeare_text()[:3000])
    args = [
        "eval", "--tasks", "niah,mmlu", "--limit", "2", "--lengths", "256",
        "--perplexity", str(tmp_path / "play.txt"), "--max-seq-len", "1024",
        "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "retrieval" in result.output and "bits/byte" in result.output
    for png in ("niah.png", "mmlu_subjects.png"):
        assert (tmp_path / "out" / png).read_bytes()[:4] == b"\x89PNG"
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["task"] for r in results][:2] == ["niah", "mmlu"]
    assert results[2]["task"].startswith("perplexity:") and results[2]["bits_per_byte"] > 0


def test_contamination_cli_needs_a_tokenizer_and_reports(tmp_path):
    from herd.data.shards import tokenize_corpus
    from herd.eval import get_task
    from herd.eval.contamination import example_text

    leaked = get_task("boolq").load(0)[:2]
    (tmp_path / "c.txt").write_text("\n".join(example_text(q) for q in leaked))
    tokenize_corpus([tmp_path / "c.txt"], tmp_path / "shards", "smollm2")
    result = runner.invoke(app, ["eval", "contamination", str(tmp_path / "shards")])
    assert result.exit_code == 1 and "--tokenizer" in result.output
    args = ["eval", "contamination", str(tmp_path / "shards"), "--tokenizer", "smollm2",
            "--tasks", "boolq", "--limit", "6", "--out", str(tmp_path / "report.json")]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    (entry,) = json.loads((tmp_path / "report.json").read_text())
    assert entry["n"] == 6 and entry["n_dirty"] >= 1
    assert [e["score"] >= 0.5 for e in entry["examples"]][:2] == [True, True]
