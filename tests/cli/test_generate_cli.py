"""`herd generate` and `herd chat` on the real SmolLM2 model (loaded once)."""

import pytest
from typer.testing import CliRunner

from herd.cli.main import app
from herd.infer import Llama

runner = CliRunner()


@pytest.fixture(scope="module")
def smollm2():
    return Llama.load("smollm2")


@pytest.fixture
def loaded(monkeypatch, smollm2):
    """`Llama.load` returns the preloaded model, with the window the command asked for."""

    def load(path, dtype=None, quantize=None, max_seq_len=None, compile=False, adapter=None,
             draft=None, draft_tokens=4, tp=1):  # fmt: skip
        assert path == "smollm2" and adapter is None and tp == 1
        calls.append({"compile": compile})
        # Compiling SmolLM2 takes a minute; tests/infer/test_compile.py covers that path.
        return Llama(smollm2.model, smollm2.tokenizer, max_seq_len, draft=draft,
                     draft_tokens=draft_tokens)  # fmt: skip

    calls: list[dict] = []
    monkeypatch.setattr(Llama, "load", staticmethod(load))
    smollm2.calls = calls
    return smollm2


def test_one_shot_chat_prints_the_greedy_answer(loaded):
    question = "What is the capital of France?"
    expected = loaded.chat(
        [{"role": "user", "content": question}], max_new_tokens=24, temperature=0
    )
    result = runner.invoke(app, ["chat", "--message", question, "-n", "24", "--temperature", "0"])
    assert result.exit_code == 0, result.output
    assert expected.text.strip() and expected.text.strip() in result.output


def test_generate_streams_the_continuation(loaded):
    prompt = "The capital of France is"
    expected = loaded.generate(prompt, max_new_tokens=12, temperature=0)[0]
    result = runner.invoke(app, ["generate", "-p", prompt, "-n", "12", "--temperature", "0"])
    assert result.exit_code == 0, result.output
    assert result.output == expected.text + "\n"
    assert loaded.calls[-1] == {"compile": False}
    args = ["generate", "-p", prompt, "-n", "1", "--temperature", "0", "--compile"]
    assert runner.invoke(app, args).exit_code == 0
    assert loaded.calls[-1] == {"compile": True}


def test_generate_with_a_draft_prints_the_same_greedy_text(loaded):
    prompt = "List the days of the week: Monday, Tuesday,"
    expected = loaded.generate(prompt, max_new_tokens=20, temperature=0)[0]
    for draft in (["--draft", "ngram"], ["--draft", "ngram", "--draft-tokens", "2"]):
        args = ["generate", "-p", prompt, "-n", "20", "--temperature", "0", *draft]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert result.output == expected.text + "\n"
    bad = runner.invoke(app, ["generate", "-p", prompt, "--draft", "ngram", "--draft-tokens", "0"])
    assert bad.exit_code == 1 and "draft_tokens must be >= 1" in bad.output


def test_repl_resets_exits_and_drops_old_turns_when_the_window_is_full(loaded):
    lines = "Hello there!\n/reset\nName a colour.\nName a fruit.\nName a number.\n/exit\n"
    result = runner.invoke(
        app,
        ["chat", "--max-seq-len", "96", "-n", "24", "--temperature", "0"],
        input=lines,
    )
    assert result.exit_code == 0, result.output
    assert "history cleared" in result.output
    assert "context window full; dropped the" in result.output
    assert result.output.count("assistant>") == 4


def test_bad_model_path_is_explained(tmp_path):
    result = runner.invoke(app, ["chat", "--model", str(tmp_path / "nope"), "--message", "hi"])
    assert result.exit_code == 1
    assert "no such file" in result.output
