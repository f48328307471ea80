"""Swapping a model's linear layers for weight-only quantized ones."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from herd.quantize.fp8 import Fp8Linear
from herd.quantize.int4 import DEFAULT_GROUP_SIZE, Int4Linear, check_group_size
from herd.quantize.int8 import Int8Linear, W8A8Linear

QuantizedLinear = Int8Linear | Int4Linear | Fp8Linear
METHODS: dict[str, type[QuantizedLinear]] = {
    "int8": Int8Linear,
    "w8a8": W8A8Linear,
    "int4": Int4Linear,
    "fp8": Fp8Linear,
}


def check_method(method: str, group_size: int) -> type[QuantizedLinear]:
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose from {list(METHODS)}")
    if method == "int4":
        check_group_size(group_size)
    return METHODS[method]


def quantization_targets(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(module name, float weight) of each layer `quantize_model` swaps: every linear of the
    transformer blocks, and the output head. A tied model's head becomes a quantized copy of
    the embedding: lookups keep the float table (one row per token), while the logits, which
    read the whole matrix every step, read the quantized copy. Embeddings and norms stay in
    floating point."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (name.startswith("layers.") or name == "output"):
            if module.bias is not None:
                raise ValueError(f"{name}: linear layers with a bias are not supported")
            yield name, module.weight
    if getattr(model, "output", None) is None and hasattr(model, "tok_embeddings"):
        yield "output", model.tok_embeddings.weight


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def head_method(method: str) -> str:
    """The output head's method: int4 and w8a8 models keep an int8 weight-only head, as
    llama.cpp's Q4 files keep theirs at 8 bits or more; the logits are the most
    quantization-sensitive layer."""
    return "int8" if method in ("int4", "w8a8") else method


def quantize_model(
    model: nn.Module, method: str, group_size: int = DEFAULT_GROUP_SIZE
) -> nn.Module:
    """Replace every block linear (wq/wk/wv/wo/w1/w2/w3) in place with an `Int8Linear`,
    `W8A8Linear`, `Int4Linear` (groups of `group_size` inputs) or `Fp8Linear`, and the output
    head with `head_method(method)`'s layer."""
    cls = check_method(method, group_size)
    for name, weight in list(quantization_targets(model)):
        layer_cls = METHODS[head_method(method)] if name == "output" else cls
        set_submodule(model, name, layer_cls.from_weight(weight, group_size))
    return model


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, QuantizedLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, (Int8Linear, Int4Linear, Fp8Linear)):
            yield name, module


def set_kernels(model: nn.Module, enabled: bool) -> nn.Module:
    """Route the quantized layers through the fused kernels where they apply, the default
    (herd's int8/int4 CPU kernels, else torch's `_weight_int8pack_mm` and
    `_weight_int4pack_mm_for_cpu` with bfloat16 activations; `_scaled_mm` for fp8); or,
    disabled, through the exact float32 dequantize-and-matmul fallback."""
    for _, module in quantized_modules(model):
        module.use_kernel = enabled
    return model
