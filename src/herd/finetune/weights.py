"""Whole-checkpoint weight operations: folding a LoRA adapter into its base, and the paper's
model averaging (§4.1.5: weights of models trained with different data or hyper-parameters,
averaged). Both read any format `herd.load_model` reads and return a `Transformer`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from herd.adapters.lora import fold_adapter
from herd.checkpoint import load_model
from herd.checkpoint.peft import read_peft_adapter
from herd.model import Transformer


def merge_adapter(base: str | Path, adapter: str | Path) -> Transformer:
    """The base checkpoint with a PEFT-format LoRA adapter folded into its weights (float32)."""
    model = load_model(base, dtype=torch.float32)
    return fold_adapter(model, *read_peft_adapter(adapter, model.config))


def average_models(
    sources: Sequence[str | Path], weights: Sequence[float] | None = None
) -> Transformer:
    """The weighted mean of checkpoints of one architecture, each tensor summed in float64.
    Weights default to equal and are normalised to sum to 1."""
    if len(sources) < 2:
        raise ValueError(f"averaging needs at least two checkpoints, got {len(sources)}")
    weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
    if len(weights) != len(sources):
        raise ValueError(f"{len(weights)} weights for {len(sources)} checkpoints")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    scale = [w / sum(weights) for w in weights]
    first = load_model(sources[0], dtype=torch.float32)
    total = {k: v.double() * scale[0] for k, v in first.state_dict().items()}
    for source, share in zip(sources[1:], scale[1:]):
        model = load_model(source, dtype=torch.float32)
        _same_architecture(first, model, sources[0], source)
        for key, value in model.state_dict().items():
            total[key] += value.double() * share
        del model
    first.load_state_dict({k: v.float() for k, v in total.items()})
    return first


# What makes two models compute alike besides their tensor shapes (max_seq_len does not).
_ARCHITECTURE = ("n_heads", "n_kv_heads", "norm_eps", "rope_theta", "rope_scaling")


def _same_architecture(a: Transformer, b: Transformer, a_path, b_path) -> None:
    differ = [
        f"{name} {getattr(a.config, name)!r} vs {getattr(b.config, name)!r}"
        for name in _ARCHITECTURE
        if getattr(a.config, name) != getattr(b.config, name)
    ]
    shapes_a, shapes_b = ({k: tuple(v.shape) for k, v in m.state_dict().items()} for m in (a, b))
    if shapes_a.keys() != shapes_b.keys():
        differ.append(f"tensors {sorted(set(shapes_a) ^ set(shapes_b))[:3]}")
    differ += [
        f"{k} {shapes_a[k]} vs {shapes_b[k]}"
        for k in sorted(shapes_a.keys() & shapes_b.keys())
        if shapes_a[k] != shapes_b[k]
    ]
    if differ:
        raise ValueError(
            f"{b_path} is not the architecture of {a_path}: {'; '.join(differ[:4])}; only "
            "checkpoints of one architecture can be averaged"
        )
