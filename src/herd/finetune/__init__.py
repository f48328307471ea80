"""Fine-tuning: SFT data and loss masks, and weight-space operations on whole checkpoints
(adapters folded in, model soups)."""

from herd.finetune.weights import average_models, merge_adapter

__all__ = ["average_models", "merge_adapter"]
