"""Evaluation on benchmarks that ship offline: multiple choice by log-likelihood (one forward
per question, its context shared by the choices), generative tasks through the serving engine
with answer extraction, scores with bootstrap standard errors. Importing it registers herd as
lm-eval's "herd" model when lm-eval is installed."""

import importlib.util

from herd.eval.run import evaluate
from herd.eval.tasks import TASKS, get_task


def _register_with_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        return
    # lm-eval fills its registry with its own models only when the registry is empty at the
    # first lookup, so they go in first; "herd" is a lazy entry, imported on first use.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import model_registry

    if "herd" not in model_registry:
        model_registry.register("herd", target="herd.eval.lm:HerdLM")


_register_with_lm_eval()

__all__ = ["TASKS", "evaluate", "get_task"]
