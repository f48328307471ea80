"""Quantization of herd Transformers: weight-only int8, group-wise int4 and row-wise fp8; w8a8
(int8 weights with per-token int8 activations) and w4a8 (group-wise int4 weights with int8
activations per 32 inputs)."""

from herd.quantize.core import METHODS, quantize_model, quantized_modules, set_kernels
from herd.quantize.fp8 import ACTIVATION_SCALE_UB, Fp8Linear
from herd.quantize.int4 import Int4Linear, W4A8Linear
from herd.quantize.int8 import Int8Linear, W8A8Linear
from herd.quantize.io import load_quantized, save_quantized
from herd.quantize.perplexity import Perplexity, perplexity

__all__ = [
    "ACTIVATION_SCALE_UB",
    "METHODS",
    "Fp8Linear",
    "Int4Linear",
    "Int8Linear",
    "Perplexity",
    "W4A8Linear",
    "W8A8Linear",
    "load_quantized",
    "perplexity",
    "quantize_model",
    "quantized_modules",
    "save_quantized",
    "set_kernels",
]
