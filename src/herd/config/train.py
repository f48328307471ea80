"""A training recipe: one TOML file, overridable from the command line.

Sections (every key has a default except where noted; see recipes/ for complete examples):

    [model]     preset = "llama3-8b" and/or any ModelConfig field; vocab_size defaults to the
                tokenizer's.
    [data]      tokenizer (required), train (required: a `herd tokenize` shard directory),
                valid (optional shard directory for validation loss).
    [batch]     seq_len, batch_size (sequences per optimizer step), micro_batch_size (sequences
                per forward/backward; batch_size must be a multiple), and [[batch.stages]]
                (after_tokens, batch_size, optional seq_len): the paper's batch-size ramp.
    [optim]     lr, min_lr, warmup_steps, steps, betas, eps, weight_decay, grad_clip,
                schedule (cosine | constant).
    [run]       dir, seed, precision, compile, activation_checkpointing, attention, ...
    [parallel]  tp, cp, pp, dp_shard, dp_replicate: the layout over the torchrun processes;
                order, pp_schedule, pp_stages_per_rank, fsdp_param_dtype, cpu_offload.

`--set section.key=value` overrides a key; the value is read as TOML (numbers, booleans,
strings in quotes or bare, lists).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from herd.config.model import ModelConfig, preset

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A recipe that cannot be used as written."""


@dataclass
class DataConfig:
    tokenizer: str = ""
    train: str = ""
    valid: str | None = None


@dataclass
class Stage:
    """From `after_tokens` trained tokens on, use this batch size (and sequence length)."""

    after_tokens: int
    batch_size: int
    seq_len: int | None = None


@dataclass
class BatchConfig:
    seq_len: int = 2048
    batch_size: int = 8
    micro_batch_size: int | None = None
    stages: list[Stage] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.stages = [
            s if isinstance(s, Stage) else _build(Stage, s, "batch.stages") for s in self.stages
        ]
        if self.micro_batch_size is None:
            self.micro_batch_size = self.batch_size


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float | None = None  # default 0.1 x lr (the paper's scaling-law runs)
    warmup_steps: int = 2000
    steps: int = 10000
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    schedule: str = "cosine"  # cosine (to min_lr at `steps`) | constant (after warmup)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.min_lr is None:
            self.min_lr = 0.1 * self.lr


@dataclass
class RunConfig:
    dir: str = "runs/default"
    seed: int = 0
    precision: str = "auto"  # auto (bf16 where the GPU or CPU runs it natively) | fp32 | bf16
    compile: bool = False
    activation_checkpointing: bool = False
    attention: str = "auto"  # auto (flex when compiled, else sdpa) | flex | sdpa
    deterministic: bool = True
    threads: int | None = None
    device: str = "auto"
    log_every: int = 1  # console lines; metrics files get every step
    eval_every: int = 0  # steps; 0: only at the end (when data.valid is set)
    eval_batches: int = 8
    save_every: int = 0  # steps; 0: only at the end
    keep: int = 3
    async_save: bool = False
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    peak_tflops: float | None = None  # for MFU; default: the GPU's bf16 peak / a CPU matmul


@dataclass
class ParallelConfig:
    tp: int = 1
    cp: int = 1
    pp: int = 1
    dp_shard: int = -1  # -1: whatever the world size leaves
    dp_replicate: int = 1
    # torch.distributed.pipelining schedule: 1F1B, GPipe, Interleaved1F1B, LoopedBFS,
    # InterleavedZeroBubble, ZBVZeroBubble, DualPipeV
    pp_schedule: str = "1F1B"
    pp_stages_per_rank: int = 0  # 0: 1 for single-stage schedules, 2 for the others
    order: str = "pp,dp,cp,tp"  # outermost first; "dp,pp,cp,tp" nests as the paper does
    fsdp_param_dtype: str = "fp32"  # fp32 | bf16: gather and compute in bf16, reduce in fp32
    cpu_offload: bool = False  # FSDP keeps parameters, gradients and AdamW state in CPU memory


