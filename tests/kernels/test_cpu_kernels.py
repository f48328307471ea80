"""herd's C++ CPU kernels (float32, int8 and int4 products, decode attention) against float64 references,
on every instruction-set body this machine can run (AVX-512, AVX2, scalar), and as the layers'
and the compiled decode step's default path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from herd import kernels
from herd.quantize.int4 import Int4Linear, W4A8Linear, dequantize_activations
from herd.quantize.int8 import Int8Linear

pytestmark = pytest.mark.skipif(not kernels.load(), reason="the C++ kernels did not build")

EPS32 = 2.0**-24

# Output widths off the 4-row tile, inputs off the 16/8-lane vectors and off whole int4
# groups; batches 1-8 cover the 4-row activation tile and its remainders.
CASES = """
import json, sys, torch
import torch.nn.functional as F
from herd import kernels
from herd.quantize.int4 import Int4Linear, W4A8Linear, dequantize_activations
from herd.quantize.int8 import Int8Linear

def worst(y, x, w):
    x64, w64 = x.double(), w.double()
    ref = x64 @ w64.T
    # float32 summation: each partial sum rounds once per term
    bound = (x.shape[1] + 4) * 2.0**-24 * (x64.abs() @ w64.abs().T) + 1e-30
    return ((y.double() - ref).abs() / bound).max().item()

g = torch.Generator().manual_seed(0)
out = {"isa": kernels.isa(), "float": 0.0, "int8": 0.0, "int4": 0.0, "w4a8": 0.0, "attention": 0.0,
       "int8_int8_exact": True}
for n, k in [(1, 16), (7, 100), (48, 96), (193, 577), (256, 1536), (4, 3)]:
    w = torch.randn(n, k, generator=g)
    for m in [*range(1, 10), 32]:
        x = torch.randn(m, k, generator=g)
        out["float"] = max(out["float"], worst(kernels.float_mm(x, w), x, w))
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
# w8a8's integer products, exact: inputs off the 64/32-byte steps, every int8 weight value
for n, k in [(1, 16), (7, 100), (48, 96), (193, 577), (9, 130)]:
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    for m in range(1, 10):
        x = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
        exact = torch.equal(kernels.int8_int8_mm(x, q), (x.long() @ q.long().T).int())
        out["int8_int8_exact"] = out["int8_int8_exact"] and exact
# w4a8: chunk counts off the 4-chunk block (1, 3, 7, 18), inputs padded to whole groups
for n, k, group in [(5, 32, 32), (48, 72, 32), (33, 200, 64), (64, 576, 128), (16, 300, 256),
                    (1536, 576, 32)]:
    layer = W4A8Linear.from_weight(torch.randn(n, k, generator=g), group)
    for m in (1, 2, 3, 4, 5, 8):
        x = torch.randn(m, k, generator=g)
        y = kernels.w4a8_mm(x, layer.qweight, layer.scales, layer.zeros, layer.group_size)
        seen = dequantize_activations(x, layer.qweight.shape[1] * 2)[:, :k]
        out["w4a8"] = max(out["w4a8"], worst(y, seen, layer.dequantize()))
# Decode attention: head widths off the 16/8 lanes (40, 24), slots off the 64-slot chunk,
# grouped and plain heads, random holes in the mask, a mask shared by the batch, key/value
# rows strided inside a wider buffer, a single valid slot.
for b, h, kv, s, d, live, shared in [(1, 9, 3, 1024, 64, 600, False), (2, 8, 2, 100, 128, 77, False),
                                     (3, 4, 4, 70, 24, 70, True), (1, 32, 8, 130, 128, 1, False),
                                     (2, 6, 3, 200, 40, 129, False)]:
    q = torch.randn(b, h, 1, d, generator=g)
    wide = torch.randn(2, b, kv, s, d + 8, generator=g)
    k, v = wide[0, ..., :d] * 3, wide[1, ..., :d]
    if live % 2 == 0:  # the other cases keep the rows strided inside the wider buffer
        k, v = k.contiguous(), v.contiguous()
    valid = torch.rand(1 if shared else b, 1, 1, s, generator=g) < 0.8
    valid[..., live:] = False
    valid[..., live - 1] = True
    y = kernels.decode_attention(q, k, v, valid)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                         attn_mask=valid, enable_gqa=True)
    err = ((y.double() - ref).abs().max() / v.abs().max()).item()
    out["attention"] = max(out["attention"], err)
