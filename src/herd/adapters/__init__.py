"""Adapters applied to a built model from outside, as module swaps: LoRA, one adapter trained
or several served at once."""

from herd.adapters.lora import (
    LoRALinear,
    MultiLoRALinear,
    apply_lora,
    attach_adapters,
    fold_adapter,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    select_adapters,
)

__all__ = [
    "LoRALinear",
    "MultiLoRALinear",
    "apply_lora",
    "attach_adapters",
    "fold_adapter",
    "load_lora_state_dict",
    "lora_state_dict",
    "merge_lora",
    "select_adapters",
]
