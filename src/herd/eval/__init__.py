"""Evaluation on benchmarks that ship offline: multiple choice by log-likelihood (one forward
per question, its context shared by the choices), generative tasks by greedy decoding and answer
extraction, scores with bootstrap standard errors."""

from herd.eval.run import evaluate
from herd.eval.tasks import TASKS, get_task

__all__ = ["TASKS", "evaluate", "get_task"]
