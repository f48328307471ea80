"""Int4 linear layers: asymmetric weights, one scale and zero point per group of inputs; weight-only
(int4) or with activations quantized to int8 as they arrive (w4a8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from herd import kernels
from herd.quantize.base import KERNEL_DTYPE, DequantizingLinear

INT4_LEVELS = 15
# The CPU kernel dequantizes as (q - 8) * scale + zero; storing the zero in that form makes the
# stored tensors, the fallback and the kernel agree exactly.
INT4_MID = 8
GROUP_SIZES = (32, 64, 128, 256)
# llama.cpp's Q4 block size. Larger groups cost quality: on SmolLM2 (itself Q4_1, blocks of
# 32) perplexity rises +31% at 64 and +59% at 128 (benchmarks/perplexity.py).
DEFAULT_GROUP_SIZE = 32


def check_group_size(group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {GROUP_SIZES}, got {group_size}")


def padded_in_features(in_features: int, group_size: int) -> int:
    """Inputs are zero-padded up to whole groups: a 576-wide layer works with group 128."""
    return -(-in_features // group_size) * group_size


# Shrinking a group's [min, max] range clips its outliers but rounds the rest more finely; the
# ratio with the least squared error is kept per group (the clipping search of AWQ/llama.cpp).
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(10))


def quantize_int4(
    weight: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> codes (out, in_padded) uint8 in [0, 15], float32 scales and
    zeros (out, groups) with `w ≈ (q - 8) * scale + zero`.

    Per group, each range in `CLIP_RATIOS` of [min, max] is rounded, then the scale and zero
    are refitted to the codes by least squares; the candidate with the smallest squared error
    wins. Ratio 1.0 alone is plain min/max rounding (`round_to_range`)."""
    check_group_size(group_size)
    n, k = weight.shape
    kp = padded_in_features(k, group_size)
    w = F.pad(weight.detach().float(), (0, kp - k)).reshape(n, kp // group_size, group_size)
    wmin, wmax = w.amin(dim=-1), w.amax(dim=-1)
    best_err = torch.full_like(wmin, float("inf"))
    best_q = torch.empty(w.shape, dtype=torch.uint8)
    best_scales, best_zeros = torch.empty_like(wmin), torch.empty_like(wmin)
    for ratio in CLIP_RATIOS:
        q, _, _ = round_to_range(w, wmin * ratio, wmax * ratio)
        scales, zeros = least_squares_fit(w, q)
        err = ((q.float() - INT4_MID) * scales[..., None] + zeros[..., None] - w).square().sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_q = torch.where(better[..., None], q, best_q)
        best_scales = torch.where(better, scales, best_scales)
        best_zeros = torch.where(better, zeros, best_zeros)
    return best_q.reshape(n, kp), best_scales, best_zeros


def round_to_range(
    w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grouped w (..., group) onto 16 levels spanning [lo, hi] per group: codes, scales, zeros."""
    span = hi - lo
    # A constant group has span 0: any positive scale represents it exactly at q = 0.
    scales = torch.where(span > 0, span / INT4_LEVELS, torch.ones_like(span))
    zeros = lo + INT4_MID * scales
    q = torch.round((w - zeros[..., None]) / scales[..., None]) + INT4_MID
    return q.clamp(0, INT4_LEVELS).to(torch.uint8), scales, zeros


def least_squares_fit(w: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and zero minimising |(q - 8) * scale + zero - w|² per group, given the codes."""
    c = q.float() - INT4_MID
    c_mean, w_mean = c.mean(-1), w.mean(-1)
    cc = c - c_mean[..., None]
    var = cc.square().sum(-1)
    # All codes equal: the best fit is the group mean, with any scale.
    scales = torch.where(var > 0, (cc * w).sum(-1) / var.clamp(min=1e-30), torch.ones_like(var))
    return scales, w_mean - scales * c_mean


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


@torch.library.custom_op("herd::int4_weight_mm", mutates_args=())
def int4_weight_mm(
    x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_zeros: torch.Tensor
) -> torch.Tensor:
    return torch._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_zeros)


@int4_weight_mm.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_zeros: torch.Tensor):
    return x.new_empty(x.shape[0], scales_zeros.shape[1])


