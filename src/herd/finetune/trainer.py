"""`herd finetune`: the pretraining Trainer started from a checkpoint and fed dialogs.

Only what differs is here: the model is read from the recipe's base checkpoint (adapted with
LoRA, or LoRA over an NF4-quantised base, when the recipe says so), the tokenizer is the base's,
and the batches are packed SFT rows whose targets hold only the tokens the loss mask trains on.
Steps, schedules, validation, metrics, DCP checkpoints and exact resume are the Trainer's own.
A LoRA run's checkpoints hold the adapter and its optimizer state only, and the newest adapter
is also written in PEFT's format to RUN/adapter.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from rich.progress import track
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from herd.adapters.lora import apply_lora, lora_state_dict, merge_lora
from herd.checkpoint import load_model
from herd.checkpoint.peft import save_peft_adapter
from herd.config.finetune import FINETUNE_SECTIONS, FinetuneConfig, finetune_from_dict
from herd.config.train import ConfigError
from herd.data.loader import EpochLoader
from herd.finetune.data import encode_example, hold_out, mix, read_source
from herd.finetune.pack import PackedRows, SFTLoader, pack_dialogs
from herd.finetune.tasks import exact_match
from herd.infer import Llama
from herd.model import Transformer
from herd.quantize.nf4 import quantize_frozen_nf4
from herd.tokenizer import load_tokenizer
from herd.tokenizer.chat import chat_format
from herd.train.checkpoint import load_run_model, read_checkpoint, run_checkpoint
from herd.train.flops import matmul_params
from herd.train.trainer import TRAINED, Trainer

ADAPTER_DIR = "adapter"


class FineTuner(Trainer):
    config: FinetuneConfig

    def __init__(self, config: FinetuneConfig, resume: bool | str | Path = False):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(
                "herd finetune runs in one process: launch it without torchrun (sharded "
                "fine-tuning is not supported yet)"
            )
        super().__init__(config, resume)

    def _load_tokenizer(self):
        base = self.config.finetune.base
        return load_tokenizer(self.config.data.tokenizer or base_tokenizer(base))

    def _build_model(self) -> Transformer:
        f = self.config.finetune
        model = load_base(f.base).to(self.device)
        if self.tokenizer.vocab_size > model.config.vocab_size:
            raise ConfigError(
                f"the tokenizer has {self.tokenizer.vocab_size} ids but {f.base} embeds only "
                f"{model.config.vocab_size}: use the base checkpoint's own tokenizer"
            )
        if f.method == "full":
            return model
        torch.manual_seed(self.config.run.seed)  # the adapters' A matrices
        try:
            apply_lora(model, self.config.lora)
        except ValueError as e:
            raise ConfigError(f"[lora]: {e}") from None
        if f.method == "qlora":
            self.nf4_bytes = quantize_frozen_nf4(model, self.config.lora.targets)
        return model

    def _flops_per_token(self, seq_len: int) -> float:
        full = super()._flops_per_token(seq_len)
        if self.config.finetune.method == "full":
            return full
        # a frozen weight gets no gradient: forward and input gradients, 4 of the 6 N FLOPs
        return full - 2.0 * matmul_params(self.model_config)

    def _load_data(self) -> None:
        self.train_rows, self.valid_rows = sft_rows(self.config, self.tokenizer, self.is_main)
        self.pack_stats = {"training": self.train_rows.stats}
        if self.valid_rows is not None:
            self.pack_stats["validation"] = self.valid_rows.stats

    def _loader_for(self, seq_len: int) -> EpochLoader:
        return SFTLoader(self.train_rows, self.config.batch.micro_batch_size, self.config.run.seed)

    def _validation_loader(self) -> EpochLoader | None:
        if self.valid_rows is None:
            return None
        if self._valid_loader is None:
            size = min(self.config.batch.micro_batch_size, len(self.valid_rows.tokens))
            self._valid_loader = SFTLoader(self.valid_rows, size, seed=0)
        return self._valid_loader

    def exact_match(self, items: list) -> float:
        """Exact-match accuracy of the model as it is now (greedy answers)."""
        try:
            return exact_match(Llama(self.model, self.tokenizer), items)
        finally:
            self.model.train()

    def save(self) -> Path:
        path = super().save()
        if self.config.finetune.method != "full":
            write_adapter(self.model, self.config, self.run_dir / ADAPTER_DIR)
        return path


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "model.json").is_file() and (Path(path) / "checkpoints").is_dir()


def load_base(path: str | Path) -> Transformer:
    """The model to start from (float32): any checkpoint herd reads, or a herd training run's
    newest checkpoint (a fine-tuning run's with its adapter folded in)."""
    if not is_run_dir(path):
        return load_model(path, dtype=torch.float32)
    model, _ = load_finetuned(path) if is_finetune_run(path) else load_run_model(path)
    return model


def base_tokenizer(path: str | Path) -> str | Path:
    """Where the tokenizer of a base checkpoint or training run is."""
    return Path(path) / "tokenizer" if is_run_dir(path) else path


def sft_rows(
    config: FinetuneConfig, tokenizer, progress: bool = True
) -> tuple[PackedRows, PackedRows | None]:
    """The recipe's training mix and its validation dialogs, encoded with the loss mask and
    packed into rows of batch.seq_len."""
    d, f, seed = config.data, config.finetune, config.run.seed
    train, held = [], []
    for source in d.sources:
        kept, out = hold_out(read_source(source.path, source.format), d.valid_fraction, seed)
        train.append((kept, source.epochs, source.weight))
        held += out
    for source in d.valid:
        held += read_source(source.path, source.format)
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    examples = [x for kept, _, _ in train for x in kept] + held
    dialogs = any(not isinstance(x, str) for x in examples)
    fmt = chat_format(tokenizer) if dialogs else None  # plain text needs no chat format

    def pack(examples: list, what: str) -> PackedRows:
        encoded = [
            encode_example(tokenizer, x, f.train_on, fmt)
            for x in track(examples, f"encoding {what} dialogs", disable=not progress)
        ]
        return pack_dialogs(encoded, config.batch.seq_len, pad, f.overflow)

    return pack(mix(train, seed), "training"), pack(held, "validation") if held else None


def replace_directory(out: Path, write: Callable[[Path], None]) -> None:
    """`write(path)` a directory next to `out`, then put it in `out`'s place: a run killed
    meanwhile leaves the previous directory whole."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def write_adapter(model: Transformer, config: FinetuneConfig, out: Path) -> None:
    """The model's LoRA weights as a PEFT adapter directory, replaced whole."""
    state, base = lora_state_dict(model), config.finetune.base
    replace_directory(
        out, lambda tmp: save_peft_adapter(tmp, state, config.lora, model.config, base_model=base)
    )


def is_finetune_run(run_dir: str | Path) -> bool:
    config = Path(run_dir) / "config.json"
    return config.is_file() and "finetune" in json.loads(config.read_text())


def load_finetuned(run_dir: str | Path, step: int | None = None) -> tuple[Transformer, Path]:
    """The model a `herd finetune` run holds at its newest checkpoint (or `step`), its adapter
    folded into the base weights; returns it with the checkpoint it came from."""
    run_dir = Path(run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    # the sections a fine-tuning run of any kind (SFT, DPO) shares; the rest are its own
    shared = set(FINETUNE_SECTIONS) | {"lora"}
    config = finetune_from_dict({k: v for k, v in saved.items() if k in shared})
    path = run_checkpoint(run_dir, step)
    model = load_base(config.finetune.base)
    if config.finetune.method != "full":
        apply_lora(model, config.lora)
    state = {"model": get_model_state_dict(model, options=TRAINED)}
    read_checkpoint(path, state)
    model.load_state_dict(state["model"], strict=False)
    return merge_lora(model), path


__all__ = ["FineTuner", "is_finetune_run", "load_finetuned", "sft_rows", "write_adapter"]
