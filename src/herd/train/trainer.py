"""The pretraining loop: packed document-masked batches, AdamW with warmup and cosine decay,
gradient accumulation and clipping, bf16 autocast over fp32 weights, validation, metrics, and
DCP checkpoints that resume bit for bit. One process, or many under torchrun laid out by
[parallel] (herd.train.parallel), with the same per-step losses.

The run directory holds everything a run needs to continue or be exported:
    config.json       the resolved recipe        model.json    the model's shape
    tokenizer/        the tokenizer (HF form)    metrics.jsonl one record per step
    tensorboard/      event files                checkpoints/  step-NNNNNNNN DCP directories
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.checkpoint import checkpoint

from herd.config.train import ConfigError, TrainConfig
from herd.data import Batch, PackedLoader, load_shards
from herd.data.loader import EpochLoader
from herd.model import Transformer
from herd.model.masks import document_block_mask, document_causal_mask
from herd.train.checkpoint import CheckpointManager, checkpoint_step, read_checkpoint
from herd.train.flops import device_peak_tflops, flops_per_token, measured_matmul_tflops
from herd.train.metrics import MetricsWriter
from herd.train.optim import build_optimizer, lr_at
from herd.train.parallel import (
    Pipeline,
    apply_context_parallel,
    build_mesh,
    clip_grad_norm_,
    data_parallel_coordinates,
    fsdp_policy,
    init_distributed,
    mean_over_ranks,
    parallelize,
    pipeline_schedule,
    resolve_dims,
    shard_context,
)

log = logging.getLogger(__name__)


# Checkpoints hold what trains: a frozen base (LoRA) is read from its own checkpoint instead.
TRAINED = StateDictOptions(ignore_frozen_params=True, strict=False)


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast (weights stay fp32) or None for plain fp32. "auto" takes bf16 where the
    hardware runs it natively: a GPU that supports it, or a CPU whose bf16 matmul outruns its
    fp32 one (AVX-512 BF16 or AMX; without them bf16 is emulated and many times slower)."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return torch.bfloat16 if cpu_bf16_speedup() > 1 else None
    if device.type == "cpu" and (speedup := cpu_bf16_speedup()) < 1:
        log.warning(
            "run.precision = 'bf16': this CPU's bf16 matmul runs at %.2fx its fp32 speed (no "
            "native bf16 instructions), so training will be slow; 'auto' picks fp32 here",
            speedup,
        )
    return torch.bfloat16


def cpu_bf16_speedup() -> float:
    """bf16 over fp32 matmul throughput on this CPU."""
    bf16 = measured_matmul_tflops(torch.bfloat16, n=256)
    return bf16 / measured_matmul_tflops(torch.float32, n=256)


def choose_attention(
    wanted: str, compiled: bool, device: torch.device, context_parallel: bool = False
) -> str:
    """Flex attention's block masks skip the blocks a document boundary cuts away, but it needs
    torch.compile to be fast and has no backward on the CPU; SDPA with a dense mask works
    everywhere. Context parallelism builds each rank's rows of the dense mask."""
    if wanted == "flex" and device.type == "cpu":
        raise ConfigError(
            "run.attention = 'flex': flex attention has no backward pass on the CPU; "
            "use 'sdpa' (or 'auto')"
        )
    if wanted == "flex" and context_parallel:
        raise ConfigError(
            "run.attention = 'flex' does not combine with parallel.cp > 1: use 'sdpa'"
        )
    if wanted == "auto":
        return "flex" if compiled and device.type == "cuda" and not context_parallel else "sdpa"
    return wanted


# Targets of this value are not trained on (masked prompt tokens, padding).
IGNORE = -100


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets that are not IGNORE, in float32; logits
    (..., vocab) and targets (...) of any matching leading shape."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten())


def concat_batches(batches: list[Batch]) -> Batch:
    return Batch(*(torch.cat([getattr(b, f.name) for b in batches]) for f in fields(Batch)))


