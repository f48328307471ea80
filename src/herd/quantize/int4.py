"""Int4 weight-only linear layers: asymmetric, one scale and zero point per group of inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from herd.quantize.base import DequantizingLinear

INT4_LEVELS = 15
# The CPU kernel dequantizes as (q - 8) * scale + zero; storing the zero in that form makes the
# stored tensors, the fallback and the kernel agree exactly.
INT4_MID = 8
GROUP_SIZES = (32, 64, 128, 256)


def check_group_size(group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {GROUP_SIZES}, got {group_size}")


def padded_in_features(in_features: int, group_size: int) -> int:
    """Inputs are zero-padded up to whole groups: a 576-wide layer works with group 128."""
    return -(-in_features // group_size) * group_size


def quantize_int4(
    weight: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> codes (out, in_padded) uint8 in [0, 15], float32 scales and
    zeros (out, groups) with `w ≈ (q - 8) * scale + zero` (min/max asymmetric rounding)."""
    check_group_size(group_size)
    n, k = weight.shape
    kp = padded_in_features(k, group_size)
    w = F.pad(weight.detach().float(), (0, kp - k)).reshape(n, kp // group_size, group_size)
    wmin, wmax = w.amin(dim=-1), w.amax(dim=-1)
    span = wmax - wmin
    # A constant group has span 0: any positive scale represents it exactly at q = 0.
    scales = torch.where(span > 0, span / INT4_LEVELS, torch.ones_like(span))
    zeros = wmin + INT4_MID * scales
    q = torch.round((w - zeros[..., None]) / scales[..., None]) + INT4_MID
    q = q.clamp(0, INT4_LEVELS).to(torch.uint8).reshape(n, kp)
    return q, scales, zeros


def dequantize_int4(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, in_features: int
) -> torch.Tensor:
    n, kp = q.shape
    groups = scales.shape[1]
    codes = q.float().reshape(n, groups, kp // groups) - INT4_MID
    w = codes * scales[..., None] + zeros[..., None]
    return w.reshape(n, kp)[:, :in_features]


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, k) codes in [0, 15] -> (n, k/2) bytes, even column in the low nibble. This is the
    portable storage layout; the CPU kernel's own layout is opaque and built from it on load."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


def kernel_supports(out_features: int, device: torch.device) -> bool:
    # _convert_weight_to_int4pack_for_cpu rejects N not divisible by 16 (checked in torch 2.13).
    return (
        device.type == "cpu"
        and hasattr(torch, "_weight_int4pack_mm_for_cpu")
        and out_features % 16 == 0
    )


class Int4Linear(DequantizingLinear):
    """y = x @ dequantized(W).T in float32, returned in x's dtype.

    With `use_kernel` set (see `set_kernels`), CPU inputs to a layer whose output width is a
    multiple of 16 go through the fused `torch._weight_int4pack_mm_for_cpu` kernel on a weight
    repacked on first use (a non-persistent buffer); otherwise the weight is dequantized and
    multiplied. Off by default: with torch 2.13 on an AVX-512 EPYC the kernel costs 1.6 ms per
    row for 576x1536, ~20x the fp32 GEMM, and dequantize-and-matmul wins at every batch size.
    """

    method = "int4"

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        in_features: int,
        group_size: int,
    ):
        super().__init__()
        check_group_size(group_size)
        n, half = qweight.shape
        kp = padded_in_features(in_features, group_size)
        if qweight.dtype != torch.uint8 or 2 * half != kp:
            raise ValueError(
                f"int4 weight must be uint8 of shape ({n}, {kp // 2}), got "
                f"{qweight.dtype} {tuple(qweight.shape)}"
            )
        if scales.shape != (n, kp // group_size) or zeros.shape != scales.shape:
            raise ValueError(f"int4 scales and zeros must have shape ({n}, {kp // group_size})")
        self.out_features, self.in_features, self.group_size = n, in_features, group_size
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        self.register_buffer("zeros", zeros.float().contiguous())
        # Built on first use: the kernel's own layout would double the weight's memory.
        self.register_buffer("kernel_weight", None, persistent=False)
        self.use_kernel = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> Int4Linear:
        q, scales, zeros = quantize_int4(linear.weight, group_size)
        return cls(pack_nibbles(q), scales, zeros, linear.in_features, group_size)

    def packed_for_kernel(self) -> torch.Tensor | None:
        """The weight in the CPU kernel's layout, or None where the kernel does not apply."""
        if not kernel_supports(self.out_features, self.qweight.device):
            return None
        if self.kernel_weight is None:
            codes = unpack_nibbles(self.qweight).to(torch.int32)
            self.kernel_weight = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        return self.kernel_weight

    def codes(self) -> torch.Tensor:
        return unpack_nibbles(self.qweight)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(self.codes(), self.scales, self.zeros, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k).float()
        kw = self.packed_for_kernel() if self.use_kernel else None
        if kw is not None and x.device.type == "cpu":
            kp = padded_in_features(k, self.group_size)
            x2 = F.pad(x2, (0, kp - k)).contiguous()
            # Kernel layout: (groups, N, 2) holding (scale, zero), float32 like the activations.
            scales_zeros = torch.stack([self.scales.t(), self.zeros.t()], dim=-1).contiguous()
            y = torch._weight_int4pack_mm_for_cpu(x2, kw, self.group_size, scales_zeros)
        else:
            y = F.linear(x2, self.dequantize())
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}"
        )
