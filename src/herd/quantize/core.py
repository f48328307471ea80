"""Swapping a model's linear layers for weight-only quantized ones."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from herd.quantize.fp8 import Fp8Linear
from herd.quantize.int4 import DEFAULT_GROUP_SIZE, Int4Linear, W4A8Linear, check_group_size
from herd.quantize.int8 import Int8Linear, W8A8Linear

QuantizedLinear = Int8Linear | Int4Linear | Fp8Linear
METHODS: dict[str, type[QuantizedLinear]] = {
    "int8": Int8Linear,
    "w8a8": W8A8Linear,
    "int4": Int4Linear,
    "w4a8": W4A8Linear,
    "fp8": Fp8Linear,
    "fp8-mixed": Fp8Linear,
}

# Methods whose weights are int4 in groups of inputs.
GROUPED = ("int4", "w4a8")
# The Llama 3 paper's FP8 recipe (section 6.2; Meta's `fp8_mixed` 405B release): only the
# feed-forward products (about half of inference compute), and none in the first and last
# blocks (llama-models skips layer 0 and n_layers - 1); attention and the head stay bf16.
FFN_ONLY = ("fp8-mixed",)


def check_method(method: str, group_size: int) -> type[QuantizedLinear]:
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose from {list(METHODS)}")
    if method in GROUPED:
        check_group_size(group_size)
    return METHODS[method]


def quantization_targets(
    model: nn.Module, method: str | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(module name, float weight) of each layer `quantize_model` swaps: every linear of the
    transformer blocks, and the output head. A tied model's head becomes a quantized copy of
    the embedding: lookups keep the float table (one row per token), while the logits, which
    read the whole matrix every step, read the quantized copy. Embeddings and norms stay in
    floating point. For the `FFN_ONLY` methods, the feed-forward linears of every block but
    the first and the last."""
    if method in FFN_ONLY:
        yield from ((name, model.get_submodule(name).weight) for name in inner_feed_forwards(model))
        return
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (name.startswith("layers.") or name == "output"):
            if module.bias is not None:
                raise ValueError(f"{name}: linear layers with a bias are not supported")
            yield name, module.weight
    if getattr(model, "output", None) is None and hasattr(model, "tok_embeddings"):
        yield "output", model.tok_embeddings.weight


def inner_feed_forwards(model: nn.Module) -> list[str]:
    """The feed-forward linears of every block but the first and the last."""
    blocks = range(1, len(model.layers) - 1)
    return [f"layers.{i}.feed_forward.{w}" for i in blocks for w in ("w1", "w2", "w3")]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def head_method(method: str) -> str:
    """The output head's method: int4, w4a8 and w8a8 models keep an int8 weight-only head, as
    llama.cpp's Q4 files keep theirs at 8 bits or more; the logits are the most
    quantization-sensitive layer."""
    return "int8" if method in ("int4", "w4a8", "w8a8") else method


def quantize_model(
    model: nn.Module, method: str, group_size: int = DEFAULT_GROUP_SIZE
) -> nn.Module:
    """Replace every block linear (wq/wk/wv/wo/w1/w2/w3) in place with an `Int8Linear`,
    `W8A8Linear`, `Int4Linear` or `W4A8Linear` (groups of `group_size` inputs) or `Fp8Linear`,
    and the output head with `head_method(method)`'s layer; for "fp8-mixed" only the inner
    blocks' feed-forward linears (`FFN_ONLY`)."""
    cls = check_method(method, group_size)
    if method in FFN_ONLY and len(model.layers) < 3:
        raise ValueError(
            f"{method} leaves the first and last blocks in float; this model has only "
            f"{len(model.layers)}, so nothing would be quantized: use fp8"
        )
    for name, weight in list(quantization_targets(model, method)):
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
