"""FP8 (e4m3) linear layers: row-wise weight scales and dynamic row-wise activation scales.

This is how the Llama 3 paper serves 405B: weights are scaled per output row, activations per
token at run time, and each token's scale is computed from its absolute maximum clamped to an
upper bound so that a few outlier tokens cannot flatten everyone else's precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from herd.quantize.base import DequantizingLinear

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
# Meta's fbgemm path (llama-models `fp8_activation_scale_ub`) clamps each token's amax to 1200;
# larger values saturate at ±448 in fp8 rather than widening the step for the whole row.
ACTIVATION_SCALE_UB = 1200.0
# Keeps the scale of an all-zero row positive (the division stays finite).
MIN_SCALE = 1e-12


def quantize_fp8_rows(
    t: torch.Tensor, upper_bound: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise (last dim) fp8 quantization: returns codes and float32 scales of shape
    (..., 1) with `t ≈ codes * scale`; `upper_bound` clamps each row's amax first."""
    tf = t.float()
    amax = tf.abs().amax(dim=-1, keepdim=True)
    if upper_bound is not None:
        amax = amax.clamp(max=upper_bound)
    scales = (amax / FP8_MAX).clamp(min=MIN_SCALE)
    codes = (tf / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scales


def dequantize_fp8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return codes.float() * scales


def scaled_mm_supported(x: torch.Tensor, out_features: int) -> bool:
    """torch._scaled_mm needs an fp8-capable GPU (sm_89+) and widths divisible by 16."""
    if x.device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return (
        torch.cuda.get_device_capability(x.device) >= (8, 9)
        and x.shape[-1] % 16 == 0
        and out_features % 16 == 0
    )


class Fp8Linear(DequantizingLinear):
    """y = dequant(q(x)) @ dequant(W).T with x quantized per token at run time.

    On a CUDA device with fp8 support `torch._scaled_mm` does the matmul with row-wise scales
    (output in bf16 when the input is, else float32); everywhere else it is emulated in
    float32 from the same fp8 codes, so the numerics are testable on CPU.
    """

    method = "fp8"

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        activation_scale_ub: float = ACTIVATION_SCALE_UB,
    ):
        super().__init__()
        if qweight.dtype != FP8_DTYPE or qweight.dim() != 2:
            raise ValueError(f"fp8 weight must be a 2-D {FP8_DTYPE} tensor, got {qweight.dtype}")
        if scales.numel() != qweight.shape[0]:
            raise ValueError(f"fp8 scales must have {qweight.shape[0]} entries")
        self.out_features, self.in_features = qweight.shape
        self.activation_scale_ub = activation_scale_ub
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.float().reshape(-1).contiguous())
        self.use_kernel = True

    @classmethod
    def from_weight(cls, weight: torch.Tensor, group_size: int | None = None) -> Fp8Linear:
        codes, scales = quantize_fp8_rows(weight.detach())
        return cls(codes, scales.reshape(-1))

    def dequantize(self) -> torch.Tensor:
        return dequantize_fp8(self.qweight, self.scales[:, None])

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_fp8_rows(x, self.activation_scale_ub)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        xq, x_scales = self.quantize_input(x.reshape(-1, k))
        if self.use_kernel and scaled_mm_supported(x, self.out_features):
            out_dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
            y = torch._scaled_mm(
                xq,
                self.qweight.t(),
                scale_a=x_scales,
                scale_b=self.scales[None, :],
                out_dtype=out_dtype,
            )
        else:
            y = F.linear(dequantize_fp8(xq, x_scales), self.dequantize())
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"activation_scale_ub={self.activation_scale_ub}"
        )
