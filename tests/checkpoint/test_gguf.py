"""GGUF: the real SmolLM2 file against transformers; herd's GGUF files against real llama.cpp."""

import numpy as np
import pytest
import torch

import herd
from herd.checkpoint.gguf_file import GGUFReader
from tests.checkpoint.llamacpp import llamacpp_logits
from tests.conftest import hf_llama

PROMPT = [1, 504, 3458, 282, 4649, 314, 2, *range(100, 140), 9690, 314, 253, 1357]


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return herd.load_model(smollm2_path)


def test_smollm2_matches_transformers(smollm2, smollm2_transformers):
    assert smollm2.config.n_layers == 30 and smollm2.config.n_kv_heads == 3
    assert smollm2.config.tie_word_embeddings
    ref = smollm2_transformers
    tokens = torch.tensor([PROMPT])
    with torch.no_grad():
        diff = (smollm2(tokens) - ref(tokens).logits).abs().max().item()
    assert diff <= 1e-3


@pytest.mark.parametrize("qtype,tol", [("f32", 1e-3), ("f16", 0.05)])
def test_llamacpp_loads_herd_gguf(tmp_path, smollm2, smollm2_path, qtype, tol):
    out = tmp_path / f"smollm2-{qtype}.gguf"
    herd.save_model(smollm2, out, "gguf", dtype=qtype, tokenizer_from=smollm2_path)
    theirs = llamacpp_logits(out, PROMPT)
    with torch.no_grad():
        ours = herd.load_model(out, dtype="f32")(torch.tensor([PROMPT]))[0].numpy()
    assert np.abs(ours - theirs).max() <= tol


@pytest.mark.parametrize(
    ("qtype", "types"),
    [
        ("q8_0", {"F32": 61, "Q8_0": 211}),
        # the tied embedding/head stays at 8 bits, like the published Q4_1 file
        ("q4_1", {"F32": 61, "Q4_1": 210, "Q8_0": 1}),
    ],
)
def test_llamacpp_loads_herd_block_quants(tmp_path, smollm2, smollm2_path, qtype, types):
    out = tmp_path / f"smollm2-{qtype}.gguf"
    herd.save_model(smollm2, out, "gguf", dtype=qtype, tokenizer_from=smollm2_path)
    assert GGUFReader(out).stored_types() == types
    theirs = llamacpp_logits(out, PROMPT)
    with torch.no_grad():
        ours = herd.load_model(out)(torch.tensor([PROMPT]))[0].numpy()
    # llama.cpp also rounds activations to 8 bits in its block matmuls: agreement is statistical.
    corr = np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]
    assert corr > 0.995
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.8


def test_llamacpp_applies_herd_rope_scaling(tmp_path, smollm2_path):
    """A random model with Llama 3.1 scaling: llama.cpp reads the rope_freqs tensor herd writes."""
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    ref = hf_llama(n_kv_heads=2, rope_scaling=scaling, vocab_size=49152, seed=5)
    ref.save_pretrained(tmp_path / "hf")
    model = herd.load_model(tmp_path / "hf")
    out = tmp_path / "scaled.gguf"
    herd.save_model(model, out, "gguf", dtype="f32", tokenizer_from=smollm2_path)
    assert herd.load_model(out).config.rope_scaling == model.config.rope_scaling
    theirs = llamacpp_logits(out, PROMPT)
    with torch.no_grad():
        ours = model(torch.tensor([PROMPT]))[0].numpy()
        hf = ref(torch.tensor([PROMPT])).logits[0].numpy()
    assert np.abs(ours - hf).max() <= 1e-4
    assert np.abs(ours - theirs).max() <= 1e-3


def test_transformers_reads_herd_gguf(tmp_path):
    from transformers import AutoModelForCausalLM

    model = herd.Transformer(herd.preset("debug"))
    model.init_weights(seed=3, std=0.1)
    herd.save_model(model, tmp_path / "m.gguf", "gguf", dtype="f32")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    tokens = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        assert (model(tokens) - ref(tokens).logits).abs().max() <= 1e-4
