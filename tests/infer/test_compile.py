"""The compiled decode path: its single-query ops against float64 references, and compiled
greedy generation on a padded batch against each prompt's full forward pass (no cache)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import herd
from herd.infer import SamplingParams, decode_steps
from herd.infer.compile import DecodeOps, one_query_attention, slot_bucket
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


def test_decode_ops_rewrite_only_single_rows():
    gen = torch.Generator().manual_seed(1)
    w, x1, x4 = torch.randn(24, 40, generator=gen), torch.randn(1, 1, 40), torch.randn(4, 40)
    with DecodeOps():
        one, many = F.linear(x1, w), F.linear(x4, w)
        bf = F.linear(x1.bfloat16(), w.bfloat16())
    ref = x1.double() @ w.double().T
    assert (one.double() - ref).abs().max() < 1e-5
    assert torch.equal(many, F.linear(x4, w))  # more than one row: the BLAS path
    assert bf.dtype == torch.bfloat16


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
    for model, prompts, kernels in cases:
        set_kernels(model, kernels)
        steps = list(decode_steps(model, prompts, 10, GREEDY, logprobs=True, compile=True))
        for row, prompt in enumerate(prompts):
            new = [s.tokens[row] for s in steps]
            with torch.inference_mode():
                logits = model(torch.tensor([prompt + new]))[0, len(prompt) - 1 : -1]
            assert new == logits.argmax(-1).tolist()
            expected = logits.log_softmax(-1).gather(-1, torch.tensor(new)[:, None])[:, 0]
            ours = torch.tensor([s.logprobs[row] for s in steps])
            assert (ours - expected).abs().max().item() <= 1e-3
