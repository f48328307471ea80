"""Tokenizers across formats: Llama 3's tiktoken ranks as tokenizer.json (transformers) and GGUF
(llama.cpp) against llama-models; SmolLM2's GGUF vocabulary back to GGUF and into Meta
directories; `load_tokenizer` on every layout; save_model and `herd convert` carrying them."""

from __future__ import annotations

import importlib.resources
import json
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import herd
from herd.cli.main import app
from herd.tokenizer import HFTokenizer, TiktokenTokenizer, llama3, load_tokenizer, save_tokenizer
from herd.tokenizer.chat import LLAMA3_CHAT_TEMPLATE
from herd.tokenizer.formats import find_tokenizer, gguf_fields, tiktoken_ranks, to_hf
from herd.tokenizer.gguf_vocab import read_tokenizer_fields
from herd.tokenizer.llama3 import save_ranks
from tests.checkpoint.llamacpp import _load as load_llamacpp
from tests.tokenizer.test_hf_gguf import TEXTS, _vocab_only_gguf, llamacpp_tokenize

LLAMA3_STOPS = [128001, 128008, 128009]


@pytest.fixture(scope="module")
def reference():
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer.get_instance()


@pytest.fixture(scope="module")
def llama3_hf() -> HFTokenizer:
    return to_hf(llama3())


@pytest.fixture(scope="module")
def smollm2(smollm2_path) -> HFTokenizer:
    return HFTokenizer.from_gguf_file(smollm2_path)


def tiny_model(vocab_size: int) -> herd.Transformer:
    config = herd.preset("debug").replace(
        vocab_size=vocab_size, n_layers=1, tie_word_embeddings=True
    )
    model = herd.Transformer(config)
    model.init_weights(seed=0)
    return model


def official_ranks_bytes() -> bytes:
    return (importlib.resources.files("llama_models.llama3") / "tokenizer.model").read_bytes()


# ---------------------------------------------------------------- Llama 3


