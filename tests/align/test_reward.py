"""Reward models: a packed row's rewards equal each response scored alone; the exported
LlamaForSequenceClassification gives transformers the same rewards and TRL's RewardTrainer
the same loss; the three-way ranking loss against a hand computation; training raises the
held-out pair accuracy of a learnable preference."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from herd.align.data import Preference, encode_group, in_order, pack_groups, read_preferences
from herd.align.reward import (
    RewardModel,
    RewardTrainer,
    batch_rewards,
    load_reward_model,
    ranking_loss,
    save_reward_model,
    score_responses,
)
from herd.checkpoint import load_model
from herd.config.align import reward_from_dict
from herd.tokenizer import load_tokenizer
from herd.tokenizer.chat import chat_format
from tests.align.conftest import write_preferences


@pytest.fixture(scope="module")
def reward_model(llama3_pair) -> RewardModel:
    model = RewardModel(load_model(llama3_pair[0], dtype=torch.float32))
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    return model.eval()


def alone(model: RewardModel, prompt: list[int], response: list[int]) -> float:
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        return float(model(ids)[0, -1])


def test_packed_rows_equal_each_response_alone(reward_model, preference_records):
    """Several prompts (one with three responses) packed into two rows: every reward equals
    the response scored after its prompt alone."""
    fmt = chat_format(load_tokenizer("llama3"))
    prefs = [
        Preference(tuple(r["prompt"]), (r.get("edited") or r["chosen"], r["chosen"], r["rejected"]))
        if r.get("edited")
        else Preference(tuple(r["prompt"]), (r["chosen"], r["rejected"]))
        for r in preference_records
    ]
    groups = [encode_group(fmt, p, mask_formatting=False) for p in prefs]
    rows = pack_groups(groups, 160, 0, seed=5)
    assert rows.stats.rows >= 2 and rows.stats.groups == len(groups)
    assert (rows.groups.max(axis=1) >= 2).all()  # several prompts share each row
    got = torch.full((len(rows.response_rank),), float("nan"))
    with torch.no_grad():
        for batch in in_order(rows, 2):
            got[batch.ids] = batch_rewards(reward_model, batch)
    for rid in range(len(got)):
        g = groups[rows.response_group[rid]]
        k = len(g.responses) - 1 - rows.response_rank[rid]
        assert abs(float(got[rid]) - alone(reward_model, g.prompt, g.responses[k])) < 1e-5


def test_three_way_ranking_loss_by_hand():
    rewards = torch.tensor([0.3, 1.2, -0.4, 2.0, 0.1])
    groups = torch.tensor([0, 0, 0, 1, 1])
    ranks = torch.tensor([2, 1, 0, 1, 0])  # edited > chosen > rejected; then a plain pair
    loss, pairs, correct = ranking_loss(rewards, groups, ranks)

    def nls(x):
        return math.log1p(math.exp(-x))

    hand = [nls(0.3 - 1.2), nls(0.3 + 0.4), nls(1.2 + 0.4), nls(2.0 - 0.1)]
    assert pairs == 4 and correct == 3
    assert abs(loss.item() - sum(hand) / 4) < 1e-6


def test_export_matches_transformers_and_trl_loss(reward_model, preference_records, tmp_path):
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer("llama3")
    save_reward_model(reward_model, tmp_path / "rm", tokenizer)
    theirs = AutoModelForSequenceClassification.from_pretrained(
        str(tmp_path / "rm"), dtype=torch.float32
    ).eval()
    back = load_reward_model(tmp_path / "rm")
    fmt = chat_format(tokenizer)
    groups = [
        encode_group(fmt, Preference(tuple(r["prompt"]), (r["chosen"], r["rejected"])), False)
        for r in preference_records
    ]
    sequences = [g.prompt + g.responses[k] for k in (0, 1) for g in groups]  # chosen, rejected
    width = max(map(len, sequences))
    pad = tokenizer.eos_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    with torch.no_grad():
        hf_rewards = theirs(input_ids=ids, attention_mask=attention).logits.squeeze(-1)
    ours = torch.tensor(
        [
            score_responses(back, tokenizer, r["prompt"], [r["chosen"], r["rejected"]])
            for r in preference_records
        ]
    )
    torch.testing.assert_close(ours.T.reshape(-1), hf_rewards, rtol=1e-5, atol=1e-5)

    trainer = trl_trainer(theirs, tmp_path)
    trl_loss = trl_reward_loss(theirs, ids, attention, tmp_path, trainer)
    rows = pack_groups(groups, 512, pad)
    (batch,) = in_order(rows, len(rows.tokens))
    with torch.no_grad():
        packed = batch_rewards(back, batch)
        loss, pairs, _ = ranking_loss(packed, batch.group_of, batch.rank)
    assert pairs == len(groups)
    # their model's rewards agree with ours within 1e-5, so the losses do too
    assert abs(loss.item() - trl_loss) < 1e-5

    # on identical rewards (ours, laid out as TRL's chosen rows then rejected rows) the
    # losses are equal
    trl_order = torch.empty_like(packed)
    trl_order[(1 - batch.rank) * len(groups) + batch.group_of] = packed

    class Rewards(torch.nn.Module):
        def forward(self, **inputs):
            return SimpleNamespace(logits=trl_order.reshape(-1, 1))

    identical = trl_reward_loss(Rewards(), ids, attention, tmp_path, trainer)
    assert abs(loss.item() - identical) < 1e-6 * max(1.0, abs(identical))


def trl_trainer(model, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig
    from trl import RewardTrainer as TRLRewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "rm"))
    args = RewardConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False)
    data = Dataset.from_dict({"chosen": ["a b"], "rejected": ["c d"]})
    return TRLRewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)


def trl_reward_loss(model, ids, attention, tmp_path, trainer) -> float:
    """TRL's RewardTrainer.compute_loss (no margin) on a batch of [chosen..., rejected...]."""
    # TRL sets the model's pad id to its tokenizer's; rows are padded with that one
    ids = ids.masked_fill(attention == 0, trainer.model.config.pad_token_id)
    with torch.no_grad():
        return float(trainer.compute_loss(model, {"input_ids": ids, "attention_mask": attention}))


