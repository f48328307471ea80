"""`herd pretrain` and `herd export` from the command line: a run exported to each format and
read back by transformers (hf) and herd (meta, gguf); errors that name the problem."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from herd.checkpoint import load_model
from herd.cli.main import app
from herd.tokenizer import load_tokenizer
from herd.train.checkpoint import load_run_model
from tests.train.conftest import corpus, recipe, toml  # noqa: F401  (the corpus fixture)

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("cli-run")
    file = root / "recipe.toml"
    file.write_text(toml(recipe(corpus, root / "run", optim={"steps": 2})))
    result = runner.invoke(app, ["pretrain", str(file), "--set", "optim.steps=3"])
    assert result.exit_code == 0, result.output
    output = result.output.replace("\n", "")  # rich wraps long paths, even mid-word
    assert "done: 3 steps" in output and "step-00000003" in output
    return file, root / "run"


def test_export_to_hf_is_read_by_transformers(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run_dir = trained
    result = runner.invoke(app, ["export", str(run_dir), str(tmp_path / "hf"), "--to", "hf"])
    assert result.exit_code == 0, result.output
    ours, _ = load_run_model(run_dir)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    text = "Fair is foul, and foul is fair"
    ids = load_tokenizer(run_dir / "tokenizer").encode(text)
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    tokens = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt, out", [("meta", "meta"), ("gguf", "model.gguf")])
def test_export_to_meta_and_gguf_round_trips(trained, tmp_path, fmt, out):
    _, run_dir = trained
    result = runner.invoke(app, ["export", str(run_dir), str(tmp_path / out), "--to", fmt])
    assert result.exit_code == 0, result.output
    ours, _ = load_run_model(run_dir)
    back = load_model(tmp_path / out)
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
    assert load_tokenizer(tmp_path / out).encode("Out, damned spot!") == load_tokenizer(
        run_dir / "tokenizer"
    ).encode("Out, damned spot!")


def test_pretrain_errors_name_the_problem(trained, tmp_path):
    file, _ = trained
    result = runner.invoke(app, ["pretrain", str(file), "--set", "optim.lrr=1"])
    assert result.exit_code == 1 and "unknown key(s) lrr" in result.output
    result = runner.invoke(app, ["pretrain", str(file)])
    assert result.exit_code == 1 and "--resume" in result.output
    result = runner.invoke(app, ["pretrain", str(file), "--set", "parallel.tp=2"])
    assert result.exit_code == 1 and "does not divide the world size 1" in result.output
    result = runner.invoke(
        app, ["pretrain", str(file), "--set", 'parallel.fsdp_param_dtype="bf16"']
    )
    assert result.exit_code == 1 and "this layout does not use" in result.output
    result = runner.invoke(app, ["pretrain", str(tmp_path / "missing.toml")])
    assert result.exit_code == 1 and "no such recipe" in result.output
    result = runner.invoke(app, ["export", str(tmp_path), str(tmp_path / "x")])
    assert result.exit_code == 1 and "not a training run" in result.output
    # resuming a finished run is a no-op that says where the checkpoint is
    result = runner.invoke(app, ["pretrain", str(file), "--resume"])
    assert result.exit_code == 0 and "resuming at step 3" in result.output
