"""Preference-tuning recipes: `herd dpo` and `herd reward train` take a fine-tuning recipe
(herd.config.finetune: [finetune] base and method, [lora], [batch], [optim], [run]) whose
[[data.sources]] are preference JSONL (format = "preference", the default here).

    [dpo]     beta (0.1), nll (0.2: the weight of the chosen responses' NLL term, 0 for plain
              DPO), nll_normalize ("sequence": each response's NLL over its length, as the
              paper cites; "tokens": over all chosen tokens of a batch, as TRL's "sft" loss),
              mask_formatting (true: header and termination tokens are not scored),
              reference (a checkpoint; default: the base, which the policy equals at step 0).

A reward model's recipe has no section of its own: it trains with the paper's Bradley-Terry
loss over every ordered pair of a ranking, without a margin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from herd.config.finetune import FinetuneConfig, finetune_from_dict
from herd.config.train import ConfigError

NLL_NORMALIZE = ("sequence", "tokens")


@dataclass
class DPOSection:
    beta: float = 0.1
    nll: float = 0.2
    nll_normalize: str = "sequence"
    mask_formatting: bool = True
    reference: str | None = None

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if self.nll < 0:
            raise ValueError(f"nll must be >= 0, got {self.nll}")
        if self.nll_normalize not in NLL_NORMALIZE:
            raise ValueError(
                f"nll_normalize {self.nll_normalize!r}; choose one of {', '.join(NLL_NORMALIZE)}"
            )


@dataclass
class DPOConfig(FinetuneConfig):
    dpo: DPOSection = field(default_factory=DPOSection)


@dataclass
class RewardConfig(FinetuneConfig):
    pass


def _preference_sources(raw: dict[str, Any]) -> dict[str, Any]:
    raw = dict(raw)
    data = dict(raw.get("data", {}))
    for key in ("sources", "valid"):
        if key in data:
            data[key] = [
                {"format": "preference", **({"path": s} if isinstance(s, str) else s)}
                for s in data[key]
            ]
    raw["data"] = data
    return raw


def _check_preference(config: FinetuneConfig) -> FinetuneConfig:
    for source in [*config.data.sources, *config.data.valid]:
        if source.format != "preference":
            raise ConfigError(
                f"{source.path}: format {source.format!r}; preference tuning reads preference "
                'JSONL (format = "preference")'
            )
    return config


def dpo_from_dict(raw: dict[str, Any]) -> DPOConfig:
    config = finetune_from_dict(_preference_sources(raw), DPOConfig, {"dpo": DPOSection})
    return _check_preference(config)


def reward_from_dict(raw: dict[str, Any]) -> RewardConfig:
    return _check_preference(finetune_from_dict(_preference_sources(raw), RewardConfig))
