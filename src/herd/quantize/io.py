"""Saving and loading quantized models: safetensors tensors plus two JSON files, no pickle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from herd.config import ModelConfig
from herd.model import Transformer
from herd.quantize.core import (
    GROUPED,
    METHODS,
    check_method,
    inner_feed_forwards,
    quantization_targets,
    quantized_modules,
    set_submodule,
)
from herd.quantize.fp8 import ACTIVATION_SCALE_UB, Fp8Linear
from herd.quantize.int4 import DEFAULT_GROUP_SIZE, Int4Linear

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
QUANT_CONFIG_FILE = "quantization_config.json"


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """method, group_size (int4) and activation_scale_ub (fp8) of a quantized model's blocks,
    and head_method, its output head's method."""
    layers = dict(quantized_modules(model))
    head = layers.pop("output", None)
    ffn_only = head is None and set(layers) == set(inner_feed_forwards(model))
    if not layers or (head is None and not ffn_only):
        raise ValueError("the model is not fully quantized; call quantize_model first")
    methods = {m.method for m in layers.values()}
    if len(methods) != 1 or (ffn_only and methods != {"fp8"}):
        raise ValueError(f"mixed quantization methods are not supported: {sorted(methods)}")
    first = next(iter(layers.values()))
    method = "fp8-mixed" if ffn_only else first.method
    config: dict[str, Any] = {"method": method, "group_size": None}
    if isinstance(first, Int4Linear):
        config["group_size"] = first.group_size
    if isinstance(first, Fp8Linear):
        config["activation_scale_ub"] = first.activation_scale_ub
    config["head_method"] = None if head is None else head.method
    return config


def save_quantized(model: Transformer, directory: str | Path) -> list[Path]:
    """Write `model.safetensors`, `config.json` (ModelConfig fields) and
    `quantization_config.json` into `directory`; returns the files written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    qconfig = quantization_config(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    files = [directory / WEIGHTS_FILE, directory / CONFIG_FILE, directory / QUANT_CONFIG_FILE]
    save_file(state, files[0], metadata={"format": "pt", "quantization": qconfig["method"]})
    files[1].write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    files[2].write_text(json.dumps(qconfig, indent=2) + "\n")
    return files


def _quantized_from_state(
    name: str, weight: torch.Tensor, state: dict[str, torch.Tensor], qconfig: dict[str, Any]
) -> nn.Module:
    def tensor(key: str) -> torch.Tensor:
        try:
            return state[f"{name}.{key}"]
        except KeyError:
            raise ValueError(f"quantized checkpoint lacks {name}.{key}") from None

    method = (
        qconfig.get("head_method", qconfig["method"]) if name == "output" else qconfig["method"]
    )
    if method in ("int8", "w8a8"):
        return METHODS[method](tensor("qweight"), tensor("scales"))
    if method in GROUPED:
        return METHODS[method](
            tensor("qweight"),
            tensor("scales"),
            tensor("zeros"),
            weight.shape[1],
            qconfig["group_size"],
        )
    ub = qconfig.get("activation_scale_ub", ACTIVATION_SCALE_UB)
    return Fp8Linear(tensor("qweight"), tensor("scales"), activation_scale_ub=ub)


def load_quantized(directory: str | Path) -> Transformer:
    """The model written by `save_quantized`, with its quantized layers rebuilt (CPU)."""
    directory = Path(directory)
    for file in (WEIGHTS_FILE, CONFIG_FILE, QUANT_CONFIG_FILE):
        if not (directory / file).is_file():
            raise FileNotFoundError(f"{directory / file} not found: not a quantized checkpoint")
    config = ModelConfig(**json.loads((directory / CONFIG_FILE).read_text()))
    qconfig = json.loads((directory / QUANT_CONFIG_FILE).read_text())
    check_method(qconfig["method"], qconfig.get("group_size") or DEFAULT_GROUP_SIZE)
    state = load_file(directory / WEIGHTS_FILE)
    with torch.device("meta"):
        model = Transformer(config)
    for name, weight in list(quantization_targets(model, qconfig["method"])):
        set_submodule(model, name, _quantized_from_state(name, weight, state, qconfig))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
