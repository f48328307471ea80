"""What every weight-only quantized linear layer shares."""

from __future__ import annotations

import torch
from torch import nn


class DequantizingLinear(nn.Module):
    """A quantized linear layer that can give back its float weight."""

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float32 weight, for code that reads `.weight` instead of calling the
        module (Transformer.output_weight does, for the untied output head)."""
        return self.dequantize()