def test_llama3_as_tokenizer_json_matches_llama_models_in_transformers(
    tmp_path, llama3_hf, reference
):
    from transformers import AutoTokenizer

    save_tokenizer(llama3_hf, tmp_path, "hf", model_max_length=8192)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    assert theirs.model_max_length == 8192 and theirs.chat_template == LLAMA3_CHAT_TEMPLATE
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 128000, "eos_token_id": LLAMA3_STOPS}
    ours = load_tokenizer(tmp_path)
    for text in TEXTS:
        expected = reference.encode(text, bos=True, eos=False)
        assert theirs(text, split_special_tokens=True)["input_ids"] == expected
        assert theirs.decode(expected[1:]) == text
        assert ours.encode(text, bos=True) == expected
        special = reference.encode(text, bos=True, eos=False, allowed_special="all")
        assert theirs.encode(text) == special
        assert ours.encode(text, bos=True, special=True) == special
    dialog = [{"role": "user", "content": "hi"}]
    prompt = theirs.apply_chat_template(dialog, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi")


@settings(max_examples=100, deadline=None)
@given(text=st.text(st.characters(exclude_categories=("Cs",)), max_size=60))
def test_llama3_bpe_from_ranks_equals_tiktoken(llama3_hf, text):
    assert llama3_hf.encode(text) == llama3().encode(text)


def test_llama3_as_gguf_matches_llama_models_in_llamacpp(tmp_path, llama3_hf, reference):
    path = tmp_path / "llama3.gguf"
    # llama3_hf is to_hf(llama3()), which saving llama3() itself would make again
    herd.save_model(tiny_model(128256), path, "gguf", dtype="f16", tokenizer=llama3_hf)
    plain = llamacpp_tokenize(path, TEXTS)
    assert plain == [reference.encode(t, bos=False, eos=False) for t in TEXTS]
    special = llamacpp_tokenize(path, TEXTS, parse_special=True, add_special=True)
    expected = [reference.encode(t, bos=True, eos=False, allowed_special="all") for t in TEXTS]
    assert special == expected

    lib, ffi = load_llamacpp()
    params = lib.llama_model_default_params()
    params.vocab_only = True
    model = lib.llama_model_load_from_file(str(path).encode(), params)
    assert model != ffi.NULL
    vocab = lib.llama_model_get_vocab(model)
    try:
        assert (lib.llama_vocab_bos(vocab), lib.llama_vocab_eos(vocab)) == (128000, 128001)
        assert lib.llama_vocab_eot(vocab) == 128009 and lib.llama_vocab_get_add_bos(vocab)
        ends = [i for i in range(128000, 128256) if lib.llama_vocab_is_eog(vocab, i)]
        assert ends == LLAMA3_STOPS
    finally:
        lib.llama_model_free(model)

    fields = read_tokenizer_fields(path)
    assert fields["tokenizer.ggml.pre"].value == "llama-bpe"
    assert fields["tokenizer.chat_template"].value == LLAMA3_CHAT_TEMPLATE
    back = load_tokenizer(path)
    assert [back.encode(t) for t in TEXTS] == plain
    # and on to Meta: the ranks come back exactly, as the official file
    assert save_tokenizer(back, tmp_path / "meta", "meta") == [tmp_path / "meta/tokenizer.model"]
    assert (tmp_path / "meta" / "tokenizer.model").read_bytes() == official_ranks_bytes()


def test_llama3_meta_directory_round_trip(tmp_path):
    assert save_tokenizer(llama3(), tmp_path, "meta") == [tmp_path / "tokenizer.model"]
    assert (tmp_path / "tokenizer.model").read_bytes() == official_ranks_bytes()
    assert load_tokenizer(tmp_path) is llama3()
    assert load_tokenizer(tmp_path / "tokenizer.model") is llama3()


def test_other_tiktoken_ranks_load_as_such(tmp_path):
    ranks = {bytes([b]): b for b in range(256)}
    save_ranks(ranks, tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, TiktokenTokenizer) and tok.vocab_size == 256 + 256
    assert tok.decode(tok.encode("héllo")) == "héllo"


# ---------------------------------------------------------------- SmolLM2 and other vocabularies


def test_gguf_to_tokenizer_json_to_gguf_is_lossless(tmp_path, smollm2, smollm2_path):
    save_tokenizer(smollm2, tmp_path / "hf", "hf")
    hf = load_tokenizer(tmp_path / "hf")
    assert hf.gguf_fields is None  # rebuilt from tokenizer.json, not copied
    source = read_tokenizer_fields(smollm2_path)
    rebuilt = gguf_fields(hf)
    for key in (
        "model",
        "pre",
        "tokens",
        "token_type",
        "merges",
        "bos_token_id",
        "eos_token_id",
        "padding_token_id",
        "add_bos_token",
    ):
        key = f"tokenizer.ggml.{key}"
        assert rebuilt[key].value == source[key].value, key
    assert rebuilt["tokenizer.chat_template"].value == source["tokenizer.chat_template"].value

    path = tmp_path / "smol.gguf"
    herd.save_model(tiny_model(49152), path, "gguf", tokenizer=tmp_path / "hf")
    assert llamacpp_tokenize(path, TEXTS) == [smollm2.encode(t) for t in TEXTS]


def test_gguf_to_gguf_copies_the_fields(tmp_path, smollm2_path):
    path = tmp_path / "copy.gguf"
    herd.save_model(tiny_model(49152), path, "gguf", tokenizer="smollm2")
    assert read_tokenizer_fields(path) == read_tokenizer_fields(smollm2_path)


def test_unsupported_gguf_vocabulary_still_travels_gguf_to_gguf(tmp_path):
    """A SentencePiece GGUF vocabulary cannot become tokenizer.json, but its fields are copied
    into another GGUF as they are, padded to the model's embedding."""
    source = _vocab_only_gguf(
        tmp_path / "spm.gguf", model="llama", tokens=["<unk>", "<s>", "</s>", "▁a"]
    )
    out = tmp_path / "out.gguf"
    herd.save_model(tiny_model(8), out, "gguf", tokenizer=source)
    fields = read_tokenizer_fields(out)
    assert fields["tokenizer.ggml.model"].value == "llama"
    assert fields["tokenizer.ggml.tokens"].value == [
        "<unk>",
        "<s>",
        "</s>",
        "▁a",
        "[PAD4]",
        "[PAD5]",
        "[PAD6]",
        "[PAD7]",
    ]
    with pytest.raises(ValueError, match="'llama' \\(SentencePiece"):
        herd.save_model(tiny_model(8), tmp_path / "hf", "hf", tokenizer=source)


def test_non_tiktoken_vocabulary_in_a_meta_directory(tmp_path, smollm2, caplog):
    with caplog.at_level(logging.INFO, logger="herd.tokenizer.formats"):
        written = save_tokenizer(smollm2, tmp_path, "meta")
    assert tmp_path / "tokenizer.json" in written
    assert not (tmp_path / "tokenizer.model").exists()
    assert "holds only Llama 3's tiktoken BPE" in caplog.text
    assert tiktoken_ranks(smollm2) is None
    back = load_tokenizer(tmp_path)
    assert [back.encode(t) for t in TEXTS] == [smollm2.encode(t) for t in TEXTS]


def test_vocabulary_only_gguf(tmp_path, smollm2):
    (path,) = save_tokenizer(smollm2, tmp_path, "gguf")
    assert path == tmp_path / "tokenizer.gguf"
    back = load_tokenizer(path)
    assert [back.encode(t) for t in TEXTS] == [smollm2.encode(t) for t in TEXTS]


# ---------------------------------------------------------------- finding tokenizers


def test_load_tokenizer_finds_each_layout(tmp_path, smollm2_path, smollm2):
    save_tokenizer(smollm2, tmp_path / "hf", "hf")
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "m.gguf").symlink_to(smollm2_path)
    text = "Hello <|im_end|> 123"
    expected = smollm2.encode(text)
    for where in (
        tmp_path / "hf",
        tmp_path / "hf" / "tokenizer.json",
        tmp_path / "gguf",
        smollm2_path,
        "smollm2",
    ):
        assert load_tokenizer(where).encode(text) == expected, where
    bare = HFTokenizer.from_file(tmp_path / "hf" / "tokenizer.json")
    assert bare.encode(text) == expected and bare.eos_id is None
    assert find_tokenizer(tmp_path / "gguf") == tmp_path / "gguf" / "m.gguf"


