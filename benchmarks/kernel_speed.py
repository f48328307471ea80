"""herd's CPU kernels against torch's own ops at decode sizes, one product at a time.

    python benchmarks/kernel_speed.py [--threads 2] [--rows 1,2,4,8]

For the weight shapes of SmolLM2-135M (576 wide, 1536 FFN, 49152 vocabulary) and of Llama
3.2 1B (2048 wide, 8192 FFN), and each batch of rows: microseconds per product and the weight
bytes streamed per second, for herd's float32 kernel (`kernels.float_mm`) against torch's
`F.linear` (its BLAS GEMM), herd's int8 kernel against torch's `_weight_int8pack_mm`, and
herd's int4 and w4a8 kernels against torch's `_weight_int4pack_mm_for_cpu` on the same
group-32 weights. The best of five timed loops, after a warm-up; a small weight stays in the
caches between calls, so its bytes/s can exceed the DRAM bandwidth. Each herd result is checked
against the float64 product of the same dequantized weight (for w4a8, and the dequantized
int8 activations) before it is timed.

(Not named kernels.py: run as a script, that name would shadow the `kernels` package that
transformers imports.)
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from herd import kernels
from herd.quantize.int4 import Int4Linear, W4A8Linear, dequantize_activations
from herd.quantize.int8 import Int8Linear

SHAPES = {
    "smollm2 wq/wo": (576, 576),
    "smollm2 w1/w3": (1536, 576),
    "smollm2 w2": (576, 1536),
    "smollm2 head": (49152, 576),
    "1b w1/w3": (8192, 2048),
    "1b w2": (2048, 8192),
}


def best_us(fn, loops: int = 30) -> float:
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        best = min(best, (time.perf_counter() - start) / loops)
    return best * 1e6


def checked(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    ref = x.double() @ weight.double().T
    err = (got.double() - ref).abs().max() / ref.abs().max()
    if err > 1e-5:
        raise AssertionError(f"relative error {err:.1e} against float64")


def torch_int4(layer: Int4Linear):
    """torch's packed int4 CPU product on the same codes, scales and zeros, as Int4Linear
    calls it where herd's kernels are not built."""
    weight, scales_zeros = layer.packed_for_kernel()
    return lambda x: torch._weight_int4pack_mm_for_cpu(
        x.bfloat16(), weight, layer.group_size, scales_zeros
    )


def rows_for(name: str, n: int, k: int, m: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(m, k, generator=g)
    out = []

    def row(kind: str, bytes_: int, ours, theirs, peer: str) -> None:
        a, b = best_us(ours), best_us(theirs)
        out.append(
            f"| {name} | {n}x{k} | {m} | {kind} | {a:.1f} | {bytes_ / a / 1e3:.1f} | {peer} "
            f"| {b:.1f} | {b / a:.2f}x |"
        )

    checked(kernels.float_mm(x, w), x, w)
    row("float32", 4 * n * k, lambda: kernels.float_mm(x, w), lambda: F.linear(x, w), "F.linear")
    int8 = Int8Linear.from_weight(w)
    checked(kernels.int8_mm(x, int8.qweight, int8.scales), x, int8.dequantize())
    row(
        "int8",
        n * k,
        lambda: kernels.int8_mm(x, int8.qweight, int8.scales),
        lambda: torch._weight_int8pack_mm(x.bfloat16(), int8.qweight, int8.scales.bfloat16()),
        "_weight_int8pack_mm (bf16)",
    )
    int4 = Int4Linear.from_weight(w, 32)
    args4 = (int4.qweight, int4.scales, int4.zeros, 32)
    checked(kernels.int4_mm(x, *args4), x, int4.dequantize())
    theirs4 = torch_int4(int4)
    row(
        "int4-g32",
        n * k // 2,
        lambda: kernels.int4_mm(x, *args4),
        lambda: theirs4(x),
        "_weight_int4pack_mm (bf16)",
    )
    w4a8 = W4A8Linear.from_weight(w, 32)
    args = (w4a8.qweight, w4a8.scales, w4a8.zeros, 32)
    seen = dequantize_activations(x, w4a8.qweight.shape[1] * 2)[:, :k]
    checked(kernels.w4a8_mm(x, *args), seen, w4a8.dequantize())
    row(
        "w4a8",
        n * k // 2,
        lambda: kernels.w4a8_mm(x, *args),
        lambda: theirs4(x),
        "_weight_int4pack_mm (bf16)",
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,2,4,8")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.load():
        raise SystemExit("herd's CPU kernels did not build: nothing to compare")
    print(f"herd kernels: {kernels.isa()}, {args.threads} threads")
    print(
        "| weight | N x K | rows | herd kernel | herd us | herd GB/s | torch op | torch us | speed-up |"
    )
    print("|---|---|---:|---|---:|---:|---|---:|---:|")
    with torch.inference_mode():
        for name, (n, k) in SHAPES.items():
            for m in (int(r) for r in args.rows.split(",")):
                for line in rows_for(name, n, k, m):
                    print(line, flush=True)


if __name__ == "__main__":
    main()