# A paged pool as every row's keys (expanded, batch stride 0), each row's slots scattered
# over it, and a row with no valid slot (its output is 0)
pool = torch.randn(2, 1, 2, 3000, 64, generator=g)
for b in (1, 3):
    q = torch.randn(b, 6, 1, 64, generator=g)
    k, v = (t.expand(b, -1, -1, -1) for t in pool)
    valid = torch.zeros(b, 1, 1, 3000, dtype=torch.bool)
    for r in range(b):
        valid[r, 0, 0, torch.randperm(3000, generator=g)[: 1 + 150 * r]] = True
    y = kernels.decode_attention(q, k, v, valid)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                         attn_mask=valid, enable_gqa=True)
    err = ((y.double() - ref).abs().max() / v.abs().max()).item()
    out["attention"] = max(out["attention"], err)
empty = kernels.decode_attention(q, k, v, torch.zeros(3, 1, 1, 3000, dtype=torch.bool))
out["empty_row_zero"] = bool((empty == 0).all())
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
    assert result["float"] <= 1.0, result
    assert result["int8"] <= 1.0, result
    assert result["int4"] <= 1.0, result
    assert result["w4a8"] <= 1.0, result
    assert result["int8_int8_exact"], result
    # float32 scores, exp and sums over up to 600 slots, relative to the largest value
    assert result["attention"] <= 1e-5, result
    assert result["empty_row_zero"], result


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
    # w4a8: the kernel for small batches; prefill multiplies the same quantized activations
    layer = W4A8Linear.from_weight(w, 64)
    x = torch.randn(6, 200, generator=g)
    direct = kernels.w4a8_mm(x, layer.qweight, layer.scales, layer.zeros, layer.group_size)
    assert torch.equal(layer(x), direct)
    prefill = torch.randn(kernels.MAX_ROWS + 1, 200, generator=g)
    ref = dequantize_activations(prefill, 256)[:, :200].double() @ layer.dequantize().double().T
    assert torch.allclose(layer(prefill).double(), ref, rtol=1e-4, atol=1e-4)


def test_compiled_layers_call_the_kernels():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 128, generator=g)
    layers = torch.nn.Sequential(
        Int8Linear.from_weight(w),
        Int4Linear.from_weight(w.T, 32),
        W4A8Linear.from_weight(w, 64),
    )
    x = torch.randn(2, 128, generator=g)
    compiled = torch.compile(layers, fullgraph=True, dynamic=False)
    with torch.no_grad():
        assert torch.allclose(compiled(x), layers(x), rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_problem():
    with pytest.raises(RuntimeError, match="x must be a 2-D float32 CPU tensor with 32 columns"):
        kernels.float_mm(torch.randn(2, 31), torch.randn(8, 32))
    with pytest.raises(RuntimeError, match="weight must be a 2-D float32 CPU tensor"):
        kernels.float_mm(torch.randn(2, 32), torch.randn(8, 32).double())
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
    with pytest.raises(RuntimeError, match=r"activations must lie in \[-127, 127\]"):
        kernels.int8_int8_mm(torch.full((1, 32), -128, dtype=torch.int8), layer.qweight)
    with pytest.raises(RuntimeError, match="x must be 2-D int8 with 32 columns"):
        kernels.int8_int8_mm(torch.zeros(1, 32), layer.qweight)
    w4a8 = W4A8Linear.from_weight(torch.randn(8, 64), 64)
    with pytest.raises(RuntimeError, match="scales and zeros must be float32"):
        kernels.w4a8_mm(torch.randn(1, 64), w4a8.qweight, w4a8.scales, w4a8.zeros, 32)
    with pytest.raises(RuntimeError, match="group_size must be a power of two from 32"):
        kernels.w4a8_mm(torch.randn(1, 64), w4a8.qweight, w4a8.scales, w4a8.zeros, 48)
    with pytest.raises(RuntimeError, match="x has 65 columns, the weight holds 64"):
        kernels.w4a8_mm(torch.randn(1, 65), w4a8.qweight, w4a8.scales, w4a8.zeros, 64)
    with pytest.raises(RuntimeError, match="valid must be a bool mask"):
        kernels.decode_attention(
            torch.randn(1, 4, 1, 16), *torch.randn(2, 1, 2, 10, 16), torch.ones(1, 9, dtype=bool)
        )
    with pytest.raises(RuntimeError, match="6 query heads of width 16 over 4"):
        kernels.decode_attention(
            torch.randn(1, 6, 1, 16), *torch.randn(2, 1, 4, 10, 16), torch.ones(1, 10, dtype=bool)
        )
