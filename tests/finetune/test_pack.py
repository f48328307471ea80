"""SFT packing: a packed row's loss is the sum of its dialogs' losses computed apart, every
trained token is a target exactly once, long dialogs are cut or dropped and counted, and the
loader shards rows over ranks and resumes exactly."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import herd
from herd.finetune.data import encode_for_training
from herd.finetune.pack import IGNORE, SFTLoader, pack_dialogs
from herd.model.masks import document_causal_mask
from herd.tokenizer import chat_format, llama3


def dialog(i: int) -> list[dict]:
    turns = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
    for t in range(1 + i % 3):
        turns += [
            {
                "role": "user",
                "content": f"Question {i}.{t}: what is {i} plus {t}?" + " ok" * (i % 5),
            },
            {"role": "assistant", "content": f"{i} plus {t} is {i + t}." + " Indeed." * (i % 4)},
        ]
    return turns


@pytest.fixture(scope="module")
def encoded():
    fmt = chat_format(llama3())
    return [encode_for_training(fmt, dialog(i)) for i in range(24)]


def test_a_packed_row_loses_what_its_dialogs_lose_apart(encoded):
    torch.manual_seed(0)
    config = herd.ModelConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, ffn_hidden_dim=128
    )
    model = herd.Transformer(config).eval()
    rows = pack_dialogs(encoded[:8], seq_len=256, pad_id=0)
    assert rows.stats.dialogs == 8 and len(rows.tokens) < 8  # several dialogs share a row
    with torch.no_grad():
        tokens, targets = torch.from_numpy(rows.tokens), torch.from_numpy(rows.targets)
        mask = document_causal_mask(torch.from_numpy(rows.doc_ids))
        logits = model(tokens, torch.from_numpy(rows.positions), mask)
        packed = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
        apart = 0.0
        for d in encoded[:8]:
            ids = torch.tensor(d.ids)
            wanted = torch.where(torch.tensor(d.mask[1:]), ids[1:], IGNORE)
            alone = model(ids[None, :-1])[0]
            apart += F.cross_entropy(alone, wanted, reduction="sum").item()
    assert packed.item() == pytest.approx(apart, rel=1e-5)


def test_every_trained_token_is_a_target_once_and_overflow_is_counted(encoded):
    expected = Counter(t for d in encoded for t, m in zip(d.ids[1:], d.mask[1:]) if m)
    pad = 128255  # a reserved special token no dialog holds
    rows = pack_dialogs(encoded, seq_len=128, pad_id=pad)
    assert Counter(rows.targets[rows.targets != IGNORE].tolist()) == expected
    assert rows.stats.trained_tokens == sum(expected.values())
    assert rows.stats.padding == (rows.tokens.size - sum(len(d.ids) - 1 for d in encoded))
    # the padding is the last document of its row and trains nothing
    padding = rows.tokens == pad
    assert padding.sum() == rows.stats.padding and (rows.targets[padding] == IGNORE).all()
    last_doc = rows.doc_ids == rows.doc_ids.max(axis=1, keepdims=True)
    assert (last_doc | ~padding).all()
    longest = max(len(d.ids) for d in encoded)
    short = longest - 10
    cut = pack_dialogs(encoded, seq_len=short, pad_id=0, overflow="truncate")
    dropped = pack_dialogs(encoded, seq_len=short, pad_id=0, overflow="drop")
    too_long = sum(len(d.ids) - 1 > short for d in encoded)
    assert too_long > 0
    assert cut.stats.truncated == too_long and cut.stats.dialogs == len(encoded)
    assert dropped.stats.dropped == too_long and dropped.stats.dialogs == len(encoded) - too_long
    with pytest.raises(ValueError, match="overflow 'wrap'"):
        pack_dialogs(encoded, seq_len=128, pad_id=0, overflow="wrap")


def test_loader_partitions_rows_over_ranks_and_resumes(encoded):
    rows = pack_dialogs(encoded, seq_len=96, pad_id=0)
    single = SFTLoader(rows, batch_size=2, seed=3)
    ranks = [SFTLoader(rows, batch_size=1, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in range(single.batches_per_epoch):
        whole = single.batch(0, step).tokens
        assert all(torch.equal(whole[r], ranks[r].batch(0, step).tokens[0]) for r in range(2))
    seen = Counter(
        tuple(row.tolist())
        for s in range(single.batches_per_epoch)
        for row in single.batch(1, s).tokens
    )
    assert max(seen.values()) == 1  # no row twice in an epoch
    it = iter(SFTLoader(rows, batch_size=2, seed=3))
    taken = [next(it) for _ in range(3 * single.batches_per_epoch)]
    resumed = SFTLoader(rows, batch_size=2, seed=3)
    first = SFTLoader(rows, batch_size=2, seed=3)
    it = iter(first)
    for _ in range(5):
        next(it)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    rest = iter(resumed)
    assert all(torch.equal(next(rest).targets, t.targets) for t in taken[5:])
