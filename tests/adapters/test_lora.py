"""LoRA against PEFT on transformers' Llama: the same A/B give the same logits and gradients,
merging gives PEFT's merge_and_unload weights, and adapters cross between the two formats."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import herd
from herd.adapters import apply_lora, load_lora_state_dict, lora_state_dict, merge_lora
from herd.checkpoint.peft import read_peft_adapter, save_peft_adapter
from herd.config.adapter import LORA_TARGETS, LoraConfig
from tests.conftest import hf_llama

HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = torch.tensor([[5, 17, 200, 3, 99, 41, 7, 8, 250, 1], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]])


@pytest.fixture
def base(tmp_path):
    """A random Llama (GQA) saved by transformers, and herd's reading of it."""
    hf_llama(n_kv_heads=2, n_heads=8).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def peft_model(base_dir, targets=HF_TARGETS, seed=1):
    """PEFT's LoRA (r 4, alpha 8) on transformers' model with random A and B."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    config = PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False
    )
    return get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), config).eval()


def herd_with(base_dir, adapter_dir):
    model = herd.load_model(base_dir).eval()
    lora, adapter = read_peft_adapter(adapter_dir, model.config)
    apply_lora(model, lora)
    load_lora_state_dict(model, adapter)
    return model


def test_a_peft_adapter_gives_peft_logits_and_gradients(base, tmp_path):
    reference = peft_model(base)
    reference.save_pretrained(tmp_path / "peft")
    ours = herd_with(base, tmp_path / "peft")
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        f"{layer}.lora_{ab}" for layer in lora_state_dict(ours) for ab in "AB"
    }
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), reference(TOKENS).logits, rtol=0, atol=1e-5)

    # gradients of A and B, compared in herd's (Meta) layout
    targets = TOKENS.roll(-1, dims=1)
    F.cross_entropy(ours(TOKENS).flatten(0, 1), targets.flatten()).backward()
    loss = F.cross_entropy(reference(TOKENS).logits.flatten(0, 1), targets.flatten())
    loss.backward()
    grads = {}
    for name, p in reference.named_parameters():
        if "lora_" in name:
            key = name.replace(".default", "")
            grads[f"{key.rsplit('.', 1)[0]}.weight"] = p.grad
    from safetensors.torch import save_file

    save = tmp_path / "grads"
    save.mkdir()
    save_file({k: v.contiguous() for k, v in grads.items()}, save / "adapter_model.safetensors")
    (save / "adapter_config.json").write_text((tmp_path / "peft/adapter_config.json").read_text())
    _, theirs = read_peft_adapter(save, ours.config)  # the same renames and row permutes
    for name, layer in ours.named_modules():
        if name in theirs:
            torch.testing.assert_close(layer.lora_A.grad, theirs[name][0], rtol=0, atol=1e-5)
            torch.testing.assert_close(layer.lora_B.grad, theirs[name][1], rtol=0, atol=1e-5)


def test_a_herd_adapter_loads_in_peft_with_the_same_logits(base, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    ours = herd.load_model(base).eval()
    lora = LoraConfig(rank=4, alpha=16, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    apply_lora(ours, lora)
    with torch.no_grad():
        torch.testing.assert_close(  # B starts at zero: the adapted model is the base
            ours(TOKENS), herd.load_model(base).eval()(TOKENS), rtol=0, atol=0
        )
        for layer in herd.adapters.lora.lora_layers(ours).values():
            layer.lora_B.normal_(0, 0.1)
    save_peft_adapter(tmp_path / "ours", lora_state_dict(ours), lora, ours.config)
    reference = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), reference.eval()(TOKENS).logits, rtol=0, atol=1e-5)


def test_merge_equals_peft_merge_and_unload(base, tmp_path):
    reference = peft_model(base, targets=HF_TARGETS + ["lm_head"])
    reference.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    ours = merge_lora(herd_with(base, tmp_path / "peft"))
    assert not any(isinstance(m, herd.adapters.LoRALinear) for m in ours.modules())
    herd.save_model(ours, tmp_path / "merged", format="hf")
    from safetensors.torch import load_file

    merged = load_file(tmp_path / "merged" / "model.safetensors")
    expected = reference.merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6, msg=key)


def test_bad_adapters_are_refused_with_a_reason(base, tmp_path):
    with pytest.raises(ValueError, match="LoRA targets \\['q_proj'\\]: choose from wq"):
        LoraConfig(targets=("q_proj",))
    with pytest.raises(ValueError, match="rank must be at least 1"):
        LoraConfig(rank=0)
    assert LORA_TARGETS[-1] == "output"
    tied_dir = tmp_path / "tied"
    hf_llama(tied=True).save_pretrained(tied_dir)
    with pytest.raises(ValueError, match="tied"):
        apply_lora(herd.load_model(tied_dir), LoraConfig(targets=("output",)))

    # an adapter made for a model of another shape
    peft_model(base).save_pretrained(tmp_path / "peft")
    hf_llama(n_kv_heads=4).save_pretrained(tmp_path / "narrow")  # wider wk, wv
    with pytest.raises(ValueError, match="another base model"):
        herd_with(tmp_path / "narrow", tmp_path / "peft")
    with pytest.raises(herd.CheckpointError, match="not a PEFT adapter"):
        read_peft_adapter(tmp_path, herd.preset("debug"))


def test_llama_load_folds_an_adapter_in_before_quantizing(tmp_path):
    """`Llama.load(..., adapter=)` gives PEFT's logits; with int8 on top, the quantized model is
    the merged one's (closer to PEFT than the quantized base is)."""
    from herd.infer import Llama
    from herd.tokenizer import save_tokenizer

    hf_llama(vocab_size=49152).save_pretrained(tmp_path / "base")
    save_tokenizer(herd.load_tokenizer("smollm2"), tmp_path / "base")
    reference = peft_model(tmp_path / "base")
    reference.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = reference(TOKENS).logits
        llama = Llama.load(tmp_path / "base", adapter=tmp_path / "adapter")
        torch.testing.assert_close(llama.model(TOKENS), expected, rtol=0, atol=1e-5)
        assert not any(isinstance(m, herd.adapters.LoRALinear) for m in llama.model.modules())
        quantized = Llama.load(tmp_path / "base", adapter=tmp_path / "adapter", quantize="int8")
        plain = Llama.load(tmp_path / "base", quantize="int8")
        gap = (quantized.model(TOKENS) - expected).abs().max()
        assert gap < (plain.model(TOKENS) - expected).abs().max()


def test_cli_chat_names_an_adapter_that_does_not_fit(base, tmp_path):
    from typer.testing import CliRunner

    from herd.cli.main import app

    peft_model(base).save_pretrained(tmp_path / "peft")
    hf_llama(n_kv_heads=4).save_pretrained(tmp_path / "other")
    args = ["chat", "-m", str(tmp_path / "other"), "--adapter", str(tmp_path / "peft")]
    result = CliRunner().invoke(app, [*args, "--message", "hi"])
    assert result.exit_code == 1 and "another base model" in " ".join(result.output.split())