@dataclass
class TrainConfig:
    model: dict[str, Any]
    data: DataConfig
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        """The model's shape: the preset (if any) with the other [model] keys on top."""
        fields = dict(self.model)
        name = fields.pop("preset", None)
        if "vocab_size" not in fields and vocab_size is not None and name is None:
            fields["vocab_size"] = vocab_size
        try:
            return preset(name).replace(**fields) if name else ModelConfig(**fields)
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"[model]: {e}") from None

    def stage_at(self, tokens: int) -> tuple[int, int, int]:
        """(stage index, batch size, seq_len) in force after `tokens` trained tokens."""
        index, batch, seq = 0, self.batch.batch_size, self.batch.seq_len
        for i, stage in enumerate(self.batch.stages, start=1):
            if tokens >= stage.after_tokens:
                index, batch, seq = i, stage.batch_size, stage.seq_len or seq
        return index, batch, seq

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {
    "data": DataConfig,
    "batch": BatchConfig,
    "optim": OptimConfig,
    "run": RunConfig,
    "parallel": ParallelConfig,
}


def _build(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"[{where}] must be a table, got {values!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"[{where}]: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[{where}]: {e}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value). The value is read as TOML; a bare
    word that is not valid TOML is taken as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        table = raw
        for part in path[:-1]:
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a table")
        table[path[-1]] = value
    return raw


def from_dict(raw: dict[str, Any]) -> TrainConfig:
    unknown = sorted(set(raw) - set(SECTIONS) - {"model"})
    if unknown:
        raise ConfigError(
            f"unknown section(s) {', '.join(unknown)}; known: model, {', '.join(SECTIONS)}"
        )
    sections = {name: _build(cls, raw.get(name, {}), name) for name, cls in SECTIONS.items()}
    config = TrainConfig(model=dict(raw.get("model", {})), **sections)
    validate(config)
    return config


def load_config(
    path: str | Path, overrides: list[str] = (), build: Callable[[dict], Any] | None = None
) -> TrainConfig:
    """The recipe at `path` with `overrides` applied, built by `build` (default: a pretraining
    recipe; herd.config.finetune passes its own)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such recipe file")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return (build or from_dict)(apply_overrides(raw, list(overrides)))


def validate(config: TrainConfig) -> None:
    b, o, r = config.batch, config.optim, config.run
    if not config.data.tokenizer:
        raise ConfigError("[data] tokenizer is required (a checkpoint or tokenizer file)")
    if not config.data.train:
        raise ConfigError("[data] train is required (a directory written by `herd tokenize`)")
    for name, value in (("seq_len", b.seq_len), ("batch_size", b.batch_size)):
        if value <= 0:
            raise ConfigError(f"[batch] {name} must be positive, got {value}")
    if b.micro_batch_size <= 0:
        raise ConfigError(f"[batch] micro_batch_size must be positive, got {b.micro_batch_size}")
    sizes = [("batch", b.batch_size)] + [
        (f"batch.stages[{i}]", s.batch_size) for i, s in enumerate(b.stages)
    ]
    for where, size in sizes:
        if size % b.micro_batch_size:
            raise ConfigError(
                f"[{where}] batch_size {size} is not a multiple of micro_batch_size "
                f"{b.micro_batch_size}"
            )
    starts = [s.after_tokens for s in b.stages]
    if starts != sorted(starts) or any(t <= 0 for t in starts):
        raise ConfigError("[batch.stages] after_tokens must be positive and increasing")
    if o.steps <= 0 or o.warmup_steps < 0 or o.lr <= 0 or o.min_lr < 0:
        raise ConfigError(
            "[optim] needs steps > 0, warmup_steps >= 0, lr > 0 and min_lr >= 0, got "
            f"steps={o.steps}, warmup_steps={o.warmup_steps}, lr={o.lr}, min_lr={o.min_lr}"
        )
    if o.grad_clip <= 0:
        raise ConfigError(f"[optim] grad_clip must be positive, got {o.grad_clip}")
    if o.schedule not in ("cosine", "constant"):
        raise ConfigError(f"[optim] schedule = {o.schedule!r}; choose cosine or constant")
    choices = {
        "precision": ("auto", "fp32", "bf16"),
        "attention": ("auto", "flex", "sdpa"),
    }
    for name, allowed in choices.items():
        if getattr(r, name) not in allowed:
            raise ConfigError(
                f"[run] {name} = {getattr(r, name)!r}; choose one of {', '.join(allowed)}"
            )
    if r.keep < 1 or r.max_bad_steps < 1:
        raise ConfigError("[run] keep and max_bad_steps must be at least 1")
    config.model_config(vocab_size=1)  # the shape is checked now, not after the data loads
