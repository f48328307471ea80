"""herd's C++ int8/int4 CPU kernels against a float64 reference, on every instruction-set body
this machine can run (AVX-512, AVX2, scalar), and as the layers' default path (eager and
compiled)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from herd.quantize import kernels
from herd.quantize.int4 import Int4Linear
from herd.quantize.int8 import Int8Linear

pytestmark = pytest.mark.skipif(not kernels.load(), reason="the C++ kernels did not build")

EPS32 = 2.0**-24

# Output widths off the 4-row tile, inputs off the 16/8-lane vectors and off whole int4
# groups; batches 1-8 cover the 4-row activation tile and its remainders.
CASES = """
import json, sys, torch
from herd.quantize import kernels
from herd.quantize.int4 import Int4Linear
from herd.quantize.int8 import Int8Linear

def worst(y, x, w):
    x64, w64 = x.double(), w.double()
    ref = x64 @ w64.T
    # float32 summation: each partial sum rounds once per term
    bound = (x.shape[1] + 4) * 2.0**-24 * (x64.abs() @ w64.abs().T) + 1e-30
    return ((y.double() - ref).abs() / bound).max().item()

g = torch.Generator().manual_seed(0)
out = {"isa": kernels.isa(), "int8": 0.0, "int4": 0.0}
for n, k in [(1, 16), (7, 100), (48, 96), (193, 577), (256, 1536)]:
    layer = Int8Linear.from_weight(torch.randn(n, k, generator=g))
    for m in range(1, 9):
        x = torch.randn(m, k, generator=g)
        y = kernels.int8_mm(x, layer.qweight, layer.scales)
        out["int8"] = max(out["int8"], worst(y, x, layer.dequantize()))
for n, k, group in [(5, 32, 32), (48, 72, 32), (33, 200, 64), (64, 576, 128), (16, 300, 256)]:
    layer = Int4Linear.from_weight(torch.randn(n, k, generator=g), group)
    for m in (1, 2, 3, 4, 5, 8):
        x = torch.randn(m, k, generator=g)
        y = kernels.int4_mm(x, layer.qweight, layer.scales, layer.zeros, group)
        out["int4"] = max(out["int4"], worst(y, x, layer.dequantize()))
print(json.dumps(out))
"""


def supported_isas() -> list[str]:
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    isas = ["scalar"]
    if " avx2 " in flags and " fma " in flags:
        isas.append("avx2")
    if " avx512f " in flags and " avx512bw " in flags:
        isas.append("avx512")
    return isas


@pytest.mark.parametrize("isa", supported_isas())
def test_kernels_within_float32_rounding_of_float64(isa):
    env = os.environ | {"HERD_CPU_ISA": isa}
    run = subprocess.run(
        [sys.executable, "-c", CASES],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["isa"] == isa
    # error over the float32 rounding bound, worst case over every shape and batch size
    assert result["int8"] <= 1.0, result
    assert result["int4"] <= 1.0, result


def test_layers_route_small_batches_through_the_kernels():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 200, generator=g)
    for layer, direct in [
        (Int8Linear.from_weight(w), lambda lyr, x: kernels.int8_mm(x, lyr.qweight, lyr.scales)),
        (
            Int4Linear.from_weight(w, 64),
            lambda lyr, x: kernels.int4_mm(x, lyr.qweight, lyr.scales, lyr.zeros, 64),
        ),
    ]:
        x = torch.randn(3, 2, 200, generator=g)  # 6 rows: the kernel
        assert torch.equal(layer(x), direct(layer, x.reshape(6, 200)).reshape(3, 2, 40))
        bf = layer(x.bfloat16())
        assert bf.dtype == torch.bfloat16
        prefill = torch.randn(kernels.MAX_ROWS + 1, 200, generator=g)  # dequantize + GEMM
        ref = prefill.double() @ layer.dequantize().double().T
        assert torch.allclose(layer(prefill).double(), ref, rtol=1e-4, atol=1e-4)


def test_compiled_layers_call_the_kernels():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 128, generator=g)
    layers = torch.nn.Sequential(Int8Linear.from_weight(w), Int4Linear.from_weight(w.T, 32))
    x = torch.randn(2, 128, generator=g)
    compiled = torch.compile(layers, fullgraph=True, dynamic=False)
    with torch.no_grad():
        assert torch.allclose(compiled(x), layers(x), rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_problem():
    layer = Int8Linear.from_weight(torch.randn(8, 32))
    with pytest.raises(RuntimeError, match="x has 16 columns, the weight 32"):
        kernels.int8_mm(torch.randn(1, 16), layer.qweight, layer.scales)
    with pytest.raises(RuntimeError, match="weight must be 2-D int8"):
        kernels.int8_mm(torch.randn(1, 32), layer.qweight.float(), layer.scales)
    int4 = Int4Linear.from_weight(torch.randn(8, 64), 32)
    with pytest.raises(RuntimeError, match="group_size must be a power of two from 32"):
        kernels.int4_mm(torch.randn(1, 64), int4.qweight, int4.scales, int4.zeros, 16)
    with pytest.raises(RuntimeError, match="scales and zeros must be float32"):
        kernels.int4_mm(torch.randn(1, 64), int4.qweight, int4.scales[:, :1], int4.zeros, 32)
