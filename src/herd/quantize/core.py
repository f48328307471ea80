"""Swapping a model's linear layers for weight-only quantized ones."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from herd.quantize.fp8 import Fp8Linear
from herd.quantize.int4 import Int4Linear, check_group_size
from herd.quantize.int8 import Int8Linear

QuantizedLinear = Int8Linear | Int4Linear | Fp8Linear
METHODS: dict[str, type[QuantizedLinear]] = {
    "int8": Int8Linear,
    "int4": Int4Linear,
    "fp8": Fp8Linear,
}


def check_method(method: str, group_size: int) -> type[QuantizedLinear]:
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose from {list(METHODS)}")
    if method == "int4":
        check_group_size(group_size)
    return METHODS[method]


def quantizable_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """The transformer blocks' projections and, when untied, the output head. Embeddings and
    norms stay in floating point: they are small and quality-sensitive."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (name.startswith("layers.") or name == "output"):
            yield name, module


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(model: nn.Module, method: str, group_size: int = 128) -> nn.Module:
    """Replace every block linear (wq/wk/wv/wo/w1/w2/w3, and `output` when untied) in place with
    an `Int8Linear`, `Int4Linear` (groups of `group_size` inputs) or `Fp8Linear`."""
    cls = check_method(method, group_size)
    for name, linear in list(quantizable_linears(model)):
        if linear.bias is not None:
            raise ValueError(f"{name}: linear layers with a bias are not supported")
        set_submodule(model, name, cls.from_linear(linear, group_size))
    return model


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, QuantizedLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, (Int8Linear, Int4Linear, Fp8Linear)):
            yield name, module


def set_kernels(model: nn.Module, enabled: bool) -> nn.Module:
    """Route the quantized layers through the fused torch kernels (`_weight_int8pack_mm`,
    `_weight_int4pack_mm_for_cpu`, `_scaled_mm`) where they apply, or through the
    dequantize-and-matmul fallback. int8/int4 default to the fallback (faster on CPU in torch
    2.13), fp8 to `_scaled_mm` (which only runs on fp8-capable GPUs)."""
    for _, module in quantized_modules(model):
        module.use_kernel = enabled
    return model
