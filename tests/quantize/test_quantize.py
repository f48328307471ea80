"""Weight-only quantization: rounding, kernels against a float64 reference, models, save/load,
perplexity of the real SmolLM2 at each precision."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import herd
from herd import kernels
from herd.quantize import (
    ACTIVATION_SCALE_UB,
    Fp8Linear,
    Int4Linear,
    Int8Linear,
    load_quantized,
    perplexity,
    quantize_model,
    quantized_modules,
    save_quantized,
    set_kernels,
)
from herd.quantize.fp8 import FP8_MAX, quantize_fp8_rows
from herd.quantize.int4 import W4A8Linear, quantize_int4, round_to_range
from herd.quantize.int8 import W8A8Linear, quantize_int8
from herd.quantize.perplexity import compare_precisions, shakespeare_text

EPS32 = torch.finfo(torch.float32).eps / 2  # unit roundoff u of float32


def linear(n_out: int, n_in: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out, bias=False)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
        layer.weight[0] = 0.0  # an all-zero row must not divide by zero
        layer.weight[1, :8] = 0.7  # an outlier widens one row's (and one group's) step
    return layer


def inputs(n_in: int, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(2, 5, n_in)


def assert_matmul_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y against x @ w.T in float64. Any float32 summation order of K products is within
    (K + 2) u * sum|x_i w_i| of the exact result (the +2 covers rounding the scale products);
    a bf16 output adds one bf16 rounding, 2^-8 relative."""
    x64, w64 = x.double(), w.double()
    ref = x64 @ w64.T
    bound = (x.shape[-1] + 2) * EPS32 * (x64.abs() @ w64.abs().T)
    if y.dtype == torch.bfloat16:
        bound = bound + 2.0**-8 * ref.abs()
    err = (y.double() - ref).abs()
    assert (err <= bound + 1e-30).all(), f"max error {err.max():.3g}, bound {bound.max():.3g}"


# --- rounding --------------------------------------------------------------------------------


def test_int8_rounding_within_half_a_step():
    w = linear(48, 96).weight
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (q.double() * scales.double()[:, None] - w.double()).abs()
    assert (err <= scales.double()[:, None] / 2 * (1 + 1e-6)).all()
    assert (q[0] == 0).all()


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_min_max_rounding_within_half_a_step(group_size):
    w = linear(48, 256).weight
    grouped = w.reshape(48, -1, group_size)
    q, scales, zeros = round_to_range(grouped, grouped.amin(-1), grouped.amax(-1))
    assert q.min() >= 0 and q.max() <= 15
    deq = (q.double() - 8) * scales.double()[..., None]
    err = (deq + zeros.double()[..., None] - grouped.double()).abs()
    # zero = min + 8 * scale is rounded once to float32, hence the absolute slack.
    slack = 4 * EPS32 * grouped.double().abs().amax(-1, keepdim=True)
    assert (err <= scales.double()[..., None] / 2 * (1 + 1e-6) + slack).all()
    # min/max rounding uses all 16 levels in every group that is not constant
    assert (q.amax(-1)[1:] == 15).all()


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_clipping_search_beats_min_max(group_size):
    """Per group, the searched codes and refitted scale/zero never do worse than min/max
    rounding, the refit is the float64 least-squares solution for its codes, and on Gaussian
    weights with outliers the total squared error drops."""
    w = linear(48, 256).weight
    w64 = w.double().reshape(48, -1, group_size)
    q, scales, zeros = quantize_int4(w, group_size)
    c = q.double().reshape(w64.shape) - 8
    err = ((c * scales.double()[..., None] + zeros.double()[..., None]) - w64).square().sum(-1)

    q0, s0, z0 = round_to_range(w64.float(), w64.float().amin(-1), w64.float().amax(-1))
    deq0 = (q0.double() - 8) * s0.double()[..., None] + z0.double()[..., None]
    err0 = (deq0 - w64).square().sum(-1)
    assert (err <= err0 * (1 + 1e-5) + 1e-12).all()
    assert err.sum() < 0.95 * err0.sum()

    design = torch.stack([c, torch.ones_like(c)], dim=-1)  # w ≈ c * scale + zero
    solution = torch.linalg.lstsq(design, w64[..., None]).solution[..., 0]
    varying = c.std(-1) > 0
    torch.testing.assert_close(scales.double()[varying], solution[..., 0][varying])
    torch.testing.assert_close(zeros.double()[varying], solution[..., 1][varying])