def test_training_learns_a_preference(llama3_pair, tmp_path):
    """Answers that state the unit are preferred over bare numbers: after training, held-out
    pairs are ranked right more often than at the start."""
    from herd.finetune.tasks import unit_conversions

    items = unit_conversions(48, seed=7)
    records = [
        {"prompt": list(i.prompt), "chosen": i.answer, "rejected": i.answer.split()[0]}
        for i in items
    ]
    train = write_preferences(tmp_path / "train.jsonl", records[:40])
    valid = write_preferences(tmp_path / "valid.jsonl", records[40:])
    raw = {
        "finetune": {"base": str(llama3_pair[0]), "method": "full"},
        "data": {"sources": [str(train)], "valid": [str(valid)]},
        "batch": {"seq_len": 192, "batch_size": 2, "micro_batch_size": 2},
        "optim": {"steps": 12, "lr": 3e-3, "warmup_steps": 0, "schedule": "constant"},
        "run": {"dir": str(tmp_path / "run"), "precision": "fp32", "threads": 2},
    }
    trainer = RewardTrainer(reward_from_dict(raw))
    before = trainer.pair_accuracy()
    records_seen = []
    trainer.fit(lambda step, r: records_seen.append(r))
    after = trainer.pair_accuracy()
    assert "pair_accuracy" in records_seen[-1]
    assert after >= 0.99 > before
    trainer.export(tmp_path / "rm")
    back = load_reward_model(tmp_path / "rm")
    pref = read_preferences(valid)[0]
    chosen, rejected = score_responses(back, trainer.tokenizer, list(pref.prompt), pref.responses)
    assert chosen > rejected
