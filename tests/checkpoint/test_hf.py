"""Hugging Face directories, as transformers writes them and as herd writes them."""

import json

import pytest
import torch
from transformers import LlamaForCausalLM

import herd
from herd.checkpoint.hf import hf_to_meta_rows, meta_to_hf_rows
from tests.conftest import hf_llama

SCALING = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def _tokens(n=48, vocab=320):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(3))


def test_sharded_safetensors_load(tmp_path):
    ref = hf_llama()
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    model = herd.load_model(tmp_path)
    with torch.no_grad():
        assert (model(_tokens()) - ref(_tokens()).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("style", ["transformers4", "transformers5"])
def test_config_json_of_both_transformers_generations(tmp_path, style):
    ref = hf_llama(rope_scaling=SCALING)
    ref.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    # Rewrite the rope keys the way each major version of transformers writes them.
    for key in ("rope_theta", "rope_scaling", "rope_parameters"):
        raw.pop(key, None)
    if style == "transformers4":
        raw.update(rope_theta=500000.0, rope_scaling=SCALING, torch_dtype="float32")
    else:
        raw.update(rope_parameters={"rope_theta": 500000.0, **SCALING}, dtype="float32")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = herd.load_model(tmp_path).config
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == herd.RopeScaling(32.0, 1.0, 4.0, 16)


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_loads_what_herd_saves(tmp_path, tied):
    config = herd.preset("debug-tied" if tied else "debug").replace(max_seq_len=512)
    model = herd.Transformer(config)
    model.init_weights(seed=7, std=0.1)
    herd.save_model(model, tmp_path / "out", "hf", max_shard_bytes=60_000)
    ref = LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    tokens = _tokens(64, config.vocab_size)
    with torch.no_grad():
        assert (model(tokens) - ref(tokens).logits).abs().max() <= 1e-4


def test_bf16_save_keeps_dtype(tmp_path):
    model = herd.Transformer(herd.preset("debug"))
    herd.save_model(model, tmp_path, "hf", dtype="bf16")
    loaded = herd.load_model(tmp_path)
    assert loaded.tok_embeddings.weight.dtype == torch.bfloat16
    assert torch.equal(
        loaded.layers["1"].attention.wk.weight, model.layers["1"].attention.wk.weight.bfloat16()
    )
    assert herd.load_model(tmp_path, dtype="f32").norm.weight.dtype == torch.float32


def test_rope_permutation_is_a_bijection_and_matches_rotate_half():
    w = torch.randn(4 * 16, 8)
    assert torch.equal(hf_to_meta_rows(meta_to_hf_rows(w, 4), 4), w)
    # Meta pairs (0,1),(2,3)… become HF's halves: row 2i -> i, row 2i+1 -> i + d/2 per head.
    hf = meta_to_hf_rows(w, 4)
    assert torch.equal(hf[0], w[0]) and torch.equal(hf[8], w[1]) and torch.equal(hf[1], w[2])
