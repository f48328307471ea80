"""Int8 weight-only linear layers: symmetric, one scale per output channel."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from herd import kernels
from herd.quantize.base import KERNEL_DTYPE, DequantizingLinear

INT8_MAX = 127


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> int8 codes and float32 per-row scales, `w ≈ q * scale`."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    # An all-zero row gets scale 1 so the division stays finite; its codes are all zero anyway.
    scales = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(w / scales[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales[:, None]


@torch.library.custom_op("herd::int8_weight_mm", mutates_args=())
def int8_weight_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch._weight_int8pack_mm(x, qweight, scales)


@int8_weight_mm.register_fake
def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], qweight.shape[0])


def _has_int8_kernel(device: torch.device) -> bool:
    return device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm")


class Int8Linear(DequantizingLinear):
    """y = x @ (q * scale).T, returned in x's dtype.

    By default (`use_kernel`, see `set_kernels`) CPU batches of up to `kernels.MAX_ROWS` rows go
    through herd's own kernel (`herd.kernels`): float32 activations, each int8 weight
    widened in registers, one pass over the weight. Where that kernel is not built they go
    through torch's `_weight_int8pack_mm` with activations and scales rounded to bfloat16 (it
    vectorises only for 16-bit activations). Larger batches (prefill), and other devices,
    dequantize the weight and multiply in float32, exactly.
    """

    method = "int8"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2:
            raise ValueError(f"int8 weight must be a 2-D int8 tensor, got {qweight.dtype}")
        if scales.shape != (qweight.shape[0],):
            raise ValueError(f"int8 scales must have shape ({qweight.shape[0]},)")
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        self.use_kernel = True
        if self.qweight.device.type == "cpu":
            kernels.load()

    @classmethod
    def from_weight(cls, weight: torch.Tensor, group_size: int | None = None) -> Int8Linear:
        return cls(*quantize_int8(weight))

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        small = self.use_kernel and x2.shape[0] <= kernels.MAX_ROWS
        if small and kernels.available(x.device):
            y = kernels.int8_mm(x2, self.qweight, self.scales)
        elif torch.compiler.is_compiling() and x2.shape[0] == 1:
            # Without herd's kernel: herd.infer.compile's DecodeOps turns this one-row product
            # into one fused pass over the int8 weight, 1.4x torch's kernel (SmolLM2).
            y = F.linear(x2.float(), self.dequantize())
        elif small and _has_int8_kernel(x.device):
            x2 = x2.to(KERNEL_DTYPE).contiguous()
            # Under torch.compile the kernel is wrapped as an opaque custom op: inductor's own
            # lowering of it fails (torch 2.13) on computed inputs.
            mm = int8_weight_mm if torch.compiler.is_compiling() else torch._weight_int8pack_mm
            y = mm(x2, self.qweight, self.scales.to(KERNEL_DTYPE))
        else:
            y = F.linear(x2.float(), self.dequantize())
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _has_int_mm(device: torch.device) -> bool:
    return device.type in ("cpu", "cuda") and hasattr(torch, "_int_mm")


class W8A8Linear(Int8Linear):
    """Int8 weights (one scale per output channel) times int8 activations, quantized per token
    as they arrive (symmetric, one scale per row): the dynamic activation quantization of
    Llama 3.2's quantized releases. The integer products accumulate in int32 (`use_kernel`):
    through herd's byte-dot-product kernel for CPU batches of up to `kernels.MAX_ROWS` rows,
    else `torch._int_mm` where it exists; otherwise in float32, which is exact while a row's
    sum of products stays under 2**24."""

    method = "w8a8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        xq, x_scales = quantize_int8(x.reshape(-1, k))
        small = xq.shape[0] <= kernels.MAX_ROWS
        if self.use_kernel and small and kernels.available(x.device):
            products = kernels.int8_int8_mm(xq, self.qweight).float()
        elif self.use_kernel and _has_int_mm(x.device):
            products = torch._int_mm(xq, self.qweight.t()).float()
        else:
            products = xq.float() @ self.qweight.float().t()
        y = products * x_scales[:, None] * self.scales
        return y.reshape(*lead, self.out_features).to(x.dtype)
