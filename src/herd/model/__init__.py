"""The Llama 3 model: pure PyTorch modules, no I/O, no distributed code."""

from herd.model.llama import AttentionMask, Transformer

__all__ = ["AttentionMask", "Transformer"]