def enable_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them."""
    for block in model.layers.values():
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:  # VmHWM: ru_maxrss would include a forked parent's peak on Linux
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


class Trainer:
    """Build a run from a recipe (or resume one) and train it: `Trainer(config).fit()`."""

    def __init__(self, config: TrainConfig, resume: bool | str | Path = False):
        self.config = config
        run = config.run
        self.run_dir = Path(run.dir)
        if run.threads:
            torch.set_num_threads(run.threads)
        if run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            # every tensor is written before it is read; NaN-filling new memory only costs time
            torch.utils.deterministic.fill_uninitialized_memory = False
        self.device = pick_device(run.device)
        self.amp_dtype = autocast_dtype(run.precision, self.device)
        world = init_distributed(self.device)
        self.dims = resolve_dims(config.parallel, world)
        self.fsdp_policy = fsdp_policy(config.parallel, self.dims, self.device)
        self.mesh = None
        if world > 1:
            self.mesh = build_mesh(self.dims, self.device.type, config.parallel.order)
        self.dp_rank, self.dp_size = (
            data_parallel_coordinates(self.mesh) if self.mesh is not None else (0, 1)
        )
        self.is_main = not dist.is_initialized() or dist.get_rank() == 0
        per_step = config.batch.micro_batch_size * self.dp_size
        for size in [config.batch.batch_size] + [s.batch_size for s in config.batch.stages]:
            if size % per_step:
                raise ConfigError(
                    f"batch_size {size} is not a multiple of micro_batch_size x data-parallel "
                    f"ranks = {config.batch.micro_batch_size} x {self.dp_size}"
                )
        self.tokenizer = self._load_tokenizer()
        self.model = self._build_model()
        self.model_config = self.model.config
        longest = max([config.batch.seq_len] + [s.seq_len or 0 for s in config.batch.stages])
        if longest > self.model_config.max_seq_len:
            raise ConfigError(
                f"sequences of {longest} tokens exceed the model's max_seq_len "
                f"{self.model_config.max_seq_len}: raise [model] max_seq_len or shorten [batch]"
            )
        if run.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        self.pipeline: Pipeline | None = None
        if self.mesh is not None:
            self._parallelize()
        o = config.optim
        self.optimizer = build_optimizer(
            self.model, o.lr, o.betas, o.weight_decay, o.eps, fused=self.mesh is None
        )
        self.attention = choose_attention(
            run.attention, run.compile, self.device, context_parallel=self.dims.cp > 1
        )
        self._forward = self.model
        if run.compile and self.pipeline is None:
            self._forward = torch.compile(self.model)
        elif run.compile:  # stages run under the schedule: compile their blocks in place
            for block in self.model.layers.values():
                block.compile()

        self._load_data()
        self._valid_loader: EpochLoader | None = None
        self.step, self.tokens, self.skipped, self.bad_in_row = 0, 0, 0, 0
        self.loader = self._loader_for(self.stage()[2])
        self._batches: Iterator[Batch] = iter(self.loader)

        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints", run.keep, run.async_save, self.is_main
        )
        resumed = self._resume(resume)
        self.metrics = None
        if self.is_main:
            self._write_run_files()
            self.metrics = MetricsWriter(self.run_dir, resume_step=self.step if resumed else None)
        peak = run.peak_tflops or device_peak_tflops(self.device)
        self.peak_tflops = peak or measured_matmul_tflops(self.amp_dtype or torch.float32)

    # -- what a run is built from (herd.finetune's FineTuner builds them otherwise) ------------

    def _load_tokenizer(self):
        from herd.tokenizer import load_tokenizer

        return load_tokenizer(self.config.data.tokenizer)

    def _build_model(self) -> Transformer:
        """A new model of the recipe's shape at its seeded initialisation (the same weights on
        every rank, split afterwards)."""
        model_config = self.config.model_config(vocab_size=self.tokenizer.vocab_size)
        if self.tokenizer.vocab_size > model_config.vocab_size:
            raise ConfigError(
                f"the tokenizer has {self.tokenizer.vocab_size} ids but the model's vocab_size "
                f"is {model_config.vocab_size}"
            )
        with torch.device(self.device):
            model = Transformer(model_config)
        model.init_weights(seed=self.config.run.seed)
        return model

    def _flops_per_token(self, seq_len: int) -> float:
        return flops_per_token(self.model_config, seq_len)

    def _load_data(self) -> None:
        self.train_shards = load_shards(self.config.data.train)
        valid = self.config.data.valid
        self.valid_shards = load_shards(valid) if valid else None

    def _parallelize(self) -> None:
        """Context parallelism, then the pipeline split, then TP and FSDP on each stage."""
        p, mesh = self.config.parallel, self.mesh
        if self.dims.cp > 1:
            apply_context_parallel(self.model, mesh["cp"])
        stages = [self.model]
        if self.dims.pp > 1:
            schedule = pipeline_schedule(p.pp_schedule, p.pp_stages_per_rank)
            if schedule.v_shape and self.config.data.valid:
                raise ConfigError(
                    f"parallel.pp_schedule {p.pp_schedule}: torch's V-shaped schedules cannot "
                    "run forward-only, which validation needs; use Interleaved1F1B or "
                    "InterleavedZeroBubble, or leave data.valid unset"
                )
            self.pipeline = Pipeline(
                self.model, mesh["pp"], schedule, token_cross_entropy, self.device
            )
            stages = self.pipeline.modules
        for stage in stages:
            parallelize(stage, mesh, self.dims, *self.fsdp_policy)

    # -- data ---------------------------------------------------------------------------------

    def stage(self) -> tuple[int, int, int]:
        return self.config.stage_at(self.tokens)

    def _loader_for(self, seq_len: int) -> EpochLoader:
        return PackedLoader(
            self.train_shards,
            seq_len,
            self.config.batch.micro_batch_size,
            self.config.run.seed,
            rank=self.dp_rank,
            world_size=self.dp_size,
        )

    def _follow_stage(self) -> None:
        """A new sequence length starts a loader of that shape in the same epoch, as far into
        it as the old one had got (its windows are cut and shuffled anew)."""
        seq_len = self.stage()[2]
        if seq_len == self.loader.seq_len:
            return
        old = self.loader
        used = self._windows_taken() * (old.seq_len + 1)
        self.loader = self._loader_for(seq_len)
        per_batch = self.loader.batch_size * self.loader.world_size * (seq_len + 1)
        self.loader.epoch, self.loader.step = old.epoch, -(-used // per_batch)
        self._batches = iter(self.loader)

    def _windows_taken(self) -> int:
        return self.loader.step * self.loader.batch_size * self.loader.world_size

    # -- one step -----------------------------------------------------------------------------

    def _mask(self, doc_ids: torch.Tensor):
        if self.attention == "flex":
            return document_block_mask(doc_ids)
        return document_causal_mask(doc_ids)

    def _inputs(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        """tokens, targets, positions and mask of this rank's part of a batch (its share of
        each sequence under context parallelism)."""
        batch = Batch(*(getattr(batch, f.name).to(self.device) for f in fields(Batch)))
        if self.dims.cp > 1:
            part = shard_context(batch, self.mesh["cp"])
            return part.tokens, part.targets, part.positions, part.mask
        return batch.tokens, batch.targets, batch.positions, self._mask(batch.doc_ids)

    def _autocast(self):
        return torch.autocast(self.device.type, self.amp_dtype, enabled=self.amp_dtype is not None)

    def loss(self, batch: Batch) -> torch.Tensor:
        """Mean next-token cross-entropy of a packed batch, attention kept inside documents."""
        tokens, targets, positions, mask = self._inputs(batch)
        keep = targets != IGNORE
        if keep.all():
            keep = None
        else:  # logits of the trained tokens only (masked SFT rows)
            targets = targets[keep]
        with self._autocast():
            logits = self._forward(tokens, positions, mask, keep=keep)
        return token_cross_entropy(logits, targets)

    def _items(self, batch: Batch) -> int:
        """What the loss of a batch is the mean over: here its trained tokens (preference
        tuning counts pairs)."""
        return int((batch.targets != IGNORE).sum())

    def _step_metrics(self) -> dict[str, float]:
        """Records of the last step beyond the loss (preference tuning's reward margins)."""
        return {}

    def _pipeline_loss(self, batches: list[Batch], training: bool) -> torch.Tensor:
        """The batches as the micro-batches of one pipeline schedule run (backward included
        when training): their mean loss on the last stage, zero on the other stages."""
        tokens, targets, positions, mask = self._inputs(concat_batches(batches))
        with self._autocast():
            return self.pipeline.run(
                tokens, targets, len(batches), training, positions=positions, mask=mask
            )

    def _loss_holders(self) -> int | None:
        """How many processes hold the loss: the last pipeline stage's, or all."""
        if self.pipeline is None:
            return None
        return dist.get_world_size() // self.dims.pp

    def train_step(self) -> StepResult:
        _, batch_size, _ = self.stage()
        accum = batch_size // (self.config.batch.micro_batch_size * self.dp_size)
        lr = lr_at(
            self.step,
            self.config.optim.lr,
            self.config.optim.warmup_steps,
            self.config.optim.steps,
            self.config.optim.min_lr,
            self.config.optim.schedule,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        if self.pipeline is not None:
            batches = [next(self._batches) for _ in range(accum)]
            total = self._pipeline_loss(batches, training=True)
        else:
            total = torch.zeros((), device=self.device)
            batches = [next(self._batches) for _ in range(accum)]
            counted = [self._items(b) for b in batches]
            for batch, n in zip(batches, counted):
                if n == 0:
                    continue
                # each micro-batch weighs by the items (tokens) it trains on: the step's loss
                # is the mean over all of them (masked SFT rows train on unequal numbers)
                loss = self.loss(batch) * (n / sum(counted))
                loss.backward()
                total += loss.detach()
        pp_mesh = self.mesh["pp"] if self.pipeline is not None else None
        norm = clip_grad_norm_(list(self.model.parameters()), self.config.optim.grad_clip, pp_mesh)
        loss_value = mean_over_ranks(total, self._loss_holders()).item()
        norm_value = norm.item()
        skipped = not (math.isfinite(loss_value) and math.isfinite(norm_value))
        if skipped:
            self.skipped += 1
            self.bad_in_row += 1
        else:
            self.optimizer.step()
            self.bad_in_row = 0
        self.step += 1
        self.tokens += batch_size * self.loader.seq_len
        return StepResult(loss_value, norm_value, skipped)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the first `eval_batches` micro-batches of the validation shards
        (spread over the data-parallel ranks, so every layout sees the same windows)."""
        loader = self._validation_loader()
        if loader is None:
            return None
        n = min(max(1, self.config.run.eval_batches // self.dp_size), loader.batches_per_epoch)
        self.model.eval()
        if self.pipeline is not None:
            total = self._pipeline_loss([loader.batch(0, i) for i in range(n)], training=False)
        else:
            total = sum(self.loss(loader.batch(0, i)) for i in range(n)) / n
        self.model.train()
        return mean_over_ranks(total, self._loss_holders()).item()

    def _validation_loader(self) -> EpochLoader | None:
        """The validation batches at the current sequence length (built once per length)."""
        if self.valid_shards is None:
            return None
        loader = self._valid_loader
        if loader is None or loader.seq_len != self.loader.seq_len:
            loader = self._valid_loader = PackedLoader(
                self.valid_shards,
                self.loader.seq_len,
                self.config.batch.micro_batch_size,
                seed=0,
                rank=self.dp_rank,
                world_size=self.dp_size,
            )
        return loader

    # -- checkpoints --------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """Everything the next step depends on, as tensors only."""
        loader = self.loader.state_dict()
        train = {
            "step": torch.tensor(self.step),
            "tokens": torch.tensor(self.tokens),
            "skipped": torch.tensor(self.skipped),
            "bad_in_row": torch.tensor(self.bad_in_row),
            # windows taken by all data-parallel ranks together: the position in any layout
            "loader": torch.tensor(
                [self.loader.seq_len, loader["epoch"], self._windows_taken(), loader["seed"]]
            ),
            "rng": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            train["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return {
            "model": get_model_state_dict(self.model, options=TRAINED),
            "optim": get_optimizer_state_dict(self.model, self.optimizer, options=TRAINED)["state"],
            "train": train,
        }

    def save(self) -> Path:
        return self.checkpoints.save(self.step, self.state())

    def load(self, path: Path) -> None:
        state = self.state()
        groups = get_optimizer_state_dict(self.model, self.optimizer, options=TRAINED)[
            "param_groups"
        ]
        read_checkpoint(path, state)
        set_model_state_dict(self.model, state["model"], options=TRAINED)
        set_optimizer_state_dict(
            self.model,
            self.optimizer,
            {"state": state["optim"], "param_groups": groups},
            options=TRAINED,
        )
        train = state["train"]
        self.step, self.tokens = int(train["step"]), int(train["tokens"])
        self.skipped, self.bad_in_row = int(train["skipped"]), int(train["bad_in_row"])
        seq_len, epoch, windows, seed = (int(x) for x in train["loader"])
        self.loader = self._loader_for(seq_len)
        per_step = self.loader.batch_size * self.loader.world_size
        if windows % per_step:
            raise ConfigError(
                f"{path}: the checkpoint stopped after {windows} windows, which is no whole "
                f"number of {self.loader.batch_size} x {self.loader.world_size}-rank loader "
                "steps: resume with a micro_batch_size x data-parallel size that divides it"
            )
        self.loader.load_state_dict({"epoch": epoch, "step": windows // per_step, "seed": seed})
        self._batches = iter(self.loader)
        torch.set_rng_state(train["rng"])
        if "cuda_rng" in train:
            torch.cuda.set_rng_state(train["cuda_rng"], self.device)

    def _resume(self, resume: bool | str | Path) -> bool:
        if resume is False:
            if self.checkpoints.latest() is not None:
                raise ConfigError(
                    f"{self.run_dir} already holds checkpoints: pass --resume to continue that "
                    "run, or choose another run.dir"
                )
            return False
        path = self.checkpoints.latest() if resume is True else Path(resume)
        if path is None:
            log.info("no checkpoint in %s yet: starting from step 0", self.checkpoints.directory)
            return False
        if not (path / ".metadata").is_file():
            raise FileNotFoundError(f"{path}: not a complete checkpoint (no .metadata)")
        self.load(path)
        log.info("resumed from %s (step %d)", path, checkpoint_step(path))
        return True

    def _write_run_files(self) -> None:
        from herd.tokenizer.formats import save_tokenizer

        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(
            json.dumps(self.config.to_dict(), indent=1) + "\n"
        )
        (self.run_dir / "model.json").write_text(
            json.dumps(self.model_config.to_dict(), indent=1) + "\n"
        )
        if not (self.run_dir / "tokenizer").exists():
            tmp = self.run_dir / "tokenizer.tmp"
            save_tokenizer(
                self.tokenizer, tmp, "hf", model_max_length=self.model_config.max_seq_len
            )
            os.replace(tmp, self.run_dir / "tokenizer")

    # -- the loop -----------------------------------------------------------------------------

    def fit(self, on_step: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Train to `optim.steps`; on_step(step, record) is called after each step (the CLI
        drives its progress bar with it). Returns the last record."""
        run, total = self.config.run, self.config.optim.steps
        record: dict[str, Any] = {}
        try:
            while self.step < total:
                self._follow_stage()
                _, batch_size, seq_len = self.stage()
                start = time.perf_counter()
                result = self.train_step()
                elapsed = time.perf_counter() - start
                tokens_per_s = batch_size * seq_len / elapsed
                flops = self._flops_per_token(seq_len) * tokens_per_s
                record = {
                    "loss": result.loss,
                    "grad_norm": result.grad_norm,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "tokens": self.tokens,
                    "batch_size": batch_size,
                    "seq_len": seq_len,
                    "tokens_per_s": tokens_per_s,
                    "mfu": flops / (self.peak_tflops * 1e12),
                    "peak_memory_gib": peak_memory_bytes(self.device) / 2**30,
                    "skipped": result.skipped,
                    "skipped_total": self.skipped,
                    **self._step_metrics(),
                }
                if self.bad_in_row >= run.max_bad_steps:
                    self._log(record)
                    self._diverged()
                if self.step == total or (run.eval_every and self.step % run.eval_every == 0):
                    val = self.evaluate()
                    if val is not None:
                        record["val_loss"] = val
                self._log(record)
                if on_step:
                    on_step(self.step, record)
                due = self.step == total or (run.save_every and self.step % run.save_every == 0)
                if due and self.bad_in_row == 0:  # in a non-finite streak, keep the last good one
                    self.save()
        finally:
            self.checkpoints.wait()
            if self.metrics is not None:
                self.metrics.close()
        return record

    def close(self) -> None:
        """Leave the process group (a torchrun job), once training is over."""
        if dist.is_initialized():
            dist.destroy_process_group()

    def _log(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(self.step, record)

    def _diverged(self) -> None:
        last = self.checkpoints.latest()
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
        raise TrainingDiverged(
            f"{self.bad_in_row} steps in a row had a non-finite loss or gradient norm (up to "
            f"step {self.step}); stopping. {where}. Lower optim.lr, raise optim.warmup_steps or "
            "check the data, then resume."
        )
