"""Inference: KV-cached generation, sampling, and the `Llama` high-level API."""

from herd.infer.cache import KVCache
from herd.infer.generate import Step, decode_steps
from herd.infer.llama import Llama
from herd.infer.sampling import SamplingParams, sample, token_logprobs
from herd.infer.text import Completion

__all__ = [
    "Completion",
    "KVCache",
    "Llama",
    "SamplingParams",
    "Step",
    "decode_steps",
    "sample",
    "token_logprobs",
]
