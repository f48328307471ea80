"""Format round trips are bit-exact; Meta shards merge along the right dimensions."""

import json

import pytest
import torch
from safetensors.torch import load_file

import herd
from herd.checkpoint.meta import split_dim
from tests.conftest import hf_llama

SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize("tied,scaling", [(False, None), (True, SCALING)])
def test_hf_meta_gguf_hf_is_bit_exact(tmp_path, tied, scaling):
    hf_llama(tied=tied, rope_scaling=scaling).save_pretrained(tmp_path / "a")
    original = load_file(tmp_path / "a" / "model.safetensors")

    herd.save_model(herd.load_model(tmp_path / "a"), tmp_path / "meta", "meta")
    herd.save_model(herd.load_model(tmp_path / "meta"), tmp_path / "m.gguf", "gguf", dtype="f32")
    final = herd.load_model(tmp_path / "m.gguf")
    herd.save_model(final, tmp_path / "b", "hf")

    again = load_file(tmp_path / "b" / "model.safetensors")
    assert again.keys() == original.keys() - ({"lm_head.weight"} if tied else set())
    for name, tensor in again.items():
        assert torch.equal(tensor, original[name]), name
    # The config survives too (the ffn sizing rule is the only thing stated differently).
    rule = {"ffn_dim_multiplier": None, "multiple_of": 256}
    first = herd.checkpoint.describe(tmp_path / "a").config.replace(**rule)
    for step in (tmp_path / "meta", tmp_path / "m.gguf", tmp_path / "b"):
        assert herd.checkpoint.describe(step).config.replace(**rule) == first, step


def _split_by_hand(state, n):
    """Independent re-statement of fairscale's sharding: column-parallel weights and the
    vocab-parallel embedding split rows, row-parallel wo/w2 split columns, norms replicate."""
    shards = [{} for _ in range(n)]
    for name, t in state.items():
        if name.endswith(("wo.weight", "w2.weight")):
            parts = t.chunk(n, dim=1)
        elif t.dim() == 2:
            parts = t.chunk(n, dim=0)
        else:
            parts = [t] * n
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    return shards


def test_two_meta_shards_load_like_one(tmp_path):
    model = herd.Transformer(herd.preset("debug"))
    herd.save_model(model, tmp_path / "one", "meta")
    params = (tmp_path / "one" / "params.json").read_text()
    whole = torch.load(tmp_path / "one" / "consolidated.00.pth", weights_only=True)
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "params.json").write_text(params)
    for rank, shard in enumerate(_split_by_hand(whole, 2)):
        torch.save(shard, tmp_path / "two" / f"consolidated.{rank:02d}.pth")

    one, two = herd.load_model(tmp_path / "one"), herd.load_model(tmp_path / "two")
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        assert torch.equal(a, b), name
    # and herd's own sharded writer produces the same files as the hand split
    herd.save_model(model, tmp_path / "herd2", "meta", num_shards=2)
    for rank, shard in enumerate(_split_by_hand(whole, 2)):
        ours = torch.load(tmp_path / "herd2" / f"consolidated.{rank:02d}.pth", weights_only=True)
        assert ours.keys() == shard.keys()
        assert all(torch.equal(ours[k], shard[k]) for k in shard)


def test_meta_params_json_is_what_llama_models_reads(tmp_path):
    from llama_models.llama3.args import ModelArgs

    herd.save_model(herd.Transformer(herd.preset("debug")), tmp_path, "meta")
    args = ModelArgs(**json.loads((tmp_path / "params.json").read_text()))
    config = herd.preset("debug")
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.vocab_size) == (
        config.dim,
        config.n_layers,
        config.n_heads,
        config.n_kv_heads,
        config.vocab_size,
    )
    # llama-models' FeedForward sizing rule must land on the same hidden size
    hidden = int(2 * 4 * args.dim / 3)
    if args.ffn_dim_multiplier is not None:
        hidden = int(args.ffn_dim_multiplier * hidden)
    hidden = args.multiple_of * ((hidden + args.multiple_of - 1) // args.multiple_of)
    assert hidden == config.ffn_hidden_dim


def test_meta_llama32_params_without_factor_get_factor_32(tmp_path):
    params = {
        "dim": 2048,
        "n_layers": 16,
        "n_heads": 32,
        "n_kv_heads": 8,
        "vocab_size": 128256,
        "ffn_dim_multiplier": 1.5,
        "multiple_of": 256,
        "norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
    }
    from herd.checkpoint.meta import config_from_params

    assert config_from_params(params, tmp_path).rope_scaling.factor == 32
    params.update(dim=4096, n_layers=32, ffn_dim_multiplier=1.3, multiple_of=1024)
    assert config_from_params(params, tmp_path).rope_scaling.factor == 8


def test_split_dims():
    assert split_dim("layers.3.attention.wq.weight") == 0
    assert split_dim("layers.3.feed_forward.w2.weight") == 1
    assert split_dim("layers.3.ffn_norm.weight") is None


@pytest.mark.parametrize("fmt,dst", [("hf", "hf"), ("meta", "meta"), ("gguf", "m.gguf")])
def test_loaded_weights_are_writable_and_never_write_back(tmp_path, fmt, dst):
    """Loading memory-maps the files; training must be able to update parameters in place
    without touching the checkpoint on disk."""
    herd.save_model(herd.Transformer(herd.preset("debug")), tmp_path / dst, fmt, dtype="f32")
    model = herd.load_model(tmp_path / dst)
    before = model.layers["0"].feed_forward.w1.weight.clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert torch.equal(model.layers["0"].feed_forward.w1.weight, before + 1.0)
    assert torch.equal(herd.load_model(tmp_path / dst).layers["0"].feed_forward.w1.weight, before)
