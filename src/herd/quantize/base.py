"""What every weight-only quantized linear layer shares."""

from __future__ import annotations

import torch
from torch import nn

# The activation dtype of the fused CPU int8/int4 kernels: they vectorise only for 16-bit
# activations, and bfloat16 keeps float32's range.
KERNEL_DTYPE = torch.bfloat16


class DequantizingLinear(nn.Module):
    """A quantized linear layer that can give back its float weight."""

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError
