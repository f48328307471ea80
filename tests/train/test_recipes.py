"""Recipes: parsing and overrides with clear errors, the published sizes' recipes checked against
the paper on the meta device, FLOPs per token against torch's FLOP counter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import herd
from herd.config.train import ConfigError, apply_overrides, from_dict, load_config
from herd.model import Transformer
from herd.train.flops import flops_per_token, memory_per_device, plan_layout

RECIPES = Path(__file__).parents[2] / "recipes"


def test_overrides_are_read_as_toml_values():
    raw = {"data": {"tokenizer": "t", "train": "d"}, "model": {"preset": "debug"}}
    apply_overrides(
        raw,
        ["optim.lr=1e-3", "run.compile=true", "run.dir=runs/x", "optim.betas=[0.8, 0.9]"],
    )
    config = from_dict(raw)
    assert config.optim.lr == 1e-3 and config.optim.min_lr == pytest.approx(1e-4)
    assert config.run.compile is True and config.run.dir == "runs/x"
    assert config.optim.betas == (0.8, 0.9)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"optim": {"lrr": 1}}, "unknown key.*lrr"),
        ({"optimizer": {}}, "unknown section.*optimizer"),
        ({"batch": {"batch_size": 6, "micro_batch_size": 4}}, "not a multiple"),
        ({"run": {"precision": "fp8"}}, "precision.*choose one of"),
        ({"model": {"dim": 60, "n_heads": 7, "n_layers": 1, "vocab_size": 9}}, "divisible"),
        ({"data": {"train": ""}}, "train is required"),
        ({"batch": {"stages": [{"after_tokens": 0, "batch_size": 8}]}}, "after_tokens"),
    ],
)
def test_bad_recipes_say_what_is_wrong(change, message):
    raw = {"data": {"tokenizer": "t", "train": "d"}, "model": {"preset": "debug"}}
    for section, values in change.items():
        raw.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


def test_tiny_recipe_is_a_10_to_20m_llama():
    config = load_config(RECIPES / "tiny.toml")
    n = config.model_config(vocab_size=4096).num_params()
    assert 10e6 <= n <= 20e6
    # the demo adapts to the CPU: bf16 only where it runs natively
    assert config.data.valid and config.run.precision == "auto"


PAPER = {  # size: (preset, peak LR, parameters in billions)
    "8b": ("llama3.1-8b", 3e-4, 8.03),
    "70b": ("llama3.1-70b", 1.5e-4, 70.6),
    "405b": ("llama3.1-405b", 8e-5, 405.9),
}


@pytest.mark.parametrize("size", PAPER)
def test_published_size_recipes_hold_the_paper_numbers(size):
    config = load_config(RECIPES / f"llama3-{size}.toml")
    name, lr, billions = PAPER[size]
    model = config.model_config()
    assert model == herd.preset(name)
    with torch.device("meta"):  # builds without allocating a byte
        built = Transformer(model)
    assert sum(p.numel() for p in built.parameters()) / 1e9 == pytest.approx(billions, abs=0.05)
    o = config.optim
    assert (o.lr, o.warmup_steps, o.steps, o.betas) == (lr, 8000, 1_200_000, (0.9, 0.95))
    assert o.min_lr == pytest.approx(lr / 100)
    # the ramp: 4M tokens of 4K sequences, 8M of 8K after 252M tokens, 16M after 2.87T
    ramp = [config.stage_at(t)[1:] for t in (0, 252_000_000, 2_870_000_000_000)]
    assert [b * s for b, s in ramp] == [4 * 2**20, 8 * 2**20, 16 * 2**20]
    assert [s for _, s in ramp] == [4096, 8192, 8192]
    # each stage's layout fits an 80 GB GPU by the memory model
    p = config.parallel
    for batch, seq in ramp:
        memory = memory_per_device(
            model, seq, config.batch.micro_batch_size, p.tp, p.pp, p.cp, p.dp_shard
        )
        assert memory.total < 80e9, (size, seq, memory)


def test_405b_recipe_reproduces_the_papers_compute_and_layout():
    config = load_config(RECIPES / "llama3-405b.toml")
    p = config.parallel
    assert (p.tp, p.cp, p.pp, p.dp_shard) == (8, 1, 16, 128)  # 16,384 GPUs, paper Table 4
    # ~3.8e25 FLOPs over 15.6T tokens at 8K context (paper §3)
    total = flops_per_token(config.model_config(), 8192) * 15.6e12
    assert total == pytest.approx(3.8e25, rel=0.1)


@pytest.mark.parametrize(
    "gpus, seq_len, layout",
    [
        (8192, 8192, (8, 1, 16, 64)),  # paper Table 4: (tp, cp, pp, dp)
        (16384, 8192, (8, 1, 16, 128)),
        (16384, 131072, (8, 16, 16, 8)),
    ],
)
def test_the_layout_plan_for_405b_is_the_papers(gpus, seq_len, layout):
    """From the model alone: TP fills the node, CP grows only for long sequences, PP 16 is the
    shallowest pipeline that fits an 80 GB H100 without recomputation, and DP takes the rest."""
    plan = plan_layout(herd.preset("llama3.1-405b"), gpus, seq_len, batch_tokens=16 * 2**20)
    assert (plan.tp, plan.cp, plan.pp, plan.dp) == layout
    assert plan.memory.total <= 80e9


@pytest.mark.parametrize("size", ["8b", "70b", "405b"])
def test_each_recipes_layout_is_the_planners(size):
    """The recipes' [parallel] tables are what plan_layout picks for their GPU count at 8K
    tokens and the final 16M-token batch: FSDP for 8B, TP 8 + FSDP for 70B, the paper's
    TP 8 / PP 16 for 405B."""
    config = load_config(RECIPES / f"llama3-{size}.toml")
    p = config.parallel
    gpus = p.tp * p.cp * p.pp * p.dp_shard * p.dp_replicate
    plan = plan_layout(config.model_config(), gpus, 8192, batch_tokens=16 * 2**20)
    assert (plan.tp, plan.cp, plan.pp, plan.dp) == (p.tp, p.cp, p.pp, p.dp_shard)


def test_a_model_too_big_for_the_gpus_gets_no_layout():
    with pytest.raises(ValueError, match="no layout of 8 GPUs fits"):
        plan_layout(herd.preset("llama3.1-405b"), 8, 8192, batch_tokens=4 * 2**20)


@pytest.mark.parametrize("n_kv_heads, tied", [(4, False), (2, True)])
def test_flops_per_token_matches_torch_flop_counter(n_kv_heads, tied):
    config = herd.preset("debug").replace(n_kv_heads=n_kv_heads, tie_word_embeddings=tied)
    model = Transformer(config)
    tokens = torch.randint(0, config.vocab_size, (2, 64))
    # The math backend runs attention as counted matmuls; the fused CPU kernel is not counted.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens).sum().backward()
    assert counter.get_total_flops() == pytest.approx(
        flops_per_token(config, 64) * tokens.numel(), rel=0.01
    )
