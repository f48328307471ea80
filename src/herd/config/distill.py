"""A distillation recipe: `herd distill TEACHER RECIPE` takes a fine-tuning recipe
(herd.config.finetune: [finetune] base, [[data.sources]], [batch], [optim], [run]) whose base is
the student's starting point, and trains it on the teacher's next-token distributions.

    [distill]  teacher (set by the command's TEACHER argument), layers (the base's blocks the
               student keeps, e.g. [0, 10, 20, 29]; empty: all of them), temperature (1.0: the
               soft targets' softmax temperature), kl_weight (1.0: the loss is
               kl_weight * T^2 * KL(teacher || student) + (1 - kl_weight) * cross-entropy on the
               data's own next tokens).

The student keeps the base's embeddings, final norm and output head, so it shares the teacher's
vocabulary and can draft for it (herd.infer.speculative).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from herd.config.finetune import FinetuneConfig, finetune_from_dict
from herd.config.train import ConfigError


@dataclass
class DistillSection:
    teacher: str = ""
    layers: list[int] = field(default_factory=list)
    temperature: float = 1.0
    kl_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0 <= self.kl_weight <= 1:
            raise ValueError(f"kl_weight must be in [0, 1], got {self.kl_weight}")
        if len(set(self.layers)) != len(self.layers) or any(i < 0 for i in self.layers):
            raise ValueError(f"layers must be distinct block indices >= 0, got {self.layers}")


@dataclass
class DistillConfig(FinetuneConfig):
    distill: DistillSection = field(default_factory=DistillSection)


def distill_from_dict(raw: dict[str, Any]) -> DistillConfig:
    raw = dict(raw)
    finetune = {"method": "full", "train_on": "all", **raw.get("finetune", {})}
    distill = raw.get("distill", {})
    if not distill.get("teacher"):
        raise ConfigError("[distill] teacher is required: the model whose logits are learnt")
    if not finetune.get("base"):
        finetune["base"] = distill["teacher"]  # by default the student starts from the teacher
    raw["finetune"] = finetune
    config = finetune_from_dict(raw, DistillConfig, {"distill": DistillSection})
    if config.finetune.method != "full":
        raise ConfigError("[finetune] method: a distilled student trains in full")
    return config
