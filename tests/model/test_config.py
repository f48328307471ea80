import pytest
import torch

from herd.config import PRESETS, ModelConfig, preset
from herd.model import Transformer

# Published sizes (Meta model cards / HF safetensors totals).
PUBLISHED = {
    "llama3-8b": 8_030_261_248,
    "llama3.1-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3.1-70b": 70_553_706_496,
    "llama3.1-405b": 405_853_388_800,
    "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
}
ROUNDED = {
    "llama3-8b": 8.03,
    "llama3-70b": 70.55,
    "llama3.1-405b": 405.85,
    "llama3.2-1b": 1.24,
    "llama3.2-3b": 3.21,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_on_meta_device_matches_published(name):
    with torch.device("meta"):
        model = Transformer(preset(name))
    assert model.tok_embeddings.weight.is_meta
    count = sum(p.numel() for p in model.parameters())
    assert count == PUBLISHED[name]
    assert count == preset(name).num_params()
    if name in ROUNDED:
        assert round(count / 1e9, 2) == ROUNDED[name]


@pytest.mark.parametrize(
    "name,ffn",
    [
        ("llama3.2-1b", 8192),
        ("llama3.2-3b", 8192),
        ("llama3.1-8b", 14336),
        ("llama3.1-70b", 28672),
        ("llama3.1-405b", 53248),
    ],
)
def test_ffn_rule_reproduces_spec_table(name, ffn):
    assert preset(name).ffn_hidden_dim == ffn


def test_rope_scaling_per_model():
    assert preset("llama3-8b").rope_scaling is None
    assert preset("llama3.1-8b").rope_scaling.factor == 8
    assert preset("llama3.2-1b").rope_scaling.factor == 32
    assert (
        preset("llama3.2-1b").tie_word_embeddings and not preset("llama3.1-8b").tie_word_embeddings
    )


def test_preset_returns_a_copy_and_unknown_names_are_listed():
    c = preset("debug")
    c.n_layers = 99
    assert PRESETS["debug"].n_layers != 99
    with pytest.raises(KeyError, match="llama3.1-8b"):
        preset("llama-9000")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"dim": 65, "n_heads": 4}, "divisible by n_heads"),
        ({"n_heads": 4, "n_kv_heads": 3}, "multiple of n_kv_heads"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"norm_eps": -1.0}, "norm_eps"),
    ],
)
def test_invalid_configs_are_rejected(kwargs, match):
    base = {"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 10}
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**base, **kwargs})
