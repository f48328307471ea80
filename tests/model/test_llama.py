"""herd's Transformer against transformers' LlamaForCausalLM on the same random weights."""

import math

import pytest
import torch

import herd
from herd.config import preset
from herd.model import Transformer
from tests.conftest import hf_llama

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


@pytest.mark.parametrize(
    "n_kv_heads,tied,scaling",
    [
        (8, False, None),  # GQA ratio 1 (plain multi-head)
        (2, True, None),  # ratio 4, tied embeddings
        (1, False, LLAMA3_SCALING),  # ratio 8, Llama 3.1 scaling
        (2, False, LLAMA3_SCALING),
        (1, True, LLAMA3_SCALING),
    ],
)
def test_logits_match_transformers(tmp_path, n_kv_heads, tied, scaling):
    ref = hf_llama(n_kv_heads=n_kv_heads, tied=tied, rope_scaling=scaling)
    ref.save_pretrained(tmp_path)
    model = herd.load_model(tmp_path)
    assert model.config.tie_word_embeddings == tied
    assert (model.config.rope_scaling is not None) == (scaling is not None)
    tokens = torch.randint(0, 320, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), ref(tokens).logits
    assert ours.shape == (2, 64, 320)
    assert (ours - theirs).abs().max().item() <= 1e-4
    if scaling is not None:
        # The check has teeth: without scaling the logits differ well beyond the tolerance.
        model.config.rope_scaling = None
        with torch.no_grad():
            assert (model(tokens) - theirs).abs().max().item() > 1e-3


def test_parameter_names_follow_meta_checkpoint():
    names = set(Transformer(preset("debug")).state_dict())
    layer = {
        "attention.wq",
        "attention.wk",
        "attention.wv",
        "attention.wo",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
        "attention_norm",
        "ffn_norm",
    }
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"} | {
        f"layers.{i}.{n}.weight" for i in range(2) for n in layer
    }
    assert names == expected
    tied = set(Transformer(preset("debug-tied")).state_dict())
    assert tied == expected - {"output.weight"}


def test_init_is_deterministic_and_depth_scaled():
    config = preset("debug").replace(dim=256, n_heads=4, n_kv_heads=4, n_layers=8)
    a, b = Transformer(config), Transformer(config)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    b.init_weights(seed=1)
    assert not torch.equal(a.layers["0"].attention.wq.weight, b.layers["0"].attention.wq.weight)
    wq, wo = a.layers["3"].attention.wq.weight, a.layers["3"].attention.wo.weight
    assert wq.std().item() == pytest.approx(0.02 * 0.986, rel=0.03)  # truncation at 3 sigma
    assert wo.std().item() == pytest.approx(0.02 * 0.986 / math.sqrt(16), rel=0.03)
    assert wq.abs().max().item() <= 3 * 0.02
    assert torch.equal(a.norm.weight, torch.ones(256))


def test_explicit_mask_and_positions_match_defaults():
    model = Transformer(preset("debug"))
    tokens = torch.randint(0, 256, (2, 16))
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    with torch.no_grad():
        base = model(tokens)
        assert torch.allclose(model(tokens, mask=causal), base, atol=1e-6)
        assert torch.allclose(
            model(tokens, positions=torch.arange(16).expand(2, 16)), base, atol=1e-6
        )
        # Shifting every position changes only absolute angles: RoPE attention is relative.
        assert torch.allclose(model(tokens, positions=torch.arange(16) + 5), base, atol=1e-4)


def test_block_mask_matches_sdpa_mask():
    from torch.nn.attention.flex_attention import create_block_mask

    model = Transformer(preset("debug"))
    tokens = torch.randint(0, 256, (1, 128))
    doc = torch.arange(128) // 40  # three packed documents

    def document_causal(b, h, q, k):
        return (q >= k) & (doc[q] == doc[k])

    block = create_block_mask(document_causal, None, None, 128, 128, device="cpu")
    dense = (torch.arange(128)[:, None] >= torch.arange(128)) & (doc[:, None] == doc)
    with torch.no_grad():
        assert torch.allclose(model(tokens, mask=block), model(tokens, mask=dense), atol=1e-5)


def test_tokens_must_be_2d():
    with pytest.raises(ValueError, match="batch, seq"):
        Transformer(preset("debug"))(torch.tensor([1, 2, 3]))
