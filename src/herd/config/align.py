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


# -- herd align: the rounds -------------------------------------------------------------------


@dataclass
class AlignSection:
    base: str = ""  # the checkpoint the first round starts from
    method: str = "lora"  # how every stage trains: full | lora
    rounds: int = 1
    dir: str = "out/align"
    seq_len: int = 256
    seed: int = 0
    threads: int = 0
    precision: str = "fp32"
    log_every: int = 1  # each training stage prints a step line this often


@dataclass
class TaskSection:
    """Prompts with checkable answers: files, or generated arithmetic word problems."""

    prompts: str | None = None  # training prompts (JSONL; see herd.align.tasks)
    test_prompts: str | None = None  # held-out prompts, scored after each stage
    train: int = 96  # generated problems, when no files are given
    test: int = 40
    seed: int = 1234


@dataclass
class SampleSection:
    k: int = 8
    max_new_tokens: int = 96
    temperature: float = 0.8
    top_p: float = 0.95
    system_prompts: list[str] = field(default_factory=list)
    max_batch: int = 32


@dataclass
class StageSection:
    """One training stage of a round: the sub-recipe's [optim] and [batch] keys."""

    steps: int = 20
    lr: float | None = None  # default: the method's (herd.config.finetune.DEFAULT_LR)
    warmup_steps: int = 2
    batch_size: int = 4
    micro_batch_size: int | None = None

    def recipe(self) -> dict[str, Any]:
        optim = {"steps": self.steps, "warmup_steps": self.warmup_steps}
        if self.lr is not None:
            optim["lr"] = self.lr
        batch = {"batch_size": self.batch_size}
        if self.micro_batch_size is not None:
            batch["micro_batch_size"] = self.micro_batch_size
        return {"optim": optim, "batch": batch}


@dataclass
class DPOStageSection(StageSection, DPOSection):
    def recipe(self) -> dict[str, Any]:
        dpo = {n: getattr(self, n) for n in ("beta", "nll", "nll_normalize", "mask_formatting")}
        return {**StageSection.recipe(self), "dpo": dpo}


@dataclass
class AverageSection:
    # stage models averaged into the round's model ("sft", "dpo"); none: the DPO model
    models: list[str] = field(default_factory=list)
    weights: list[float] | None = None


ALIGN_SECTIONS = {
    "align": AlignSection,
    "task": TaskSection,
    "sample": SampleSection,
    "reward": StageSection,
    "sft": StageSection,
    "dpo": DPOStageSection,
    "average": AverageSection,
}


@dataclass
class AlignConfig:
    align: AlignSection
    task: TaskSection
    sample: SampleSection
    reward: StageSection
    sft: StageSection
    dpo: DPOStageSection
    average: AverageSection
    lora: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)


def align_from_dict(raw: dict[str, Any]) -> AlignConfig:
    from herd.config.train import _build

    known = set(ALIGN_SECTIONS) | {"lora"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"unknown section(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    sections = {n: _build(c, raw.get(n, {}), n) for n, c in ALIGN_SECTIONS.items()}
    config = AlignConfig(**sections, lora=dict(raw.get("lora", {})))
    a = config.align
    if not a.base:
        raise ConfigError("[align] base is required: the checkpoint the first round starts from")
    if a.method not in ("full", "lora"):
        raise ConfigError(f"[align] method = {a.method!r}; choose full or lora")
    if a.rounds < 1:
        raise ConfigError(f"[align] rounds must be at least 1, got {a.rounds}")
    if config.sample.k < 2:
        raise ConfigError(f"[sample] k = {config.sample.k}: rejection sampling needs k >= 2")
    for name in config.average.models:
        if name not in ("sft", "dpo"):
            raise ConfigError(f"[average] models: {name!r} is no stage; choose sft and/or dpo")
    return config
