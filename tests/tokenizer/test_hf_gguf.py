"""HFTokenizer: the SmolLM2 GGUF vocabulary against llama.cpp and transformers, Hugging Face
directories, non-byte-level tokenizer.json files, and the errors for what herd cannot read."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from herd.tokenizer import HFTokenizer, load_tokenizer, save_tokenizer
from tests.checkpoint.llamacpp import _load as load_llamacpp
from tests.tokenizer.corpus import CORPUS

EXTRA = [
    "123456789 12 1 22 333 4444 55555",
    " 1 12 123 a1b22c333 ٣٤٥ ४५६",
    "don't DON'T we'LL I'M they've",
    "x  \n\n y \n \t\n",
    "<think>reasoning</think> <|im_start|>user\nhi<|im_end|>\n",
]
TEXTS = CORPUS + EXTRA
# SmolLM2's vocabulary lacks six control bytes and the lead bytes of planes 4-11 (and those
# no UTF-8 uses); characters made of them are dropped, by llama.cpp too. Lone surrogates are
# not UTF-8.
UNTOKENIZABLE = "\x04\x06\x13\x14\x16\x1d"
UNICODE = st.text(
    st.characters(
        exclude_categories=("Cs",), exclude_characters=UNTOKENIZABLE, max_codepoint=0x3FFFF
    ),
    max_size=40,
)


def llamacpp_tokenize(
    path: Path, texts: list[str], parse_special: bool = False, add_special: bool = False
) -> list[list[int]]:
    """llama.cpp's own tokenizer on `texts`, from the vocabulary of the GGUF at `path`."""
    lib, ffi = load_llamacpp()
    params = lib.llama_model_default_params()
    params.vocab_only = True
    model = lib.llama_model_load_from_file(str(path).encode(), params)
    if model == ffi.NULL:
        raise RuntimeError(f"llama.cpp could not load {path}")
    try:
        vocab = lib.llama_model_get_vocab(model)
        out = []
        for text in texts:
            data = text.encode()
            room = len(data) + 8
            tokens = ffi.new("llama_token[]", room)
            n = lib.llama_tokenize(vocab, data, len(data), tokens, room, add_special, parse_special)
            assert n >= 0, f"llama_tokenize needs {-n} tokens"
            out.append(list(tokens[0:n]))
        return out
    finally:
        lib.llama_model_free(model)


@pytest.fixture(scope="module")
def smollm2(smollm2_path) -> HFTokenizer:
    return HFTokenizer.from_gguf_file(smollm2_path)


# ---------------------------------------------------------------- SmolLM2's GGUF vocabulary


def test_smollm2_vocabulary_metadata(smollm2):
    assert smollm2.byte_level and smollm2.vocab_size == 49152
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.pad_id) == (1, 2, 2)
    assert smollm2.special_tokens["<|im_start|>"] == 1
    assert set(smollm2.stop_ids) == {2, 0}  # <|im_end|>, and <|endoftext|> as llama.cpp ends on it
    assert smollm2.add_bos is False
    assert "<|im_start|>" in smollm2.chat_template
    assert smollm2.token_bytes(smollm2.backend.token_to_id("Ġthe")) == b" the"
    assert smollm2.token_bytes(1) == b"<|im_start|>"


def test_smollm2_ids_match_llamacpp(smollm2, smollm2_path):
    for parse_special in (False, True):
        theirs = llamacpp_tokenize(smollm2_path, TEXTS, parse_special=parse_special)
        ours = [smollm2.encode(t, special=parse_special) for t in TEXTS]
        mismatched = [t for t, a, b in zip(TEXTS, ours, theirs) if a != b]
        assert not mismatched, (parse_special, mismatched)


def _non_ascii_digits(text: str) -> bool:
    return any(c.isnumeric() and not c.isascii() for c in text)


