"""Adapters applied to a built model from outside, as module swaps: LoRA."""

from herd.adapters.lora import (
    LoRALinear,
    apply_lora,
    fold_adapter,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
)

__all__ = [
    "LoRALinear",
    "apply_lora",
    "fold_adapter",
    "load_lora_state_dict",
    "lora_state_dict",
    "merge_lora",
]
