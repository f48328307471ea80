"""The compiled decode path: its single-query ops against float64 references, and compiled
greedy generation on a padded batch against each prompt's full forward pass (no cache)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import herd
from herd import kernels
from herd.infer import SamplingParams, decode_steps
from herd.infer.compile import (
    DecodeOps,
    KernelOps,
    compiled_step,
    few_query_attention,
    one_query_attention,
    slot_bucket,
)
from herd.quantize import quantize_model, set_kernels
from tests.conftest import hf_llama

GREEDY = SamplingParams(temperature=0)


def test_one_query_attention_matches_float64_softmax():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 1, 16, generator=gen)
    k, v = torch.randn(2, 3, 2, 40, 16, generator=gen)
    mask = torch.rand(3, 1, 1, 40, generator=gen) > 0.3
    mask[..., 0] = True
    out = one_query_attention(q, k, v, mask)
    # float64 reference: every query head h reads key/value head h // 4
    kk, vv = (t.double().repeat_interleave(4, dim=1) for t in (k, v))
    scores = (q.double() @ kk.transpose(-1, -2)) / 4.0
    scores = scores.masked_fill(~mask, float("-inf"))
    ref = scores.softmax(-1) @ vv
    assert out.shape == (3, 8, 1, 16)
    assert (out.double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("mask_shape", [(1, 1, 5, 40), (5, 40), (1, 1, 1, 40)])
def test_few_queries_of_one_sequence_attend_like_float64_softmax(mask_shape):
    if not kernels.load():
        pytest.skip("herd's CPU kernels did not build")
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 5, 8, 16, generator=gen).transpose(1, 2)  # (1, h, n, d) as the model has it
    k, v = torch.randn(2, 1, 2, 40, 16, generator=gen)
    mask = torch.rand(*mask_shape, generator=gen) > 0.4
    mask[..., 3] = True
    with KernelOps():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    kk, vv = (t.double().repeat_interleave(4, dim=1) for t in (k, v))
    scores = (q.double() @ kk.transpose(-1, -2)) / 4.0
    ref = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vv
    assert out.shape == (1, 8, 5, 16)
    assert (out.double() - ref).abs().max() < 1e-5
    assert torch.equal(out, few_query_attention(q, k, v, mask))  # routed to herd's kernel


def test_kernel_ops_route_small_float32_products_to_herds_kernel():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(24, 40, generator=gen)
    small, large = torch.randn(2, 3, 40, generator=gen), torch.randn(kernels.FLOAT_MAX_ROWS + 1, 40)
    trained = torch.randn(2, 40, requires_grad=True)
    with KernelOps():
        few, many = F.linear(small, w), F.linear(large, w)
        with_bias = F.linear(small, w, torch.ones(24))
        grad = F.linear(trained, w)
    ref = small.double() @ w.double().T
    assert few.shape == (2, 3, 24) and (few.double() - ref).abs().max() < 1e-5
    if kernels.load():
        assert torch.equal(few, kernels.float_mm(small.reshape(6, 40), w).view(2, 3, 24))
    assert torch.equal(many, F.linear(large, w))  # prefill-sized: torch's GEMM
    assert torch.allclose(with_bias, F.linear(small, w) + 1, atol=1e-6)
    assert grad.requires_grad  # autograd: torch's op, which has a backward


def test_decode_ops_fuse_one_row_and_send_more_rows_to_the_kernel():
    gen = torch.Generator().manual_seed(1)
    w, x1, x4 = torch.randn(24, 40, generator=gen), torch.randn(1, 1, 40), torch.randn(4, 40)
    with DecodeOps():
        one, many = F.linear(x1, w), F.linear(x4, w)
        bf_one, bf_many = (
            F.linear(x1.bfloat16(), w.bfloat16()),
            F.linear(x4.bfloat16(), w.bfloat16()),
        )
    ref = x1.double() @ w.double().T
    assert (one.double() - ref).abs().max() < 1e-5
    expected = kernels.float_mm(x4, w) if kernels.load() else F.linear(x4, w)
    assert torch.equal(many, expected)
    # bfloat16: one row as a float32 multiply-and-sum, more rows torch's own product
    assert bf_one.dtype == torch.bfloat16
    assert (bf_one.double() - x1.bfloat16().double() @ w.bfloat16().double().T).abs().max() < 0.1
    assert torch.equal(bf_many, F.linear(x4.bfloat16(), w.bfloat16()))


def test_decode_ops_attention_runs_herds_kernel_for_float32():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 6, 1, 32, generator=gen)
    k, v = torch.randn(2, 2, 3, 50, 32, generator=gen)
    mask = torch.rand(2, 1, 1, 50, generator=gen) > 0.5
    mask[..., 7] = True
    with DecodeOps():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        bf = F.scaled_dot_product_attention(
            q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=mask, enable_gqa=True
        )
    if kernels.load():
        assert torch.equal(out, kernels.decode_attention(q, k, v, mask))
    assert torch.allclose(out, one_query_attention(q, k, v, mask), atol=1e-5)
    assert bf.dtype == torch.bfloat16  # other dtypes: the inductor formulation


def test_compiled_step_follows_the_model_it_was_made_for(tmp_path):
    """Dynamo's guards on the module tree are skipped (herd.infer.compile): two models of one
    structure with different weights, and one model whose layers change, must each run their
    own weights and layers."""
    hf_llama(n_kv_heads=2, n_heads=4).save_pretrained(tmp_path)
    first, second = herd.load_model(tmp_path).eval(), herd.load_model(tmp_path).eval()
    with torch.no_grad():
        for p in second.parameters():
            p.mul_(-1.5)
    step = compiled_step(first)
    assert compiled_step(first) is step and compiled_step(second) is not step
    prompt = [[3, 14, 15, 92, 65]]
    for model in (first, second, quantize_model(first, "int8")):
        steps = list(decode_steps(model, prompt, 6, GREEDY, compile=True))
        new = [s.tokens[0] for s in steps]
        with torch.inference_mode():
            logits = model(torch.tensor([prompt[0] + new]))[0, len(prompt[0]) - 1 : -1]
        assert new == logits.argmax(-1).tolist()
    assert compiled_step(first) is not step  # quantizing changed its structure


def test_slot_buckets_are_powers_of_two():
    assert [slot_bucket(n) for n in (1, 256, 257, 700, 1024)] == [256, 256, 512, 1024, 1024]


def test_compiled_greedy_padded_batch_matches_full_forward(tmp_path):
    """One compilation (batch 3) of a random GQA model, in float32 and quantized to int8 and
    int4 (their packed kernels as opaque ops inside the graph). Each row's greedy tokens must be the argmax of a full forward
    pass (no cache) over its own prompt and tokens: padding and the static cache change
    nothing, and the compiled step agrees with the uncompiled model."""
    hf_llama(n_kv_heads=2, n_heads=8).save_pretrained(tmp_path)
    float_model = herd.load_model(tmp_path).eval()
    int8_model = quantize_model(herd.load_model(tmp_path), "int8")
    int4_model = quantize_model(herd.load_model(tmp_path), "int4")
    batch = [[5, 17, 200, 3, 99, 41, 7], [250], [8, 8, 8, 8]]
    cases = [(m, batch, True) for m in (float_model, int8_model, int4_model)]
    # One int8 row compiles to a fused float32 pass over the int8 weight: with the (bf16)
    # kernels off for the prefill too, the reference is the float32 dequantized forward.
    cases.append((int8_model, [[5, 17, 200, 3]], False))
    for model, prompts, use_kernels in cases:
        set_kernels(model, use_kernels)
        steps = list(decode_steps(model, prompts, 10, GREEDY, logprobs=True, compile=True))
        for row, prompt in enumerate(prompts):
            new = [s.tokens[row] for s in steps]
            with torch.inference_mode():
                logits = model(torch.tensor([prompt + new]))[0, len(prompt) - 1 : -1]
            assert new == logits.argmax(-1).tolist()
            expected = logits.log_softmax(-1).gather(-1, torch.tensor(new)[:, None])[:, 0]
            ours = torch.tensor([s.logprobs[row] for s in steps])
            assert (ours - expected).abs().max().item() <= 1e-3