def test_smollm2_ids_match_transformers(smollm2, smollm2_transformers_tokenizer):
    ref = smollm2_transformers_tokenizer
    for text in TEXTS:
        if _non_ascii_digits(text):
            continue  # see the next test
        assert smollm2.encode(text, special=True) == ref.encode(text, add_special_tokens=False)
        plain = ref(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert smollm2.encode(text) == plain


def test_transformers_ignores_the_smollm_digit_split(
    smollm2, smollm2_path, smollm2_transformers_tokenizer
):
    """transformers has no entry for the GGUF pre-tokenizer "smollm" and splits with GPT-2's
    regex alone; llama.cpp (and SmolLM2's own tokenizer.json) first cut every digit apart. ASCII
    digits tokenize the same either way, but " ٣" becomes " " + "٣" in llama.cpp and one
    merged " \xd9" token + "\xa3" in transformers. herd follows llama.cpp."""
    text = "ages ٣٤٥ and ४५६"
    ours = smollm2.encode(text)
    assert ours == llamacpp_tokenize(smollm2_path, [text])[0]
    assert ours != smollm2_transformers_tokenizer.encode(text, add_special_tokens=False)
    assert smollm2.decode([ours[1]]) == " "


def test_special_token_text_is_plain_text_unless_asked(smollm2):
    start = smollm2.special_tokens["<|im_start|>"]
    text = "<|im_start|>user\nhello<|im_end|>"
    assert start not in smollm2.encode(text)
    assert smollm2.encode(text, special=True)[0] == start
    assert smollm2.decode(smollm2.encode(text)) == text
    assert smollm2.decode(smollm2.encode(text, special=True)) == text


def test_encode_batch_keeps_specials_as_text(smollm2):
    texts = [f"<|im_start|> line {i} <|im_end|>" for i in range(64)]
    assert smollm2.encode_batch(texts, num_threads=4) == [smollm2.encode(t) for t in texts]


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_decode_inverts_encode(smollm2, text):
    ids = smollm2.encode(text)
    assert smollm2.decode(ids) == text
    stream = smollm2.stream_decoder()
    assert stream.extend(ids) + stream.flush() == text


@settings(max_examples=60, deadline=None)
@given(text=UNICODE)
def test_decode_inverts_encode_for_any_unicode(smollm2, text):
    assert smollm2.decode(smollm2.encode(text)) == text


def test_bytes_missing_from_the_vocabulary_are_dropped_like_llamacpp(smollm2, smollm2_path):
    text = "a\x06b \U00050000 c"
    assert smollm2.encode(text) == llamacpp_tokenize(smollm2_path, [text])[0]
    # the lead byte of U+50000 is dropped, its three continuation bytes are not
    assert smollm2.decode(smollm2.encode(text)) == "ab \ufffd\ufffd\ufffd c"


def test_lone_surrogates_become_replacement_characters(smollm2):
    assert smollm2.decode(smollm2.encode("a\ud800b")) == "a\ufffdb"


# ---------------------------------------------------------------- Hugging Face directories


def test_smollm2_as_tokenizer_json_loads_in_transformers(
    tmp_path, smollm2, smollm2_transformers_tokenizer
):
    """GGUF -> tokenizer.json: transformers' AutoTokenizer on the directory herd writes gives the
    ids transformers gives from the GGUF itself (llama.cpp's where those two differ)."""
    from transformers import AutoTokenizer

    save_tokenizer(smollm2, tmp_path, "hf")
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    assert (theirs.bos_token, theirs.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert theirs.chat_template == smollm2.chat_template
    for text in TEXTS:
        ids = theirs.encode(text, add_special_tokens=False)
        if not _non_ascii_digits(text):
            assert ids == smollm2_transformers_tokenizer.encode(text, add_special_tokens=False)
        assert ids == smollm2.encode(text, special=True)
        assert theirs.decode(ids) == text
    reloaded = load_tokenizer(tmp_path)
    assert [reloaded.encode(t) for t in TEXTS] == [smollm2.encode(t) for t in TEXTS]
    assert (reloaded.bos_id, reloaded.eos_id, reloaded.add_bos) == (1, 2, False)
    assert set(reloaded.stop_ids) == set(smollm2.stop_ids)


def test_directory_configuration(tmp_path, smollm2):
    smollm2.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": {"content": "<|im_start|>"},
                "eos_token": "<|im_end|>",
                "chat_template": "from the config",
                "model_max_length": 10**30,
                "add_bos_token": True,
            }
        )
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 5}))
    tok = HFTokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (1, 2, (2, 0, 5))
    assert tok.chat_template == "from the config" and tok.add_bos
    assert tok.model_max_length is None  # 1e30 means "no limit"
    (tmp_path / "chat_template.jinja").write_text("from the jinja file")
    assert HFTokenizer.from_dir(tmp_path).chat_template == "from the jinja file"