def test_no_tokenizer_errors(tmp_path, hf_dir):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(
        FileNotFoundError,
        match=r"no tokenizer: expected tokenizer\.json .*"
        r"found config\.json",
    ):
        load_tokenizer(hf_dir)
    (tmp_path / "model.gguf").write_bytes(b"")
    herd.save_model(tiny_model(64), tmp_path / "model.gguf", "gguf")
    with pytest.raises(FileNotFoundError, match="model.gguf: has no tokenizer"):
        find_tokenizer(tmp_path / "model.gguf")
    with pytest.raises(ValueError, match="Llama 1/2 is not supported"):
        (tmp_path / "sp").mkdir()
        (tmp_path / "sp" / "tokenizer.model").write_bytes(b"\x0a\x0b\x00\xff binary protobuf")
        load_tokenizer(tmp_path / "sp")


# ---------------------------------------------------------------- save_model and the CLI


def test_save_model_writes_the_tokenizer_for_transformers(tmp_path, smollm2):
    from transformers import AutoTokenizer

    written = herd.save_model(tiny_model(49152), tmp_path / "hf", "hf", tokenizer=smollm2)
    assert tmp_path / "hf" / "tokenizer.json" in written
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert theirs.model_max_length == 256  # the model's context length
    assert theirs.encode("Hello world", add_special_tokens=False) == smollm2.encode("Hello world")
    with pytest.raises(herd.CheckpointError, match="49152 token ids but the model's embedding"):
        herd.save_model(tiny_model(320), tmp_path / "small", "hf", tokenizer=smollm2)
    assert not (tmp_path / "small").exists()


def test_convert_carries_the_tokenizer(tmp_path, smollm2):
    from transformers import AutoTokenizer

    runner = CliRunner()
    source = tmp_path / "src"
    herd.save_model(tiny_model(49152), source, "hf", tokenizer=smollm2)
    result = runner.invoke(app, ["convert", str(source), str(tmp_path / "m.gguf"), "--to", "gguf"])
    assert result.exit_code == 0, result.output
    output = result.output.replace("\n", "")  # rich wraps long paths, even mid-word
    assert "tokenizer: " in output and "tokenizer.json" in output
    text = "The cat sat on the mat, 1234 times 🐈"
    assert llamacpp_tokenize(tmp_path / "m.gguf", [text]) == [smollm2.encode(text)]

    result = runner.invoke(app, ["convert", str(tmp_path / "m.gguf"), str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert theirs.encode(text, add_special_tokens=False) == smollm2.encode(text)

    result = runner.invoke(
        app, ["convert", str(tmp_path / "hf"), str(tmp_path / "bare"), "--no-tokenizer"]
    )
    assert result.exit_code == 0 and not (tmp_path / "bare" / "tokenizer.json").exists()
    result = runner.invoke(
        app, ["convert", str(tmp_path / "bare"), str(tmp_path / "meta"), "--to", "meta"]
    )
    assert result.exit_code == 0 and "no tokenizer to carry" in result.output
    result = runner.invoke(
        app,
        [
            "convert",
            str(tmp_path / "bare"),
            str(tmp_path / "meta2"),
            "--to",
            "meta",
            "--tokenizer",
            "smollm2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert load_tokenizer(tmp_path / "meta2").encode(text) == smollm2.encode(text)
