"""Shared fixtures: tiny random Llama models written by transformers, the real SmolLM2 GGUF."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from herd.tokenizer import Tokenizer

# Under pytest-xdist (`make test` runs two workers) the cores are shared among the workers.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))


def hf_llama(
    n_kv_heads: int = 2,
    tied: bool = False,
    rope_scaling: dict | None = None,
    n_heads: int = 8,
    vocab_size: int = 320,
    seed: int = 0,
    **overrides,
):
    """A randomly initialised transformers LlamaForCausalLM (float32), the independent reference."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        vocab_size=vocab_size,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        rope_theta=500000.0,
        rope_scaling=rope_scaling,
        **overrides,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger than the default init so that every weight matters
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    model = hf_llama()
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from herd.config.embedded import embedded_path

    return embedded_path("smollm2")


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_path):
    """transformers' own reading of the SmolLM2 GGUF (its dequantisation, its model), float32:
    loaded once, the reference of several test files."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="session")
def smollm2_transformers_tokenizer(smollm2_path):
    """transformers' tokenizer read from the SmolLM2 GGUF, loaded once."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)


@pytest.fixture(scope="session")
def llama3_base(tmp_path_factory) -> Path:
    """A random 2-layer model with Llama 3's 128,256-id vocabulary (std 0.02, so that SFT
    losses start near ln 128256), written by transformers; its tokenizer is "llama3"."""
    path = tmp_path_factory.mktemp("llama3-base")
    model = hf_llama(vocab_size=128256)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    model.save_pretrained(path)
    return path


class IdsTokenizer(Tokenizer):
    """Token ids as text: enough tokenizer for the serving engine (stream decoding, stop ids)
    over a random model's vocabulary."""

    def __init__(self, vocab_size: int = 320):
        self.vocab_size, self.bos_id, self.eos_id, self.byte_level = vocab_size, None, None, False
        self.stop_ids, self.special_tokens, self.chat_template = frozenset(), {}, None

    def _encode(self, text, special):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return "".join(f" {i}" for i in ids)
