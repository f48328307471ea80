"""herd as an lm-eval model against lm-eval's own `hf` backend over transformers: the same
local tasks (real ARC-Easy questions, real GSM8K problems, Shakespeare for perplexity) through
`lm_eval.simple_evaluate`, the same accuracies and per-request log-likelihoods, the same greedy
generations, the same chat rendering."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")

import herd.eval  # noqa: F401  (registers "herd")
from herd.eval.tasks import write_lm_eval_task

ROLLING = """task: herd_test_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """herd's own ARC-Easy and GSM8K items as local lm-eval tasks, and Shakespeare passages
    for rolling log-likelihoods."""
    from herd.quantize.perplexity import shakespeare_text

    root = tmp_path_factory.mktemp("lm-eval-tasks")
    assert write_lm_eval_task("arc_easy", 0, root, limit=12) == "herd_arc_easy"
    assert write_lm_eval_task("gsm8k", 0, root, limit=4, max_new_tokens=40) == "herd_gsm8k_0shot"
    play = shakespeare_text().split("\n\n")
    texts = [{"text": "\n\n".join(play[i : i + 14])} for i in (40, 80)]
    (root / "rolling.jsonl").write_text("".join(json.dumps(r) + "\n" for r in texts))
    (root / "herd_test_rolling.yaml").write_text(ROLLING.format(data=root / "rolling.jsonl"))
    return root


@pytest.fixture(scope="module")
def both(
    smollm2_path, smollm2_transformers, smollm2_transformers_tokenizer, tasks, tmp_path_factory
):
    """Run every task through both backends once (greedy, fp32, window 256)."""
    import os

    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf-datasets"))
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = ["herd_arc_easy", "herd_gsm8k_0shot", "herd_test_rolling"]
    hf = HFLM(
        pretrained=smollm2_transformers, tokenizer=smollm2_transformers_tokenizer,
        batch_size=4, max_length=256,
    )  # fmt: skip
    runs = {}
    for name, model, args in (
        ("hf", hf, None),
        ("herd", "herd", f"pretrained={smollm2_path},dtype=float32,max_length=256"),
    ):
        runs[name] = lm_eval.simple_evaluate(
            model=model, model_args=args, tasks=names, task_manager=TaskManager(include_path=str(tasks)),
            log_samples=True, batch_size=4,
        )  # fmt: skip
    return runs


def _responses(run, task):
    return [s["filtered_resps"] for s in sorted(run["samples"][task], key=lambda s: s["doc_id"])]


def test_multiple_choice_equals_the_hf_backend(both):
    ours, theirs = both["herd"], both["hf"]
    for metric in ("acc,none", "acc_norm,none"):
        assert (
            ours["results"]["herd_arc_easy"][metric] == theirs["results"]["herd_arc_easy"][metric]
        )
    a, b = _responses(ours, "herd_arc_easy"), _responses(theirs, "herd_arc_easy")
    assert len(a) == 12
    for mine, other in zip(a, b):
        assert [lp for lp, _ in mine] == pytest.approx([lp for lp, _ in other], abs=1e-4)
        assert [g for _, g in mine] == [g for _, g in other]


def test_greedy_generation_equals_the_hf_backend(both):
    ours, theirs = both["herd"], both["hf"]
    a, b = _responses(ours, "herd_gsm8k_0shot"), _responses(theirs, "herd_gsm8k_0shot")
    assert a == b and len(a) == 4 and all(text[0].strip() for text in a)
    metric = "exact_match,none"
    assert (
        ours["results"]["herd_gsm8k_0shot"][metric] == theirs["results"]["herd_gsm8k_0shot"][metric]
    )


def test_rolling_loglikelihood_equals_the_hf_backend(both):
    """Two passages longer than the 256-token window: several disjoint windows each."""
    ours, theirs = both["herd"], both["hf"]
    a, b = _responses(ours, "herd_test_rolling"), _responses(theirs, "herd_test_rolling")
    assert [x[0] for x in a] == pytest.approx([x[0] for x in b], rel=1e-5)
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        r = ours["results"]["herd_test_rolling"][metric]
        assert r == pytest.approx(theirs["results"]["herd_test_rolling"][metric], rel=1e-5)


def test_chat_rendering_equals_the_hf_backend(
    smollm2_path, smollm2_transformers, smollm2_transformers_tokenizer
):
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=smollm2_transformers, tokenizer=smollm2_transformers_tokenizer)
    herd_lm = get_model("herd")(pretrained=str(smollm2_path), dtype="float32")
    chat = [
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "And 12 + 31?"},
    ]
    assert herd_lm.apply_chat_template(chat) == hf.apply_chat_template(chat)
    assert herd_lm.tok_encode(herd_lm.apply_chat_template(chat)) == hf.tok_encode(
        hf.apply_chat_template(chat)
    )


def test_herd_lm_eval_runs_lm_evals_cli_with_herd_registered(tasks, tmp_path):
    from typer.testing import CliRunner

    from herd.cli.main import app

    args = [
        "lm-eval", "--model", "herd", "--model_args", "pretrained=smollm2,max_length=256",
        "--tasks", "herd_arc_easy", "--include_path", str(tasks), "--limit", "3",
        "--output_path", str(tmp_path),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (written,) = tmp_path.rglob("results_*.json")
    scores = json.loads(written.read_text())["results"]["herd_arc_easy"]
    assert 0 <= scores["acc,none"] <= 1 and scores["alias"] == "herd_arc_easy"
