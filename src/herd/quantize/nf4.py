"""NF4 with double quantisation (Dettmers et al. 2023, QLoRA), for frozen base weights.

Weights are cut into blocks of 64 along the flattened tensor; each block is divided by its
absolute maximum and every value becomes the index of the nearest of the 16 NF4 levels (the
quantiles of a standard normal, rescaled to [-1, 1]), two indices per byte. The block maxima are
quantised too ("double quantisation"): their mean is subtracted, then they are rounded to int8
in blocks of 256 with one scale per block. Indices are chosen with the exact maxima; weights are
rebuilt with the int8 ones, as torchao's NF4Tensor does (the tests compare the two bit for bit).
A last scaler block may be short, so any weight whose size is a multiple of 64 quantises.

Stored, a weight takes 4 bits, plus 8 bits per 64 weights and one float per 16,384: 0.26 of
its bf16 size.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

# The NF4 levels at the four decimals torchao and the QLoRA paper's listing give.
NF4_LEVELS = (
    -1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
    0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0,
)  # fmt: skip
BLOCK = 64
SCALER_BLOCK = 256
_CHUNK = 1 << 20  # values compared with the 16 levels at once


class NF4Weight:
    """A quantised weight: packed 4-bit indices and double-quantised block scales."""

    def __init__(self, weight: torch.Tensor, block: int = BLOCK, scaler_block: int = SCALER_BLOCK):
        if weight.numel() % block or weight.numel() % 2:
            raise ValueError(
                f"NF4 needs a weight whose size is a multiple of the block ({block}); "
                f"{tuple(weight.shape)} has {weight.numel()} values"
            )
        self.shape, self.dtype = weight.shape, weight.dtype
        self.block, self.scaler_block = block, scaler_block
        flat = weight.detach().reshape(-1)
        levels = torch.tensor(NF4_LEVELS, dtype=weight.dtype, device=weight.device)
        absmax = flat.view(-1, block).abs().max(dim=1).values
        scaled = (flat.view(-1, block) / absmax[:, None]).reshape(-1)
        index = torch.empty(flat.numel(), dtype=torch.uint8, device=weight.device)
        for start in range(0, flat.numel(), _CHUNK):
            part = scaled[start : start + _CHUNK]
            index[start : start + _CHUNK] = (part[:, None] - levels).abs().argmin(dim=1)
        self.packed = index[::2] << 4 | index[1::2]
        self.scalers, self.factors, self.mean = _double_quantize(absmax, scaler_block)

    def block_scales(self) -> torch.Tensor:
        """The blocks' maxima as rebuilt from their int8 form."""
        n = self.scalers.numel()
        factors = self.factors.repeat_interleave(self.scaler_block)[:n]
        return (self.scalers / factors).to(self.dtype) + self.mean

    def dequantize(self) -> torch.Tensor:
        levels = torch.tensor(NF4_LEVELS, dtype=self.dtype, device=self.packed.device)
        index = torch.stack([self.packed >> 4, self.packed & 0xF], dim=1).reshape(-1).long()
        values = levels[index].view(-1, self.block) * self.block_scales()[:, None]
        return values.reshape(self.shape)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scalers, self.factors))


def _double_quantize(
    absmax: torch.Tensor, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 block maxima (after subtracting their mean), the per-block factor, the mean."""
    mean = absmax.mean()
    centred = absmax - mean
    pad = -centred.numel() % block
    blocks = F.pad(centred, (0, pad)).view(-1, block)
    scale = blocks.abs().max(dim=1).values  # zero padding never raises a block's maximum
    factors = 256 / (2 * scale)
    quantised = (blocks * factors[:, None]).round().clamp(-128, 127).to(torch.int8)
    return quantised.reshape(-1)[: centred.numel()], factors, mean


class _NF4Matmul(torch.autograd.Function):
    """x W^T with W rebuilt from NF4 in the forward and again in the backward, so no full
    precision copy of W outlives the call. W is frozen: only x gets a gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Weight) -> torch.Tensor:
        ctx.weight = weight
        return F.linear(x, weight.dequantize().to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.weight.dequantize().to(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer (no bias) whose weight is held in NF4."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("NF4Linear takes linear layers without bias (as Llama's are)")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = NF4Weight(linear.weight.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NF4Matmul.apply(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"


def quantize_frozen_nf4(model: nn.Module, names: Iterable[str]) -> int:
    """Swap every `nn.Linear` (or LoRA layer's frozen base) whose attribute name is in `names`
    for an NF4Linear; returns the bytes the quantised weights take."""
    names, total = set(names), 0
    for module in list(model.modules()):
        for attr in names:
            child = getattr(module, attr, None)
            holder, key = (child, "base") if hasattr(child, "lora_A") else (module, attr)
            linear = getattr(holder, key, None)
            if isinstance(linear, nn.Linear):
                quantised = NF4Linear(linear)
                setattr(holder, key, quantised)
                total += quantised.weight.nbytes()
    return total
