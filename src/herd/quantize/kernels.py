"""herd's own CPU kernels for int8 and int4 weight-only products at decode batch sizes
(`cpu_kernels.cpp`): float32 activations, weights widened in registers, AVX-512 or AVX2 picked
at run time.

The extension is compiled with torch's C++ extension builder (a C++ compiler and ninja are
needed) by `make install` (`kernels.main()`), or on first use, and cached
under torch's extension directory; torch rebuilds it when the source changes. Where it cannot
be built the layers fall back to torch's own kernels, with one warning.

    python -c "from herd.quantize import kernels; kernels.main()"   # build now, print the ISA
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
# Batches up to this many rows run herd's kernels; larger ones (prefill) dequantize once and
# multiply in float32, where the GEMM's blocking beats streaming the weight per row tile.
MAX_ROWS = 8
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
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as error:
        lines = str(error).strip().splitlines()
        warnings.warn(
            f"herd's int8/int4 CPU kernels could not be built ({type(error).__name__}: "
            f"{lines[-1] if lines else ''}); quantized layers use torch's kernels instead. "
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


def _register_fakes() -> None:
    @torch.library.register_fake("herd_cpu::int8_mm")
    def _(x, qweight, scales):
        return x.new_empty(x.shape[0], qweight.shape[0])

    @torch.library.register_fake("herd_cpu::int4_mm")
    def _(x, packed, scales, zeros, group_size):
        return x.new_empty(x.shape[0], packed.shape[0])


def main() -> None:
    """Build now (`make install` runs this); exits non-zero where the build fails."""
    if not load():
        sys.exit("herd: the CPU kernels did not build (see the warning above)")
    print(f"herd CPU kernels built: {isa()}")
