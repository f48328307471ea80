"""LoRA adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors` with
PEFT's key names for transformers' `LlamaForCausalLM`, which PEFT, transformers and vLLM load.

herd holds adapters under Meta names with Meta's rotary layout. HF's q_proj/k_proj rows are
permuted within each head relative to Meta's wq/wk, so ΔW_hf = P ΔW_meta = (P B) A: converting
permutes the rows of B for wq and wk and leaves A alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from herd.checkpoint.base import CheckpointError
from herd.checkpoint.hf import NAMES, hf_to_meta_rows, meta_to_hf_rows, permuted_heads
from herd.config import ModelConfig
from herd.config.adapter import LoraConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."

Adapter = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _hf_module(meta_layer: str) -> str:
    hf = NAMES.to_other(f"{meta_layer}.weight")
    if hf is None:
        raise ValueError(f"{meta_layer}: not a layer LoRA can adapt")
    return hf.removesuffix(".weight")


def save_peft_adapter(
    out: str | Path,
    adapter: Adapter,
    lora: LoraConfig,
    config: ModelConfig,
    base_model: str | None = None,
) -> list[Path]:
    """Write `adapter` ({Meta layer name: (A, B)}) as a PEFT LoRA directory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer, (a, b) in adapter.items():
        heads = permuted_heads(f"{layer}.weight", config)
        if heads is not None:
            b = meta_to_hf_rows(b, heads)
        key = PREFIX + _hf_module(layer)
        tensors[f"{key}.lora_A.weight"] = a.contiguous()
        tensors[f"{key}.lora_B.weight"] = b.contiguous()
    save_file(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        # PEFT names a target by the last part of its module name
        "target_modules": sorted({_hf_module(layer).rpartition(".")[2] for layer in adapter}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    (out / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
    return [out / WEIGHTS_FILE, out / CONFIG_FILE]


def read_peft_adapter(path: str | Path, config: ModelConfig) -> tuple[LoraConfig, Adapter]:
    """A PEFT LoRA directory as (its settings, {Meta layer name: (A, B)}) for a base model of
    shape `config`. Raises CheckpointError for what herd cannot apply."""
    path = Path(path)
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    for needed in (config_file, weights_file):
        if not needed.is_file():
            raise CheckpointError(f"{path}: not a PEFT adapter (no {needed.name})")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{config_file}: peft_type is {raw.get('peft_type')!r}, not LORA")
    for flag in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if raw.get(flag):
            raise CheckpointError(f"{config_file}: {flag} adapters are not supported")
    if raw.get("bias", "none") != "none" or raw.get("modules_to_save"):
        raise CheckpointError(f"{config_file}: only LoRA weights (bias 'none') are supported")
    if raw.get("rank_pattern") or raw.get("alpha_pattern"):
        raise CheckpointError(f"{config_file}: per-layer ranks or alphas are not supported")
    try:
        tensors = load_file(weights_file)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights_file}: not a readable safetensors file ({e})") from None
    adapter: dict[str, list[torch.Tensor | None]] = {}
    for key, value in tensors.items():
        if key.endswith(".base_layer.weight"):
            raise CheckpointError(
                f"{weights_file}: {key!r} is a whole weight, not a LoRA one (PEFT saves the "
                "head or embedding itself when it is a target; save with "
                "save_embedding_layers=False for an adapter of an unchanged vocabulary)"
            )
        module, _, part = key.removeprefix(PREFIX).rpartition(".lora_")
        meta = NAMES.to_meta(f"{module}.weight")
        if meta is None or part not in ("A.weight", "B.weight"):
            raise CheckpointError(f"{weights_file}: tensor {key!r} is not a Llama LoRA weight")
        adapter.setdefault(meta.removesuffix(".weight"), [None, None])[part[0] == "B"] = value
    result: Adapter = {}
    for layer, (a, b) in adapter.items():
        if a is None or b is None:
            raise CheckpointError(f"{weights_file}: {layer} has only one of lora_A / lora_B")
        heads = permuted_heads(f"{layer}.weight", config)
        result[layer] = (a, hf_to_meta_rows(b, heads) if heads is not None else b)
    targets = sorted({layer.rpartition(".")[2] for layer in result})
    rank = raw.get("r", 8)
    lora = LoraConfig(
        rank=rank,
        alpha=raw.get("lora_alpha", rank),
        dropout=raw.get("lora_dropout", 0.0),
        targets=tuple(targets),
    )
    return lora, result
