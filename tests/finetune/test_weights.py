"""`herd average` against a float64 hand computation over checkpoints in three formats, and
`herd merge` against PEFT's merge_and_unload, through the CLI."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import herd
from herd.cli.main import app
from herd.finetune import average_models
from tests.adapters.test_lora import TOKENS, peft_model
from tests.conftest import hf_llama


@pytest.fixture
def three(tmp_path):
    """Three random models of one architecture, as HF, Meta and GGUF f32 checkpoints."""
    paths = [tmp_path / "a", tmp_path / "b", tmp_path / "c.gguf"]
    hf_llama(seed=0).save_pretrained(paths[0])
    for seed, path, fmt in ((1, paths[1], "meta"), (2, paths[2], "gguf")):
        hf_llama(seed=seed).save_pretrained(tmp_path / f"hf{seed}")
        herd.save_model(herd.load_model(tmp_path / f"hf{seed}"), path, fmt, dtype="f32")
    return paths


def test_average_is_the_weighted_mean(three):
    weights = [2.0, 1.0, 1.0]
    averaged = average_models(three, weights).state_dict()
    states = [herd.load_model(p, dtype=torch.float32).state_dict() for p in three]
    for key, value in averaged.items():
        expected = sum(s[key].double() * w / 4.0 for s, w in zip(states, weights)).float()
        assert torch.equal(value, expected), key
    assert not torch.equal(averaged["norm.weight"], states[0]["norm.weight"])


def test_average_refuses_other_architectures_and_bad_weights(three, tmp_path):
    hf_llama(n_kv_heads=4).save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="not the architecture of .*n_kv_heads 2 vs 4"):
        average_models([three[0], tmp_path / "wide"])
    with pytest.raises(ValueError, match="2 weights for 3 checkpoints"):
        average_models(three, [1, 1])
    with pytest.raises(ValueError, match="at least two"):
        average_models(three[:1])
    result = CliRunner().invoke(app, ["average", str(three[0]), str(tmp_path / "out")])
    assert result.exit_code == 1 and "at least two checkpoints" in result.output


def test_cli_average_writes_a_loadable_checkpoint(three, tmp_path):
    out = tmp_path / "soup"
    args = ["average", *map(str, three), str(out), "--weights", "1,1,2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    expected = average_models(three, [1, 1, 2]).state_dict()
    got = herd.load_model(out).state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_cli_merge_matches_peft_merge_and_unload(tmp_path):
    from transformers import LlamaForCausalLM

    hf_llama().save_pretrained(tmp_path / "base")
    reference = peft_model(tmp_path / "base")
    reference.save_pretrained(tmp_path / "adapter")
    result = CliRunner().invoke(
        app, ["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    expected = reference.merge_and_unload().eval()
    with torch.no_grad():
        torch.testing.assert_close(
            merged(TOKENS).logits, expected(TOKENS).logits, atol=1e-5, rtol=0
        )
    again = CliRunner().invoke(
        app, ["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out")]
    )
    assert again.exit_code == 1 and "--force" in again.output
