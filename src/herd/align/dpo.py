"""`herd dpo`: direct preference optimisation as the paper runs it (§4.1.4).

The loss of a pair (chosen c, rejected r) is

    -log σ(β [(log π(c) - log π_ref(c)) - (log π(r) - log π_ref(r))])  +  α NLL(c)

with β = 0.1 and α = 0.2, the NLL of the chosen response normalised by its length (the
paper's regularisation, after Pang et al. 2024). Log-probabilities count only the response's
content: the header and termination tokens, which every response shares, are masked out
(`mask_formatting`), so the loss does not push the same tokens up and down at once. Reference
log-probabilities are computed once, before the first step, by the base model itself (a LoRA
policy at step 0 is the base, so no second model is held) or by a `[dpo] reference`
checkpoint, and kept in RUN/reference_logps.safetensors for resuming.

The rest is herd finetune's: the Trainer's steps, schedules, checkpoints and exact resume, LoRA
or full weights, and the adapter written in PEFT's format.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import track
from safetensors.numpy import load_file, save_file

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
from herd.config.align import DPOConfig
from herd.config.train import ConfigError
from herd.data.loader import EpochLoader
from herd.finetune.data import hold_out, mix
from herd.finetune.trainer import FineTuner, base_tokenizer, load_base
from herd.model import Transformer
from herd.model.masks import shared_prompt_mask
from herd.tokenizer import load_tokenizer
from herd.tokenizer.chat import chat_format
from herd.train.trainer import IGNORE

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference_logps.safetensors"


@dataclass
class PairLogps:
    """Per pair: summed log-probabilities of the chosen and rejected responses under the
    policy and the reference, and the chosen response's scored-token count."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor


