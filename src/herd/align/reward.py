"""Reward models (§4.1.2): a Llama backbone whose output layer is replaced by a scalar head on
the last token of each response, trained on preference rankings with the Bradley-Terry loss
`-log σ(r_better - r_worse)` over every ordered pair of a ranking (edited > chosen > rejected),
without a margin term. One packed row holds a prompt and all its responses (herd.align.data),
so the prompt is encoded once.

A reward model is saved as a Hugging Face `LlamaForSequenceClassification` directory
(config.json + safetensors, `score.weight` for the head), which transformers, TRL and vLLM
read, and loaded back with `load_reward_model`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import track
from safetensors import safe_open
from torch import nn

from herd.adapters.lora import apply_lora, merge_lora
from herd.align.data import (
    GroupBatch,
    GroupLoader,
    GroupRows,
    Preference,
    ReadStats,
    encode_group,
    in_order,
    pack_groups,
    read_preferences,
)
from herd.checkpoint.hf import CONFIG_FILE, HFReader, save_hf
from herd.config.align import RewardConfig
from herd.config.train import ConfigError
from herd.data.loader import EpochLoader
from herd.finetune.data import hold_out, mix
from herd.finetune.trainer import FineTuner, load_base
from herd.model import Transformer
from herd.model.masks import shared_prompt_mask
from herd.tokenizer.chat import chat_format
from herd.train.trainer import Trainer

HEAD = "score.weight"


class RewardModel(nn.Module):
    """`rm(tokens, positions, mask, keep) -> rewards` of the `keep` positions, (n kept,)."""

    def __init__(self, backbone: Transformer):
        super().__init__()
        backbone.output = None  # the vocabulary projection is never used
        self.model = backbone
        self.score = nn.Linear(backbone.config.dim, 1, bias=False)
        nn.init.zeros_(self.score.weight)  # every reward starts at 0

    @property
    def config(self):
        return self.model.config

    @property
    def layers(self) -> nn.ModuleDict:
        return self.model.layers

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask: Any = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.model.final_hidden(tokens, positions, mask, keep)
        return self.score(hidden).squeeze(-1).float()


def ranking_loss(
    rewards: torch.Tensor, groups: torch.Tensor, ranks: torch.Tensor
) -> tuple[torch.Tensor, int, int]:
    """(mean over ordered pairs of -log σ(r_better - r_worse), pairs, pairs ranked right): the
    pairs are every two responses of one group with different ranks (higher is better)."""
    better = (groups[:, None] == groups[None, :]) & (ranks[:, None] > ranks[None, :])
    diffs = rewards[:, None] - rewards[None, :]
    pairs = diffs[better]
    return -F.logsigmoid(pairs).mean(), len(pairs), int((pairs > 0).sum())


def batch_rewards(model: RewardModel, batch: GroupBatch) -> torch.Tensor:
    """The reward of each response of a batch (local id order), one forward pass."""
    mask = shared_prompt_mask(batch.groups, batch.parts)
    rewards = model(batch.tokens, batch.positions, mask, keep=batch.last)
    out = torch.empty(len(batch.ids), device=rewards.device)
    out[batch.response[batch.last]] = rewards
    return out


class RewardTrainer(FineTuner):
    config: RewardConfig

    def __init__(self, config: RewardConfig, resume: bool = False):
        self._sums = {"pairs": 0, "correct": 0}
        super().__init__(config, resume)

    def _build_model(self) -> RewardModel:
        f = self.config.finetune
        if f.method == "qlora":
            raise ConfigError("[finetune] method = 'qlora' is not supported for reward models")
        backbone = load_base(f.base)
        if f.method == "lora":
            torch.manual_seed(self.config.run.seed)
            try:
                apply_lora(backbone, self.config.lora)
            except ValueError as e:
                raise ConfigError(f"[lora]: {e}") from None
        return RewardModel(backbone).to(self.device)

    def _load_data(self) -> None:
        c, seed = self.config, self.config.run.seed
        fmt = chat_format(self.tokenizer)
        self.read_stats = ReadStats()
        train, held = [], []
        for source in c.data.sources:
            kept, out = hold_out(
                read_preferences(source.path, self.read_stats), c.data.valid_fraction, seed
            )
            train.append((kept, source.epochs, source.weight))
            held += out
        for source in c.data.valid:
            held += read_preferences(source.path, self.read_stats)
        pad = self.tokenizer.eos_id if self.tokenizer.eos_id is not None else 0

        def pack(preferences: list[Preference], what: str) -> GroupRows:
            groups = [
                encode_group(fmt, p, mask_formatting=False)
                for p in track(preferences, f"encoding {what} rankings", disable=not self.is_main)
            ]
            return pack_groups(groups, c.batch.seq_len, pad, seed)

        self.train_rows = pack(mix(train, seed), "training")
        self.valid_rows = pack(held, "validation") if held else None
        self.pack_stats = {"training": self.train_rows.stats}
        if self.valid_rows is not None:
            self.pack_stats["validation"] = self.valid_rows.stats

    def _loader_for(self, seq_len: int) -> EpochLoader:
        return GroupLoader(
            self.train_rows, self.config.batch.micro_batch_size, self.config.run.seed
        )

    def _validation_loader(self) -> EpochLoader | None:
        if self.valid_rows is None:
            return None
        if self._valid_loader is None:
            size = min(self.config.batch.micro_batch_size, len(self.valid_rows.tokens))
            self._valid_loader = GroupLoader(self.valid_rows, size, seed=0)
        return self._valid_loader

    def _items(self, batch: GroupBatch) -> int:
        same = batch.group_of[:, None] == batch.group_of[None, :]
        return int((same & (batch.rank[:, None] > batch.rank[None, :])).sum())

    def loss(self, batch: GroupBatch) -> torch.Tensor:
        batch = batch.to(self.device)
        with self._autocast():
            rewards = batch_rewards(self._forward, batch)
        loss, pairs, correct = ranking_loss(rewards, batch.group_of, batch.rank)
        if self.model.training:
            self._sums["pairs"] += pairs
            self._sums["correct"] += correct
        return loss

    def _step_metrics(self) -> dict[str, float]:
        pairs, correct = self._sums["pairs"], self._sums["correct"]
        self._sums = {"pairs": 0, "correct": 0}
        return {"pair_accuracy": correct / pairs} if pairs else {}

    @torch.no_grad()
    def pair_accuracy(self, rows: GroupRows | None = None) -> float | None:
        """Share of ordered pairs of the held-out rankings (or `rows`) ranked right."""
        rows = rows if rows is not None else self.valid_rows
        if rows is None:
            return None
        self.model.eval()
        try:
            return rows_accuracy(self.model, rows, self.config.batch.micro_batch_size)
        finally:
            self.model.train()

    def save(self) -> Path:
        return Trainer.save(self)  # the head trains too: a PEFT adapter alone would lack it

    def export(self, out: str | Path) -> list[Path]:
        """The trained reward model (adapter folded in) as an HF sequence-classification
        directory, with the tokenizer."""
        model = self.model
        merge_lora(model.model)
        return save_reward_model(model, out, self.tokenizer)


def rows_accuracy(model: RewardModel, rows: GroupRows, batch_size: int) -> float:
    pairs = correct = 0
    for batch in in_order(rows, batch_size):
        batch = batch.to(model.score.weight.device)
        _, n, right = ranking_loss(batch_rewards(model, batch), batch.group_of, batch.rank)
        pairs, correct = pairs + n, correct + right
    return correct / pairs


# -- files ----------------------------------------------------------------------------------


def save_reward_model(model: RewardModel, out: str | Path, tokenizer=None) -> list[Path]:
    """An HF `LlamaForSequenceClassification` directory (num_labels 1)."""
    from herd.tokenizer.formats import save_tokenizer

    out = Path(out)
    state = {k: v.detach() for k, v in model.model.state_dict().items()}
    written = save_hf(state, model.config, out, extra={"score.weight": model.score.weight.detach()})
    config = json.loads((out / CONFIG_FILE).read_text())
    pad = getattr(tokenizer, "eos_id", None) if tokenizer is not None else None
    config.update(
        architectures=["LlamaForSequenceClassification"],
        num_labels=1,
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
        pad_token_id=pad,
    )
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        save_tokenizer(tokenizer, out, "hf", model_max_length=model.config.max_seq_len)
    return written


def load_reward_model(path: str | Path, dtype: torch.dtype = torch.float32) -> RewardModel:
    """A reward model saved by `save_reward_model` (or any HF LlamaForSequenceClassification
    with one label)."""
    path = Path(path)
    reader = HFReader(path)
    raw = json.loads((path / CONFIG_FILE).read_text())
    if raw.get("num_labels", len(raw.get("id2label") or {0: 0})) != 1:
        raise ConfigError(f"{path}: a reward model has one label, this one {raw.get('num_labels')}")
    names = [n for n in reader.names() if n != HEAD]
    if HEAD not in reader.names():
        raise ConfigError(f"{path}: no {HEAD}: not a sequence-classification checkpoint")
    config = reader.config
    with torch.device("meta"):
        backbone = Transformer(config)
    state = {n: reader.read(n).to(dtype) for n in names if n != "output.weight"}
    backbone.output = None
    backbone.load_state_dict(state, strict=True, assign=True)
    model = RewardModel.__new__(RewardModel)
    nn.Module.__init__(model)
    model.model = backbone
    with safe_open(str(reader.file_of(HEAD)), framework="pt") as f:
        head = f.get_tensor(HEAD).to(dtype)
    model.score = nn.Linear(config.dim, 1, bias=False)
    model.score.weight = nn.Parameter(head)
    return model.eval()


# -- scoring --------------------------------------------------------------------------------


@torch.no_grad()
def score_responses(
    model: RewardModel,
    tokenizer,
    prompt: Sequence[dict[str, Any]],
    responses: Sequence[str],
    seq_len: int | None = None,
) -> list[float]:
    """The reward of each response to one prompt, all in one packed row."""
    fmt = chat_format(tokenizer)
    group = encode_group(fmt, Preference(tuple(prompt), tuple(responses)), mask_formatting=False)
    length = len(group.prompt) - 1 + sum(len(r) + 1 for r in group.responses)
    rows = pack_groups([group], seq_len or length, tokenizer.eos_id or 0)
    if rows.stats.dropped:
        raise ValueError(f"the prompt and its {len(responses)} responses exceed {seq_len} tokens")
    (batch,) = in_order(rows, 1)
    rewards = batch_rewards(model, batch.to(model.score.weight.device))
    out = np.zeros(len(responses))
    # response k of the group is global id in placement order; ranks map back to k
    out[len(responses) - 1 - batch.rank.cpu().numpy()] = rewards.double().cpu().numpy()
    return out.tolist()


def preference_accuracy(
    model: RewardModel, tokenizer, path: str | Path, seq_len: int, batch_size: int = 4
) -> tuple[float, ReadStats]:
    """Pairwise accuracy of a reward model on a preference file."""
    stats = ReadStats()
    fmt = chat_format(tokenizer)
    groups = [encode_group(fmt, p, False) for p in read_preferences(path, stats)]
    rows = pack_groups(groups, seq_len, tokenizer.eos_id or 0)
    return rows_accuracy(model.eval(), rows, batch_size), stats


__all__ = [
    "RewardModel",
    "RewardTrainer",
    "load_reward_model",
    "preference_accuracy",
    "ranking_loss",
    "save_reward_model",
    "score_responses",
]
