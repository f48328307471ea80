"""NF4 with double quantisation against torchao's NF4Tensor (the QLoRA reference in PyTorch),
bit for bit; gradients through the frozen NF4 weight; the storage it takes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from herd.quantize.nf4 import NF4Linear, NF4Weight, quantize_frozen_nf4

torchao_nf4 = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(128, 512), (256, 256), (64, 1024)])
def test_nf4_equals_torchao_exactly(shape, dtype):
    torch.manual_seed(sum(shape))
    weight = (torch.randn(shape) * 0.05).to(dtype)
    weight[3, 7] = 0.9  # an outlier block
    ours = NF4Weight(weight)
    ref = torchao_nf4.to_nf4(weight, 64, 256)
    assert torch.equal(ours.packed, ref.quantized_data)
    assert torch.equal(ours.scalers, ref.quantized_scalers)
    assert torch.equal(ours.factors, ref.quantization_factor)
    assert torch.equal(ours.mean, ref.scaler_mean)
    assert torch.equal(ours.dequantize(), ref.get_original_weight())


def test_a_short_last_scaler_block_still_quantises():
    """SmolLM2's 576 x 576 makes 5,184 blocks of 64: not a multiple of 256 (torchao refuses)."""
    weight = torch.randn(576, 576) * 0.02
    restored = NF4Weight(weight).dequantize()
    blocks = weight.view(-1, 64)
    # one NF4 step is at most 0.33 of the block maximum; double quantisation adds ~1%
    step = (restored - weight).view(-1, 64).abs().max(dim=1).values
    assert (step <= 0.17 * blocks.abs().max(dim=1).values + 1e-4).all()
    assert F.cosine_similarity(restored.flatten(), weight.flatten(), dim=0) > 0.99


def test_gradients_flow_to_the_input_through_the_dequantised_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128, bias=False)
    nf4 = NF4Linear(linear)
    x = torch.randn(3, 5, 256, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    nf4(x).square().sum().backward()
    F.linear(x_ref, nf4.weight.dequantize()).square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    assert not any(p.requires_grad for p in nf4.parameters())


def test_quantised_weights_take_under_a_third_of_bf16():
    from herd.config import ModelConfig
    from herd.model import Transformer

    model = Transformer(ModelConfig(dim=256, n_layers=2, n_heads=4, vocab_size=512))
    linear = [
        m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.output
    ]
    bf16_bytes = sum(2 * m.weight.numel() for m in linear)
    nf4_bytes = quantize_frozen_nf4(model, ("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    assert not any(
        isinstance(m, torch.nn.Linear) and m is not model.output for m in model.modules()
    )
    assert nf4_bytes / bf16_bytes <= 0.27
