"""A fine-tuning recipe: `herd pretrain`'s [batch], [optim] and [run] sections, with the model
coming from a checkpoint and the data from dialogs.

    [finetune]  base (required: any checkpoint herd reads, or a herd run directory),
                method = "full" | "lora" | "qlora",
                train_on = "assistant" | "last" | "all", overflow = "truncate" | "drop",
                exact_match (optional: held-out questions, scored before and after).
    [lora]      rank, alpha, dropout, targets (any of wq wk wv wo w1 w2 w3 output).
    [[data.sources]]  path, format ("chat": messages or prompt/completion JSONL, "sharegpt",
                "text": plain text, documents split at blank lines), and how much of it the mix
                takes: epochs (passes over it, fractions allowed) or weight (its share of the
                mix, which is as large as all sources together).
    [data]      valid (sources like data.sources) or valid_fraction (held out of the training
                dialogs), tokenizer (default: the base checkpoint's).

Defaults follow the paper's SFT where it gives one (AdamW, LR 1e-5, cosine with warmup); a LoRA
run's default LR is 2e-4, the usual one for adapters, which train from zero.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from herd.config.adapter import LoraConfig
from herd.config.train import SECTIONS, ConfigError, TrainConfig, _build, validate

METHODS = ("full", "lora", "qlora")
FORMATS = ("chat", "sharegpt", "text", "preference")
DEFAULT_LR = {"full": 1e-5, "lora": 2e-4, "qlora": 2e-4}


@dataclass
class Source:
    path: str
    format: str = "chat"
    epochs: float | None = None
    weight: float | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"{self.path}: format {self.format!r}; choose one of {FORMATS}")
        if self.epochs is not None and self.weight is not None:
            raise ValueError(f"{self.path}: give epochs or weight, not both")
        for name in ("epochs", "weight"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{self.path}: {name} must be positive, got {value}")


@dataclass
class SFTDataConfig:
    sources: list[Source] = field(default_factory=list)
    valid: list[Source] = field(default_factory=list)
    valid_fraction: float = 0.0
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        self.sources = [_source(s, "data.sources") for s in self.sources]
        self.valid = [_source(s, "data.valid") for s in self.valid]


def _source(value: Any, where: str) -> Source:
    if isinstance(value, str):
        value = {"path": value}
    return value if isinstance(value, Source) else _build(Source, value, where)


@dataclass
class FinetuneSection:
    base: str = ""
    method: str = "lora"
    train_on: str = "assistant"
    overflow: str = "truncate"
    # chat JSONL of held-out questions (last turn: the exact answer), scored before and after
    exact_match: str | None = None


@dataclass
class FinetuneConfig(TrainConfig):
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def model_config(self, vocab_size: int | None = None):
        raise ConfigError("a fine-tuning run's model is its [finetune] base checkpoint")


FINETUNE_SECTIONS = {**SECTIONS, "data": SFTDataConfig, "finetune": FinetuneSection}


def finetune_from_dict(
    raw: dict[str, Any],
    cls: type[FinetuneConfig] | None = None,
    extra: dict[str, type] | None = None,
) -> FinetuneConfig:
    """A fine-tuning recipe; `cls` and its `extra` sections build the recipes that extend it
    (herd.config.align's DPO and reward-model recipes)."""
    cls, extra = cls or FinetuneConfig, extra or {}
    known = set(FINETUNE_SECTIONS) | {"lora"} | set(extra)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"unknown section(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    sections = {n: _build(c, raw.get(n, {}), n) for n, c in FINETUNE_SECTIONS.items()}
    lora = dict(raw.get("lora", {}))
    if "targets" in lora:
        lora["targets"] = tuple(lora["targets"])
    sections["lora"] = _build(LoraConfig, lora, "lora")
    sections.update({n: _build(c, raw.get(n, {}), n) for n, c in extra.items()})
    method = sections["finetune"].method
    if method in DEFAULT_LR and "lr" not in raw.get("optim", {}):
        sections["optim"] = dataclasses.replace(
            sections["optim"], lr=DEFAULT_LR[method], min_lr=0.1 * DEFAULT_LR[method]
        )
    config = cls(model={}, **sections)
    validate_finetune(config)
    return config


def validate_finetune(config: FinetuneConfig) -> None:
    f, d = config.finetune, config.data
    if not f.base:
        raise ConfigError("[finetune] base is required: the checkpoint to start from")
    for name, value, allowed in (
        ("method", f.method, METHODS),
        ("train_on", f.train_on, ("assistant", "last", "all")),
        ("overflow", f.overflow, ("truncate", "drop")),
    ):
        if value not in allowed:
            raise ConfigError(f"[finetune] {name} = {value!r}; choose one of {', '.join(allowed)}")
    if not d.sources:
        raise ConfigError("[[data.sources]] is required: at least one dialog file to train on")
    if not 0 <= d.valid_fraction < 1:
        raise ConfigError(f"[data] valid_fraction must be in [0, 1), got {d.valid_fraction}")
    if d.valid and d.valid_fraction:
        raise ConfigError("[data]: give valid sources or valid_fraction, not both")
    if config.batch.stages:
        raise ConfigError("[[batch.stages]]: fine-tuning trains at one batch size and length")
    # the shared sections' checks, with stand-ins for the pretraining-only keys
    probe = TrainConfig(
        model={"dim": 64, "n_layers": 1, "n_heads": 1},
        data=SECTIONS["data"](tokenizer="-", train="-"),
        batch=config.batch,
        optim=config.optim,
        run=config.run,
        parallel=config.parallel,
    )
    validate(probe)
