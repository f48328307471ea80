"""LoRA adapter settings (Hu et al. 2021), with PEFT's defaults where PEFT has one."""

from __future__ import annotations

from dataclasses import dataclass

# The linear layers of a Llama block (Meta names) and the output head.
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")


@dataclass(frozen=True)
class LoraConfig:
    """rank r, scale alpha / r, dropout on the adapter's input, and the layers it adapts."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown or not self.targets:
            raise ValueError(
                f"LoRA targets {unknown or 'none'}: choose from {', '.join(LORA_TARGETS)}"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank
