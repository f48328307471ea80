"""Pretraining: the loop (`Trainer`), the optimizer recipe and schedule, DCP checkpoints, the
FLOPs and memory model, and metrics. `herd pretrain` and `herd export` drive it."""

from herd.train.checkpoint import CheckpointCorrupt, load_run_model
from herd.train.flops import flops_per_token, memory_per_device
from herd.train.optim import build_optimizer, lr_at, param_groups
from herd.train.trainer import Trainer, TrainingDiverged

__all__ = [
    "CheckpointCorrupt",
    "Trainer",
    "TrainingDiverged",
    "build_optimizer",
    "flops_per_token",
    "load_run_model",
    "lr_at",
    "memory_per_device",
    "param_groups",
]
