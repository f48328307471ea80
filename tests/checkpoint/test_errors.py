"""Bad checkpoints fail with an error that names the file and the problem."""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import herd
from herd import CheckpointError


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_missing_tensor(hf_dir):
    state = load_file(hf_dir / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, hf_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensors.*layers\.1\.feed_forward\.w3"):
        herd.load_model(hf_dir)


def test_unexpected_tensor(hf_dir):
    state = load_file(hf_dir / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(state, hf_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensors.*q_proj\.bias"):
        herd.load_model(hf_dir)


def test_shape_mismatch_against_config(hf_dir):
    raw = json.loads((hf_dir / "config.json").read_text())
    raw["intermediate_size"] = 128
    (hf_dir / "config.json").write_text(json.dumps(raw))
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor .*w1.* has shape \(160, 64\).*needs \(128, 64\)",
    ):
        herd.load_model(hf_dir)


def test_truncated_safetensors(hf_dir):
    _truncate(hf_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        herd.load_model(hf_dir)


def test_corrupt_safetensors_header(hf_dir):
    (hf_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        herd.load_model(hf_dir)


def test_missing_shard_in_index(tmp_path):
    from tests.conftest import hf_llama

    hf_llama().save_pretrained(tmp_path, max_shard_size="40KB")
    next(iter(sorted(tmp_path.glob("model-*.safetensors")))).unlink()
    with pytest.raises(CheckpointError, match="model-00001-of-.*missing"):
        herd.load_model(tmp_path)


def test_truncated_meta_shard(tmp_path):
    herd.save_model(herd.Transformer(herd.preset("debug")), tmp_path, "meta")
    _truncate(tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: not a readable PyTorch"):
        herd.load_model(tmp_path)


def plant_marker(marker: str, tensor: torch.Tensor) -> torch.Tensor:
    """Run by a malicious pickle: leaves a file behind, then hands back the real tensor so the
    load would otherwise succeed."""
    Path(marker).write_text("code ran")
    return tensor


class _CodeCarrier:
    def __init__(self, marker: Path, tensor: torch.Tensor):
        self.marker, self.tensor = marker, tensor

    def __reduce__(self):
        return plant_marker, (str(self.marker), self.tensor)


def test_meta_pickle_with_code_is_refused(tmp_path):
    herd.save_model(herd.Transformer(herd.preset("debug")), tmp_path, "meta")
    shard, marker = tmp_path / "consolidated.00.pth", tmp_path / "marker"
    state = torch.load(shard, weights_only=True)
    state["norm.weight"] = _CodeCarrier(marker, state["norm.weight"])
    torch.save(state, shard)
    # The premise: without weights_only this file runs code and loads as a valid checkpoint.
    assert torch.load(shard, weights_only=False)["norm.weight"].shape == (64,)
    assert marker.read_text() == "code ran"
    marker.unlink()
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: not a readable PyTorch"):
        herd.load_model(tmp_path)
    assert not marker.exists()


def test_truncated_gguf(tmp_path):
    herd.save_model(herd.Transformer(herd.preset("debug")), tmp_path / "m.gguf", "gguf")
    _truncate(tmp_path / "m.gguf", keep=0.6)
    with pytest.raises(CheckpointError, match=r"m\.gguf: not a readable GGUF"):
        herd.load_model(tmp_path / "m.gguf")


def _write_gguf(path, arch="llama", qtype=gguf.GGMLQuantizationType.F32):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-5)
    if qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor("token_embd.weight", np.zeros((16, 32), np.float32))
    else:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = np.zeros((16, 256 // block * size), np.uint8)
        writer.add_tensor("token_embd.weight", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unsupported_gguf_architecture(tmp_path):
    _write_gguf(tmp_path / "q.gguf", arch="qwen2")
    with pytest.raises(CheckpointError, match=r"q\.gguf: GGUF architecture is 'qwen2'"):
        herd.load_model(tmp_path / "q.gguf")


def test_unsupported_gguf_quantisation(tmp_path):
    from herd.checkpoint.gguf_file import GGUFReader

    _write_gguf(tmp_path / "k.gguf", qtype=gguf.GGMLQuantizationType.Q8_K)
    with pytest.raises(
        CheckpointError, match=r"k\.gguf: tensor 'token_embd.weight' has GGUF type Q8_K"
    ):
        GGUFReader(tmp_path / "k.gguf").read("tok_embeddings.weight")


def test_unsupported_hf_architecture(hf_dir):
    raw = json.loads((hf_dir / "config.json").read_text())
    raw["model_type"] = "mistral"
    (hf_dir / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type is 'mistral'"):
        herd.load_model(hf_dir)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="expected config.json .*found notes.txt"):
        herd.load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        herd.load_model(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        herd.load_model(tmp_path / "notes.txt")