def test_fp8_weight_rounding_and_activation_bound():
    w = linear(32, 64).weight
    codes, scales = quantize_fp8_rows(w)
    deq = codes.double() * scales.double()
    # e4m3 keeps 3 mantissa bits: half an ulp is 2^-4 relative, or half the smallest
    # subnormal step 2^-9 (in units of the row's scale) near zero.
    bound = 2.0**-4 * w.double().abs() + 2.0**-10 * scales.double()
    assert ((deq - w.double()).abs() <= bound).all()
    x = torch.tensor([[5000.0, 1.0, -3.0], [2.0, -1.0, 0.5]])
    xq, xs = quantize_fp8_rows(x, ACTIVATION_SCALE_UB)
    assert xs[0, 0] == pytest.approx(ACTIVATION_SCALE_UB / FP8_MAX)  # clamped amax
    assert xq[0, 0].float() == FP8_MAX  # the outlier saturates
    assert xs[1, 0] == pytest.approx(2.0 / FP8_MAX)  # below the bound: the row's own amax


# --- kernels against the float64 reference ----------------------------------------------------


def kernel_operands(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the fused CPU kernels multiply: activations, scales and zeros rounded to bf16."""
    bf = torch.bfloat16
    if isinstance(layer, Int8Linear):
        w = layer.qweight.double() * layer.scales.to(bf).double()[:, None]
    else:
        n = layer.out_features
        codes = layer.codes().double().reshape(n, -1, layer.group_size) - 8
        w = codes * layer.scales.to(bf).double()[..., None] + layer.zeros.to(bf).double()[..., None]
        w = w.reshape(n, -1)[:, : layer.in_features]
    return x.to(bf).double(), w


def assert_kernel_close(y: torch.Tensor, x: torch.Tensor, layer: nn.Module) -> None:
    """y against the float64 product of the kernel's bf16 operands: float32 accumulation, one
    possible bf16 rounding of each dequantized weight (2^-8 relative), and a bf16 output."""
    x64, w64 = kernel_operands(layer, x)
    ref = x64 @ w64.T
    mags = x64.abs() @ w64.abs().T
    bound = ((x.shape[-1] + 2) * EPS32 + 2.0**-8) * mags + 2.0**-8 * ref.abs()
    err = (y.double() - ref).abs()
    assert (err <= bound + 1e-30).all(), f"max error {err.max():.3g}, bound {bound.max():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_matches_reference(dtype):
    layer = Int8Linear.from_weight(linear(48, 96).weight)
    assert layer.use_kernel  # the default
    x = inputs(96).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 5, 48)
    assert_kernel_close(y, x, layer)
    layer.use_kernel = False  # the float32 fallback is exact up to summation order
    assert_matmul_close(layer(x), x.float(), layer.dequantize())


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_matches_reference(group_size, dtype):
    layer = Int4Linear.from_weight(linear(48, 256).weight, group_size)
    assert layer.packed_for_kernel() is not None  # 48 outputs: the CPU kernel applies
    x = inputs(256).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    assert_kernel_close(y, x, layer)
    layer.use_kernel = False
    assert_matmul_close(layer(x), x.float(), layer.dequantize())


@pytest.mark.parametrize("use_kernel", [True, False])
def test_fp8_linear_matches_reference(use_kernel):
    layer = Fp8Linear.from_weight(linear(48, 96).weight)
    layer.use_kernel = use_kernel
    x = inputs(96)
    x[0, 0, 0] = 4000.0  # beyond the activation bound
    xq, xs = quantize_fp8_rows(x, ACTIVATION_SCALE_UB)
    assert_matmul_close(layer(x), (xq.float() * xs), layer.dequantize())


@pytest.mark.parametrize("use_kernel", [True, False])
def test_w8a8_linear_matches_integer_products(use_kernel):
    layer = W8A8Linear.from_weight(linear(48, 96).weight)
    layer.use_kernel = use_kernel
    x = inputs(96)
    x[1, 2] *= 50.0  # one loud token: per-token scales keep the others' resolution
    # float64 reference: each token rounded to int8 on its own scale, exact integer products
    rows = x.reshape(-1, 96).double()
    x_scales = rows.abs().amax(-1) / 127
    xq = torch.round(rows / x_scales[:, None]).clamp(-127, 127)
    ref = (xq @ layer.qweight.double().T) * x_scales[:, None] * layer.scales.double()
    y = layer(x)
    assert y.shape == (2, 5, 48)
    assert torch.allclose(y.double().reshape(-1, 48), ref, rtol=1e-5, atol=1e-6)
    small = layer(x[:1, :4])  # 4 rows: a decode-sized batch, herd's kernel where it is built
    assert torch.allclose(small.double().reshape(-1, 48), ref[:4], rtol=1e-5, atol=1e-6)
    # activation rounding shows: not the weight-only layer's output
    weight_only = Int8Linear(layer.qweight, layer.scales)
    weight_only.use_kernel = False
    assert not torch.allclose(y, weight_only(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("group_size", [32, 64])
def test_w4a8_linear_matches_chunked_int8_activations(use_kernel, group_size):
    layer = W4A8Linear.from_weight(linear(48, 100).weight, group_size)
    layer.use_kernel = use_kernel
    x = inputs(100)
    x[1, 2, :32] *= 50.0  # one loud chunk: per-chunk scales keep the rest of the row's resolution
    # float64 reference: each chunk of 32 inputs rounded to int8 on its own scale (the last
    # chunk zero-padded), times the dequantized int4 weight
    rows = torch.nn.functional.pad(x.reshape(-1, 100).double(), (0, 28)).reshape(-1, 4, 32)
    scales = rows.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(rows / scales).clamp(-127, 127)
    ref = (xq * scales).reshape(-1, 128)[:, :100] @ layer.dequantize().double().T
    y = layer(x)
    assert y.shape == (2, 5, 48)
    assert torch.allclose(y.double().reshape(-1, 48), ref, rtol=1e-5, atol=1e-5)
    # activation rounding shows: not the weight-only layer's output
    weight_only = Int4Linear(layer.qweight, layer.scales, layer.zeros, 100, group_size)
    weight_only.use_kernel = False
    assert not torch.allclose(y, weight_only(x), rtol=1e-5, atol=1e-5)


def test_int4_shapes_outside_the_kernel():
    # 24 outputs (not a multiple of 16) fall back to dequantize-and-matmul; 72 inputs are not a
    # multiple of the group, so the last group is zero-padded.
    layer = Int4Linear.from_weight(linear(24, 72).weight, 32)
    assert layer.packed_for_kernel() is None
    assert layer.dequantize().shape == (24, 72) and layer.scales.shape == (24, 3)
    x = inputs(72)
    assert_matmul_close(layer(x), x, layer.dequantize())
    padded = Int4Linear.from_weight(linear(32, 72).weight, 32)  # kernel with padded inputs
    assert padded.packed_for_kernel() is not None
    assert_kernel_close(padded(x), x, padded)


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="group_size"):
        Int4Linear.from_weight(linear(32, 64).weight, 48)
    with pytest.raises(ValueError, match="unknown quantization method"):
        quantize_model(nn.Sequential(), "int3")
    with pytest.raises(ValueError, match="bias"):
        model = herd.Transformer(tiny_config())
        model.layers["0"].attention.wq = nn.Linear(64, 64, bias=True)
        quantize_model(model, "int8")
    with pytest.raises(ValueError, match="only 2, so nothing would be quantized"):
        quantize_model(herd.Transformer(tiny_config()), "fp8-mixed")


# --- whole models ----------------------------------------------------------------------------


def tiny_config(tied: bool = False) -> herd.ModelConfig:
    return herd.ModelConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, ffn_hidden_dim=160,
        tie_word_embeddings=tied,
    )  # fmt: skip


def tiny_model(tied: bool = False) -> herd.Transformer:
    model = herd.Transformer(tiny_config(tied)).eval()
    model.init_weights(seed=0, std=0.1)  # larger than the default so that every weight matters
    return model


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


# Random Gaussian weights are the worst case for 4 bits: a step of ~range/15 is ~0.3 sigma, i.e.
# ~9% noise per weight, compounding over the layers; int8 and fp8 add ~0.5% and ~3%.
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(
    ("method", "group_size", "min_corr"),
    [
        ("int8", 128, 0.999),
        ("w8a8", 128, 0.995),
        ("int4", 32, 0.95),
        ("int4", 128, 0.95),
        ("w4a8", 32, 0.95),
        ("fp8", 128, 0.99),
    ],
)
def test_quantized_model_logits_close(tied, method, group_size, min_corr):
    model = tiny_model(tied)
    tokens = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(tokens)
        quantized = quantize_model(copy.deepcopy(model), method, group_size)
        out = quantized(tokens)
    names = {name for name, _ in quantized_modules(quantized)}
    # Every block linear and the head; a tied head is a quantized copy of the embedding.
    assert len(names) == 2 * 7 + 1 and "output" in names
    assert isinstance(quantized.tok_embeddings, nn.Embedding)
    assert torch.equal(quantized.tok_embeddings.weight, model.tok_embeddings.weight)
    assert correlation(out, ref) > min_corr


def fp8_round_trip64(t: torch.Tensor, upper_bound: float | None = None) -> torch.Tensor:
    """Row-wise e4m3 quantize-dequantize in float64, as the paper's recipe (and fbgemm's
    `quantize_fp8_per_row`) defines it: scale = min(amax, bound) / 448, values saturate."""
    amax = t.abs().amax(-1, keepdim=True)
    if upper_bound is not None:
        amax = amax.clamp(max=upper_bound)
    scale = (amax / 448.0).clamp(min=1e-12)
    return (t / scale).clamp(-448, 448).to(torch.float8_e4m3fn).double() * scale


@pytest.mark.parametrize("tied", [False, True])
def test_fp8_mixed_is_the_papers_recipe(tied):
    """fp8-mixed quantizes the feed-forward layers of blocks 1..n-2 only (weights row-wise,
    activations per token with amax clamped to 1200); checked against a float64 forward of
    the float model whose inner FFNs round their inputs and weights the same way."""
    config = herd.ModelConfig(
        dim=64, n_layers=5, n_heads=4, n_kv_heads=2, vocab_size=320, ffn_hidden_dim=160,
        tie_word_embeddings=tied,
    )  # fmt: skip
    model = herd.Transformer(config).eval()
    model.init_weights(seed=3, std=0.1)
    quantized = quantize_model(copy.deepcopy(model), "fp8-mixed")
    names = sorted(name for name, _ in quantized_modules(quantized))
    assert names == sorted(
        f"layers.{i}.feed_forward.{w}" for i in (1, 2, 3) for w in ("w1", "w2", "w3")
    )
    for name, module in quantized.named_modules():
        if name.startswith(("layers.0.", "layers.4.")) or ".attention." in name or name == "output":
            assert not isinstance(module, Fp8Linear), name

    reference = copy.deepcopy(model).double()

    def fp8_ffn(ffn: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = fp8_round_trip64(args[0], ACTIVATION_SCALE_UB)
        w1, w2, w3 = (fp8_round_trip64(w.weight) for w in (ffn.w1, ffn.w2, ffn.w3))
        h = torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)
        return fp8_round_trip64(h, ACTIVATION_SCALE_UB) @ w2.T

    for i in (1, 2, 3):
        reference.layers[str(i)].feed_forward.register_forward_hook(fp8_ffn)
    tokens = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out, ref, plain = quantized(tokens), reference(tokens), model(tokens)
        full_fp8 = quantize_model(copy.deepcopy(model), "fp8")(tokens)
    # Where float32 and float64 land on opposite sides of an fp8 rounding boundary, a code
    # differs by one step and its token's row by ~1e-3; elsewhere the two agree to float32
    # rounding. Leaving any one rounding out of the reference gives a median near 4e-3.
    err = (out.double() - ref).abs() / ref.abs().max()
    assert err.median() < 1e-6 and err.mean() < 1e-4, (err.median(), err.mean())
    # Fewer quantized layers, closer to the float model than fp8 everywhere.
    assert (out - plain).abs().mean() < (full_fp8 - plain).abs().mean()


@pytest.mark.parametrize(("method", "group_size"), [("int8", 128), ("int4", 32), ("w4a8", 32)])
def test_model_kernels_match_fallback(method, group_size):
    model = quantize_model(tiny_model(), method, group_size)
    # 2 x 4 tokens: every layer sees 8 rows, a batch the kernels take.
    tokens = torch.randint(0, 320, (2, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fused = model(tokens)
        fallback = set_kernels(model, False)(tokens)
    # herd's float32 kernels (or torch's bf16 ones where they did not build) against the
    # float32 dequantize-and-matmul fallback, through two blocks.
    assert correlation(fused, fallback) > 0.9999
    assert (fused - fallback).abs().max() < 0.02 * fallback.abs().max()
    if kernels.load():
        assert (fused - fallback).abs().max() < 1e-4 * fallback.abs().max()


@pytest.mark.parametrize(
    ("method", "group_size"),
    [("int8", 128), ("w8a8", 128), ("int4", 64), ("w4a8", 64), ("fp8", 128), ("fp8-mixed", 128)],
)
def test_save_load_round_trip(tmp_path: Path, method, group_size):
    model = herd.Transformer(dataclasses.replace(tiny_config(), n_layers=3)).eval()
    model.init_weights(seed=0, std=0.1)
    model = quantize_model(model, method, group_size)
    files = save_quantized(model, tmp_path / "q")
    assert sorted(f.name for f in files) == [
        "config.json",
        "model.safetensors",
        "quantization_config.json",
    ]
    qconfig = json.loads((tmp_path / "q" / "quantization_config.json").read_text())
    assert qconfig["method"] == method
    loaded = load_quantized(tmp_path / "q")
    tokens = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    assert loaded.config == model.config


def test_load_quantized_rejects_plain_directories(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="not a quantized checkpoint"):
        load_quantized(tmp_path)


def test_cli_quantize(hf_dir: Path, tmp_path: Path):
    import typer
    from typer.testing import CliRunner

    from herd.cli.quantize import quantize

    app = typer.Typer()
    app.command()(quantize)
    app.command("noop")(lambda: None)  # two commands keep `quantize` as a subcommand
    runner = CliRunner()
    dst = tmp_path / "out"
    result = runner.invoke(app, ["quantize", str(hf_dir), str(dst), "--method", "int4"])
    assert result.exit_code == 0, result.output
    model = load_quantized(dst)
    layers = dict(quantized_modules(model))
    assert isinstance(layers.pop("output"), Int8Linear)  # int4 models keep an int8 head
    assert layers and all(isinstance(m, Int4Linear) for m in layers.values())
    assert runner.invoke(app, ["quantize", str(hf_dir), str(dst)]).exit_code == 1  # exists
    forced = ["quantize", str(hf_dir), str(dst), "--method", "fp8", "--force"]
    assert runner.invoke(app, forced).exit_code == 0
    bad = runner.invoke(app, ["quantize", str(hf_dir), str(tmp_path / "x"), "--method", "int2"])
    assert bad.exit_code == 1


# --- perplexity ------------------------------------------------------------------------------


class UniformModel(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.calls: list[int] = []

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls.append(tokens.shape[1])
        return torch.zeros(*tokens.shape, self.vocab)


@pytest.mark.parametrize(("n", "seq_len", "stride"), [(100, 32, None), (100, 32, 8), (33, 32, 32)])
def test_perplexity_scores_every_token_once(n, seq_len, stride):
    model = UniformModel(50)
    result = perplexity(model, torch.arange(n) % 50, seq_len=seq_len, stride=stride)
    assert result.tokens == n - 1
    assert result.value == pytest.approx(50.0)
    assert max(model.calls) <= seq_len


def test_smollm2_perplexity_by_precision(smollm2_path):
    """Issue bar on 1,024 tokens of The Tempest (two 512-token windows): int8 within +1% of
    fp32, int4 within +5%, each through the default path (float32 activations) and with a
    quantized output head. Per-channel int8 costs this model +0.7-1.0% (1,024 to 2,048
    tokens): one window alone is too small a sample to hold the bar reliably.

    The embedded SmolLM2 GGUF is itself Q4_1 (min/max 4-bit in blocks of 32) with a Q8_0
    embedding, so its block weights already lie on a 16-level grid per 32 inputs: int4 at the
    default group 32 reproduces them, and what this measures for int4 is the int8 head. Groups of 64 or 128 re-round across two Q4_1 blocks and miss the bar
    (+31% and +59%, benchmarks/perplexity.py).
    """
    model = herd.load_model("smollm2", dtype=torch.float32).eval()
    tokenizer = herd.load_tokenizer("smollm2")
    ids = torch.tensor(tokenizer.encode(shakespeare_text("tempest_gut.txt"), bos=False)[:1024])
    results = compare_precisions(model, ids, ["fp32", "int8", "int4"], seq_len=512)
    ppl = {r.spec: r.perplexity.value for r in results}
    assert all(r.perplexity.tokens == 1023 for r in results)
    assert 1.0 < ppl["fp32"] < 100.0
    assert ppl["int8"] != ppl["fp32"]  # the int8 grid differs from Q4_1's: a real measurement
    assert ppl["int8"] <= ppl["fp32"] * 1.01, ppl
    assert ppl["int4"] <= ppl["fp32"] * 1.05, ppl
