"""Pretraining: the optimizer recipe and learning-rate schedule (the loop lands next)."""

from herd.train.optim import build_optimizer, build_scheduler, lr_at, param_groups

__all__ = ["build_optimizer", "build_scheduler", "lr_at", "param_groups"]