def dpo_loss(
    pairs: PairLogps, beta: float = 0.1, nll: float = 0.2, nll_normalize: str = "sequence"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean over pairs of the sigmoid DPO loss plus `nll` times the chosen responses' NLL
    ("sequence": each over its own length, then the mean; "tokens": over all chosen tokens),
    and the reward statistics (β-scaled log-ratios) of the pairs."""
    chosen_ratio = pairs.chosen - pairs.ref_chosen
    rejected_ratio = pairs.rejected - pairs.ref_rejected
    loss = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio)).mean()
    if nll_normalize == "sequence":
        chosen_nll = (-pairs.chosen / pairs.chosen_tokens).mean()
    elif nll_normalize == "tokens":
        chosen_nll = -pairs.chosen.sum() / pairs.chosen_tokens.sum()
    else:
        raise ValueError(f"nll_normalize {nll_normalize!r}: choose sequence or tokens")
    if nll:
        loss = loss + nll * chosen_nll
    with torch.no_grad():
        stats = {
            "reward_accuracy": (chosen_ratio > rejected_ratio).double().mean(),
            "reward_margin": (beta * (chosen_ratio - rejected_ratio)).mean(),
            "chosen_reward": (beta * chosen_ratio).mean(),
            "rejected_reward": (beta * rejected_ratio).mean(),
            "chosen_logp": pairs.chosen.mean(),
            "rejected_logp": pairs.rejected.mean(),
            "chosen_nll": chosen_nll,
        }
    return loss, stats


def response_logps(model: torch.nn.Module, batch: GroupBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability, scored tokens) of each response of a batch, in float32,
    from one forward pass over its packed rows."""
    mask = shared_prompt_mask(batch.groups, batch.parts)
    keep = batch.targets != IGNORE
    logits = model(batch.tokens, batch.positions, mask, keep=keep)
    token_logps = (
        logits.float().log_softmax(-1).gather(-1, batch.targets[keep][:, None]).squeeze(-1)
    )
    owner = batch.response[keep]
    m = len(batch.ids)
    sums = torch.zeros(m, device=logits.device).index_add(0, owner, token_logps)
    return sums, torch.bincount(owner, minlength=m)


def pair_order(batch: GroupBatch) -> torch.Tensor:
    """(pairs, 2) local response ids: each group's best then worst response."""
    ranks = batch.rank
    key = batch.group_of * (int(ranks.max()) + 1) + (ranks.max() - ranks)
    order = torch.argsort(key)
    if len(order) % 2 or (batch.group_of[order].view(-1, 2).diff(dim=1) != 0).any():
        raise ValueError("DPO rows hold groups of exactly two responses")
    return order.view(-1, 2)


def pair_logps(batch: GroupBatch, sums: torch.Tensor, counts: torch.Tensor) -> PairLogps:
    pairs = pair_order(batch)
    c, r = pairs[:, 0], pairs[:, 1]
    reference = batch.reference.to(sums.device, torch.float32)
    return PairLogps(sums[c], sums[r], reference[c], reference[r], counts[c].float())


def best_and_worst(preference: Preference) -> Preference:
    """A DPO pair of a ranking: its best and its worst response."""
    return Preference(preference.prompt, (preference.responses[0], preference.responses[-1]))


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers give the same ids (vocabulary, special tokens, a probe text)."""
    probe = "Preference tuning compares log-probabilities: 12,345 tokens, café, 日本語!"
    return (
        a.vocab_size == b.vocab_size
        and a.special_tokens == b.special_tokens
        and a.encode(probe, bos=False, eos=False) == b.encode(probe, bos=False, eos=False)
    )


class DPOTrainer(FineTuner):
    config: DPOConfig

    def __init__(self, config: DPOConfig, resume: bool = False):
        self._sums: dict[str, float] = {}
        super().__init__(config, resume)
        self._reference_logps()

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
                encode_group(fmt, best_and_worst(p), c.dpo.mask_formatting)
                for p in track(preferences, f"encoding {what} pairs", disable=not self.is_main)
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
        return len(batch.ids) // 2

    def loss(self, batch: GroupBatch) -> torch.Tensor:
        batch = batch.to(self.device)
        with self._autocast():
            sums, counts = response_logps(self._forward, batch)
        d = self.config.dpo
        loss, stats = dpo_loss(pair_logps(batch, sums, counts), d.beta, d.nll, d.nll_normalize)
        if self.model.training:
            pairs = len(batch.ids) // 2
            for name, value in stats.items():
                self._sums[name] = self._sums.get(name, 0.0) + float(value.detach()) * pairs
            self._sums["pairs"] = self._sums.get("pairs", 0.0) + pairs
        return loss

    def _step_metrics(self) -> dict[str, float]:
        pairs = self._sums.pop("pairs", 0.0)
        metrics = {name: total / pairs for name, total in self._sums.items()} if pairs else {}
        self._sums = {}
        return metrics

    # -- reference log-probabilities --------------------------------------------------------

    def _reference_logps(self) -> None:
        path = self.run_dir / REFERENCE_FILE
        sets = {"train": self.train_rows, "valid": self.valid_rows}
        if self.step > 0:
            if not path.is_file():
                raise ConfigError(
                    f"{path} is missing: a DPO run resumes with the reference log-probabilities "
                    "its first step was computed with; start the run anew"
                )
            saved = load_file(path)
            for name, rows in sets.items():
                if rows is not None:
                    if saved[name].shape != (len(rows.response_rank),):
                        raise ConfigError(f"{path}: not the reference of this run's pairs")
                    rows.reference = saved[name].astype(np.float64)
            return
        reference = self._reference_model()
        for name, rows in sets.items():
            if rows is not None:
                rows.reference = self._logps_of(reference, rows, name)
        if self.is_main:
            tmp = path.with_name(path.name + ".tmp")
            save_file({n: r.reference for n, r in sets.items() if r is not None}, str(tmp))
            os.replace(tmp, path)

    def _reference_model(self) -> torch.nn.Module:
        source = self.config.dpo.reference
        if source is None:
            return self.model  # at step 0 the policy is the base (LoRA's B matrices are zero)
        theirs = load_tokenizer(base_tokenizer(source))
        if not same_tokenizer(theirs, self.tokenizer):
            raise ConfigError(
                f"[dpo] reference {source} has another tokenizer than {self.config.finetune.base}: "
                "log-probabilities of different token ids cannot be compared; use a reference "
                "of the same model family"
            )
        reference: Transformer = load_base(source).to(self.device)
        return reference

    @torch.no_grad()
    def _logps_of(self, model: torch.nn.Module, rows: GroupRows, what: str) -> np.ndarray:
        was_training = model.training
        model.eval()
        out = np.zeros(len(rows.response_rank))
        batches = in_order(rows, self.config.batch.micro_batch_size)
        for batch in track(
            batches, f"reference log-probabilities ({what})", disable=not self.is_main
        ):
            batch = batch.to(self.device)
            with self._autocast():
                sums, _ = response_logps(model, batch)
            out[batch.ids.cpu().numpy()] = sums.double().cpu().numpy()
        model.train(was_training)
        return out


__all__ = ["DPOTrainer", "PairLogps", "dpo_loss", "pair_logps", "response_logps"]
