"""The optimizer recipe: which parameters decay, and the schedule against its formula."""

from __future__ import annotations

import math

import pytest

import herd
from herd.train import build_optimizer, lr_at, param_groups


def test_norms_and_embeddings_are_not_decayed():
    model = herd.Transformer(herd.preset("debug"))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert undecayed == {n for n in names.values() if "norm" in n or "tok_embeddings" in n}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "output.weight" in decayed and "layers.0.attention.wq.weight" in decayed
    assert len(decayed) + len(undecayed) == len(names)
    optimizer = build_optimizer(model, lr=1e-3)
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_schedule_matches_the_paper_recipe():
    peak, warmup, total, floor = 8e-5, 8000, 1_200_000, 8e-7
    assert lr_at(0, peak, warmup, total, floor) == pytest.approx(peak / warmup)
    assert lr_at(warmup - 1, peak, warmup, total, floor) == pytest.approx(peak)
    assert lr_at(warmup, peak, warmup, total, floor) == pytest.approx(peak)
    middle = warmup + (total - warmup) // 2
    assert lr_at(middle, peak, warmup, total, floor) == pytest.approx((peak + floor) / 2)
    assert lr_at(total, peak, warmup, total, floor) == pytest.approx(floor)
    assert lr_at(2 * total, peak, warmup, total, floor) == pytest.approx(floor)
    quarter = warmup + (total - warmup) // 4
    expected = floor + (peak - floor) * (1 + math.cos(math.pi / 4)) / 2
    assert lr_at(quarter, peak, warmup, total, floor) == pytest.approx(expected, rel=1e-6)
