"""herd's own CPU kernels for the decode step, AVX-512 or AVX2 picked at run time:

- int8 and int4 weight-only products at decode batch sizes (`quantized_mm.cpp`): float32
  activations, weights widened in registers; and w4a8, int4 weights times activations
  quantized to int8 per 32 inputs, and w8a8's int8 x int8 products, both as byte dot
  products (AVX-512 VNNI or AVX2);
- one-query attention over a static KV cache that reads only the valid slots
  (`attention.cpp`).

The extension is compiled with torch's C++ extension builder (a C++ compiler and ninja are
needed) by `make install` (`kernels.main()`), or on first use, and cached
under torch's extension directory; torch rebuilds it when the source changes. Where it cannot
be built the layers fall back to torch's own kernels, with one warning.

    python -c "from herd import kernels; kernels.main()"   # build now, print the ISA
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

SOURCES = [
    Path(__file__).with_name(name) for name in ("quantized_mm.cpp", "float_mm.cpp", "attention.cpp")
]
# Batches up to this many rows run herd's kernels; larger ones (prefill) dequantize once and
# multiply in float32, where the GEMM's blocking beats streaming the weight per row tile.
MAX_ROWS = 8
# float32 products stream a weight four times as large per row: herd's kernel stays ahead of
# torch's GEMM further (1.3-2.2x at 32 rows on SmolLM2's shapes, benchmarks/kernels.py).
FLOAT_MAX_ROWS = 32
DISABLE_ENV = "HERD_NO_CPU_KERNELS"


_built: bool | None = None  # None: not tried yet


def load() -> bool:
    """Build (or reuse the cached build) and register `torch.ops.herd_cpu`; False where that
    fails or is switched off with HERD_NO_CPU_KERNELS=1. Tried once per process."""
    global _built
    if _built is None:
        _built = os.environ.get(DISABLE_ENV) != "1" and _build()
    return _built


def _build() -> bool:
    try:
        from torch.utils.cpp_extension import load as build

        build(
            name="herd_cpu_kernels",
            sources=[str(source) for source in SOURCES],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as error:
        lines = str(error).strip().splitlines()
        warnings.warn(
            f"herd's CPU kernels could not be built ({type(error).__name__}: "
            f"{lines[-1] if lines else ''}); quantized layers and decode attention use torch's "
            "kernels instead. "
            "Install a C++ compiler and ninja to build them.",
            stacklevel=3,
        )
        return False
    _register_fakes()
    return True


def available(device: torch.device) -> bool:
    """Whether products on `device` can run herd's kernels. Under torch.compile only an
    earlier build counts (the layers try it when they are made): building is not traceable."""
    if device.type != "cpu":
        return False
    return bool(_built) if torch.compiler.is_compiling() else load()


def isa() -> str:
    return torch.ops.herd_cpu.isa() if load() else "none"


def float_mm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(M, K) float32 @ (N, K) float32 weight.T -> (M, N) float32, for M up to a few dozen
    rows (`FLOAT_MAX_ROWS`)."""
    return torch.ops.herd_cpu.float_mm(x, weight)


def int8_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(M, K) float32 @ dequantized (N, K) int8 weight.T -> (M, N) float32."""
    return torch.ops.herd_cpu.int8_mm(x.float(), qweight, scales)


def int4_mm(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """(M, K) float32 @ dequantized int4 weight.T -> (M, N) float32; the weight in herd's
    portable nibble layout, K at most its padded width."""
    return torch.ops.herd_cpu.int4_mm(x.float(), packed, scales, zeros, group_size)


def int8_int8_mm(xq: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 activations in [-127, 127] @ (N, K) int8 weight.T -> exact (M, N) int32,
    `torch._int_mm`'s result."""
    return torch.ops.herd_cpu.int8_int8_mm(xq, qweight)


def w4a8_mm(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """(M, K) float32, quantized to int8 per 32 inputs as herd.quantize.int4's
    `quantize_activations` does, @ dequantized int4 weight.T (as `int4_mm` takes it) -> (M, N)
    float32."""
    return torch.ops.herd_cpu.w4a8_mm(x.float(), packed, scales, zeros, group_size)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """q (B, H, 1, D) over the slots of k, v (B, KV, S, D) that `valid` (B or 1, ..., S) marks,
    grouped-query heads by position (head h reads key/value head h // (H // KV)); float32."""
    return torch.ops.herd_cpu.decode_attention(q, k, v, valid, q.shape[-1] ** -0.5)


def _register_fakes() -> None:
    @torch.library.register_fake("herd_cpu::float_mm")
    def _(x, weight):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("herd_cpu::int8_mm")
    def _(x, qweight, scales):
        return x.new_empty(x.shape[0], qweight.shape[0])

    @torch.library.register_fake("herd_cpu::int4_mm")
    def _(x, packed, scales, zeros, group_size):
        return x.new_empty(x.shape[0], packed.shape[0])

    @torch.library.register_fake("herd_cpu::int8_int8_mm")
    def _(xq, qweight):
        return xq.new_empty(xq.shape[0], qweight.shape[0], dtype=torch.int32)

    @torch.library.register_fake("herd_cpu::w4a8_mm")
    def _(x, packed, scales, zeros, group_size):
        return x.new_empty(x.shape[0], packed.shape[0])

    @torch.library.register_fake("herd_cpu::decode_attention")
    def _(q, k, v, valid, scale):
        return q.new_empty(q.shape)


def main() -> None:
    """Build now (`make install` runs this); exits non-zero where the build fails."""
    if not load():
        sys.exit("herd: the CPU kernels did not build (see the warning above)")
    print(f"herd CPU kernels built: {isa()}")