class Int4Linear(DequantizingLinear):
    """y = x @ dequantized(W).T, returned in x's dtype.

    By default (`use_kernel`, see `set_kernels`) CPU batches of up to `kernels.MAX_ROWS` rows go
    through herd's own kernel, which reads the portable nibbles directly with float32
    activations. Where that kernel is not built, layers whose output width is a multiple of 16
    use torch's `_weight_int4pack_mm_for_cpu` with activations, scales and zeros rounded to
    bfloat16 (see `Int8Linear`), on a weight repacked on first use. Larger batches (prefill),
    and other devices, dequantize the weight and multiply in float32, exactly.
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
        # The kernel's layout, built on first use (non-persistent: saved checkpoints hold the
        # portable nibbles only).
        self.register_buffer("kernel_weight", None, persistent=False)
        self.register_buffer("kernel_scales_zeros", None, persistent=False)
        self.use_kernel = True
        if self.qweight.device.type == "cpu":
            kernels.load()

    @classmethod
    def from_weight(cls, weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> Int4Linear:
        q, scales, zeros = quantize_int4(weight, group_size)
        return cls(pack_nibbles(q), scales, zeros, weight.shape[1], group_size)

    def packed_for_kernel(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The weight, and (groups, N, 2) scales and zeros, in the CPU kernel's layout; None
        where the kernel does not apply."""
        if not kernel_supports(self.out_features, self.qweight.device):
            return None
        if self.kernel_weight is None:
            codes = unpack_nibbles(self.qweight).to(torch.int32)
            self.kernel_weight = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
            pairs = torch.stack([self.scales.t(), self.zeros.t()], dim=-1)
            self.kernel_scales_zeros = pairs.to(KERNEL_DTYPE).contiguous()
        return self.kernel_weight, self.kernel_scales_zeros

    def codes(self) -> torch.Tensor:
        return unpack_nibbles(self.qweight)

    def dequantize(self) -> torch.Tensor:
        return dequantize_int4(self.codes(), self.scales, self.zeros, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        small = self.use_kernel and x2.shape[0] <= kernels.MAX_ROWS
        if small and kernels.available(x.device):
            y = kernels.int4_mm(x2, self.qweight, self.scales, self.zeros, self.group_size)
        elif small and x.device.type == "cpu" and (packed := self.packed_for_kernel()):
            kp = padded_in_features(k, self.group_size)
            x2 = F.pad(x2.to(KERNEL_DTYPE), (0, kp - k)).contiguous()
            # Opaque to torch.compile, as in Int8Linear: inductor's own lowering of this kernel
            # runs ~2x slower on 8 rows (torch 2.13).
            mm = (
                int4_weight_mm
                if torch.compiler.is_compiling()
                else torch._weight_int4pack_mm_for_cpu
            )
            y = mm(x2, packed[0], self.group_size, packed[1])
        else:
            y = F.linear(x2.float(), self.dequantize())
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}"
        )


# w4a8 quantizes activations per chunk of this many inputs (llama.cpp's Q8 block size).
ACTIVATION_CHUNK = 32


def quantize_activations(x: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) float -> int8 codes (M, width) and float32 scales (M, width / 32), symmetric per
    chunk of 32 inputs (zero-padded to `width`): x ≈ codes * scale. herd's w4a8 kernel does
    the same float32 operations, so both paths see the same codes."""
    m = x.shape[0]
    chunks = F.pad(x.float(), (0, width - x.shape[1])).reshape(m, -1, ACTIVATION_CHUNK)
    amax = chunks.abs().amax(dim=-1)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    codes = torch.round(chunks * inv[..., None]).clamp(-127, 127).to(torch.int8)
    return codes.reshape(m, width), amax / 127


def dequantize_activations(x: torch.Tensor, width: int) -> torch.Tensor:
    """x as w4a8 sees it: quantized per 32 inputs and back, float32 (M, width)."""
    codes, scales = quantize_activations(x, width)
    m = x.shape[0]
    return (codes.float().reshape(m, -1, ACTIVATION_CHUNK) * scales[..., None]).reshape(m, width)


class W4A8Linear(Int4Linear):
    """y = dequantized(x) @ dequantized(W).T: int4 weights as `Int4Linear`'s, times activations
    quantized to int8 per chunk of 32 inputs as they arrive (`quantize_activations`), the
    dynamic activation quantization of Llama 3.2's quantized releases and of llama.cpp's Q4
    dot products.

    CPU batches of up to `kernels.MAX_ROWS` rows run herd's byte-dot-product kernel (integer
    products exact, the scaling in float32); larger batches and other devices compute the same
    product from the dequantized tensors in float32.
    """

    method = "w4a8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        if self.use_kernel and x2.shape[0] <= kernels.MAX_ROWS and kernels.available(x.device):
            y = kernels.w4a8_mm(x2, self.qweight, self.scales, self.zeros, self.group_size)
        else:
            kp = padded_in_features(k, self.group_size)
            y = F.linear(dequantize_activations(x2, kp)[:, :k], self.dequantize())
        return y.reshape(*lead, self.out_features).to(x.dtype)