def _sentencepiece_style_json() -> str:
    """A Llama 2-style tokenizer.json: "▁" for spaces, byte fallback, no byte-level alphabet."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "▁he", "▁hell", "▁hello"]
    merges = [("h", "e"), ("l", "l"), ("▁", "he"), ("▁he", "ll"), ("▁hell", "o")]
    model = models.BPE(
        {p: i for i, p in enumerate(pieces)}, merges, unk_token="<unk>", byte_fallback=True
    )
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(["<s>", "</s>"])
    return tok.to_str()


def test_sentencepiece_style_vocabulary(tmp_path):
    (tmp_path / "tokenizer.json").write_text(_sentencepiece_style_json())
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer) and not tok.byte_level
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    ids = tok.encode("hello world 🎉", bos=True)
    assert ids[:2] == [1, 271]  # <s>, ▁hello
    assert 3 + 0xF0 in ids  # the emoji falls back to its bytes
    assert tok.decode(ids[1:]) == "hello world 🎉"
    assert tok.encode("</s>") != [2] and tok.encode("</s>", special=True) == [2]
    stream = tok.stream_decoder()
    assert stream.extend(ids[1:]) + stream.flush() == "hello world 🎉"
    with pytest.raises(NotImplementedError):
        tok.token_bytes(5)


# ---------------------------------------------------------------- what herd cannot read


def _vocab_only_gguf(path: Path, **fields) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in fields.items():
        if isinstance(value, list):
            writer.add_array(f"tokenizer.ggml.{key}", value)
        else:
            writer.add_string(f"tokenizer.ggml.{key}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_sentencepiece_gguf_is_refused_by_name(tmp_path):
    path = _vocab_only_gguf(tmp_path / "spm.gguf", model="llama", tokens=["<unk>", "▁a"])
    with pytest.raises(ValueError, match=r"'llama' \(SentencePiece"):
        load_tokenizer(path)


def test_unknown_pre_tokenizer_is_refused_by_name(tmp_path):
    path = _vocab_only_gguf(
        tmp_path / "x.gguf",
        model="gpt2",
        pre="martian",
        tokens=["a", "b", "ab"],
        merges=["a b"],
    )
    with pytest.raises(ValueError, match="unknown GGUF pre-tokenizer 'martian'"):
        load_tokenizer(path)


def test_gguf_without_tokenizer(tmp_path):
    path = _vocab_only_gguf(tmp_path / "empty.gguf")
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        load_tokenizer(path)


def test_corrupt_files(tmp_path, smollm2_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a valid tokenizer\.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(_sentencepiece_style_json())
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="tokenizer_config.json: expected a JSON object"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|nowhere|>"}')
    with pytest.raises(ValueError, match="'<|nowhere|>' is not in the vocabulary"):
        load_tokenizer(tmp_path)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(smollm2_path.read_bytes()[:200_000])
    with pytest.raises(ValueError, match="truncated.gguf: not a readable GGUF"):
        load_tokenizer(truncated)
