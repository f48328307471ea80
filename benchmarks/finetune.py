"""Fine-tuning speed and memory: `herd finetune` vs transformers + PEFT in a plain torch loop.

    python benchmarks/finetune.py [--models smollm2,llama3.2-1b] [--methods full,lora,qlora]
                                  [--steps 4] [--warmup 1] [--seq-len 256] [--batch 4]
                                  [--threads N] [--workdir out/bench-finetune]

Models: the real SmolLM2-135M-Instruct (embedded GGUF, read by each engine's own loader), and a
random llama3.2-1b-shaped model (written once by transformers into the workdir; its full
fine-tune needs ~20 GB of AdamW state and is left out unless asked for). The data: unit-
conversion dialogs (herd.finetune.tasks), encoded by the model's chat format with the
assistant-only loss mask and packed into rows of --seq-len by herd; both engines consume the
same rows in the same order, fp32, with --threads threads, each run in a fresh process.

- herd: `FineTuner` from a recipe dict, timed per `train_step()`;
- peer: `LlamaForCausalLM` (sdpa) with PEFT's `get_peft_model` (r 16, alpha 32, all seven
  linear layers) for LoRA, or bare for full fine-tuning: forward with the rows' per-document
  `position_ids` and `use_cache=False` (transformers then masks attention per document),
  F.cross_entropy over the masked targets, backward, clip_grad_norm_(1.0), torch AdamW.
  PEFT's QLoRA needs bitsandbytes' 4-bit kernels (CUDA), so QLoRA has no peer here; its row
  reports herd's NF4 weight memory against the bf16 size of the same weights.

Before any step is timed the peer's first loss must equal herd's within 1e-4 (relative), or
that run stops with an error. Reported: tokens per step / median step time, peak RSS, and
for QLoRA the quantised weights' bytes over their bf16 bytes (goal <= 0.35).

Measured on this project's 2-core AVX2 machine (fp32, 4 x 256 tokens per step):

    model        method  herd tok/s  peer tok/s  speed-up  herd RSS MiB  peer RSS MiB  NF4/bf16
    smollm2      full           154         122     1.26x         4,080         4,646         -
    smollm2      lora           222         151     1.47x         3,252         4,216         -
    smollm2      qlora          217           -         -         2,712             -     0.258
    llama3.2-1b  lora            26          23     1.12x        10,519        12,399         -
    llama3.2-1b  qlora           19           -         -        10,950             -     0.258

Most of herd's lead is the output layer run only at trained positions (about 7% of a row in
these dialogs): a larger share of a 135M model's work than of a 1B one's. QLoRA's peak RSS is
not below LoRA's on the CPU: the base is read in fp32 before its layers are quantised.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from worker import peak_rss_mib, report, run_worker

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def recipe(job: dict) -> dict:
    return {
        "finetune": {"base": job["base"], "method": job["method"], "overflow": "drop"},
        "lora": {"rank": 16, "alpha": 32, "targets": TARGETS},
        "data": {"sources": [{"path": job["data"]}], "tokenizer": job.get("tokenizer")},
        "batch": {"seq_len": job["seq_len"], "batch_size": job["batch"]},
        "optim": {"lr": 1e-4, "warmup_steps": 0, "steps": 100_000, "schedule": "constant"},
        "run": {"dir": job["run_dir"], "precision": "fp32", "threads": job["threads"]},
    }


def prepare(workdir: Path, models: list[str]) -> dict[str, dict]:
    """The dialog file, and each model's checkpoint path and tokenizer."""
    from herd.config.embedded import embedded_path
    from herd.finetune.tasks import unit_conversions, write_dialogs

    data = write_dialogs(unit_conversions(3000, seed=0), workdir / "units.jsonl")
    found = {}
    for name in models:
        if name == "smollm2":
            found[name] = {"base": str(embedded_path("smollm2")), "tokenizer": None}
        elif name == "llama3.2-1b":
            found[name] = {"base": str(random_llama32_1b(workdir)), "tokenizer": "llama3"}
        else:
            sys.exit(f"--models: {name!r} is not smollm2 or llama3.2-1b")
        found[name]["data"] = str(data)
    return found


def random_llama32_1b(workdir: Path) -> Path:
    """A randomly initialised Llama 3.2 1B (its published shape), written once by transformers."""
    out = workdir / "llama3.2-1b-random"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from herd.config.model import preset

    c = preset("llama3.2-1b")
    config = LlamaConfig(
        hidden_size=c.dim,
        intermediate_size=c.ffn_hidden_dim,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        vocab_size=c.vocab_size,
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta,
        tie_word_embeddings=c.tie_word_embeddings,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


# ------------------------------------------------------------------ workers (one per run)


def herd_step(job: dict):
    from herd.config.finetune import finetune_from_dict
    from herd.finetune.trainer import FineTuner

    shutil.rmtree(job["run_dir"], ignore_errors=True)
    trainer = FineTuner(finetune_from_dict(recipe(job)))
    extra = {}
    if job["method"] == "qlora":
        quantised = [m.weight for m in trainer.model.modules() if type(m).__name__ == "NF4Linear"]
        extra["nf4_vs_bf16"] = trainer.nf4_bytes / sum(2 * w.shape.numel() for w in quantised)
    return (lambda: trainer.train_step().loss), extra


def peer_step(job: dict):
    """transformers (+ PEFT) over herd's packed rows, in herd's batch order."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from herd.config.finetune import finetune_from_dict
    from herd.finetune.pack import SFTLoader
    from herd.finetune.trainer import sft_rows
    from herd.tokenizer import load_tokenizer

    config = finetune_from_dict(recipe(job))
    tokenizer = load_tokenizer(job.get("tokenizer") or job["base"])
    # the same packed rows, in the same order, as herd's run
    rows = SFTLoader(sft_rows(config, tokenizer, False)[0], job["batch"], config.run.seed)
    base = Path(job["base"])
    if base.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(
            str(base.parent), gguf_file=base.name, dtype=torch.float32, attn_implementation="sdpa"
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(
            base, dtype=torch.float32, attn_implementation="sdpa"
        )
    if job["method"] == "lora":
        from peft import LoraConfig, get_peft_model

        peft = LoraConfig(r=16, lora_alpha=32, target_modules=HF_TARGETS, lora_dropout=0.0)
        model = get_peft_model(model, peft)
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    batches = iter(rows)

    def step() -> float:
        batch = next(batches)
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=batch.tokens, position_ids=batch.positions, use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        return loss.item()

    return step, {}


def worker(spec: str) -> None:
    job = json.loads(spec)
    import torch

    torch.set_num_threads(job["threads"])
    step, extra = (herd_step if job["engine"] == "herd" else peer_step)(job)
    times, losses = [], []
    for i in range(job["warmup"] + job["steps"]):
        start = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - start)
        if i == 0 and job.get("expect_loss") is not None:  # a warm-up step: never timed
            gap = abs(losses[0] - job["expect_loss"]) / job["expect_loss"]
            if gap > 1e-4:
                sys.exit(
                    f"peer: first-step loss {losses[0]:.6f} differs from herd's "
                    f"{job['expect_loss']:.6f} ({gap:.1e} relative): different work"
                )
    step_s = statistics.median(times[job["warmup"] :])
    report(
        {
            "tokens_per_s": job["batch"] * job["seq_len"] / step_s,
            "peak_rss_mib": peak_rss_mib(),
            "first_loss": losses[0],
            **extra,
        }
    )


# ------------------------------------------------------------------ the run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models", default="smollm2", help="smollm2 and/or llama3.2-1b")
    parser.add_argument("--methods", default="full,lora,qlora")
    parser.add_argument("--steps", type=int, default=4, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps (>= 1)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="rows per step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=ROOT / "out" / "bench-finetune")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: the first step checks the peer's loss")
    args.workdir.mkdir(parents=True, exist_ok=True)
    models = prepare(args.workdir, args.models.split(","))
    rows = []
    for name, paths in models.items():
        for method in args.methods.split(","):
            if name == "llama3.2-1b" and method == "full" and "full" not in sys.argv[1:]:
                continue  # 1.2B parameters of AdamW state do not fit 24 GB
            job = {
                **paths,
                "method": method,
                "steps": args.steps,
                "warmup": args.warmup,
                "seq_len": args.seq_len,
                "batch": args.batch,
                "threads": args.threads,
                "run_dir": str(args.workdir / "run"),
                "engine": "herd",
            }
            ours = run_worker(__file__, job, args.threads, f"herd {name} {method}")
            theirs = None
            if method != "qlora" and ours is not None:
                job = {**job, "engine": "peer", "expect_loss": ours["first_loss"]}
                theirs = run_worker(__file__, job, args.threads, f"peer {name} {method}")
            rows.append((name, method, ours, theirs))
    print_table(rows, args)
    (args.workdir / "results.json").write_text(json.dumps(rows, indent=1) + "\n")


def print_table(rows: list, args: argparse.Namespace) -> None:
    print(
        f"\nfine-tuning, fp32, {args.threads} threads, {args.batch} x {args.seq_len} tokens per "
        f"step, median of {args.steps} steps\n"
    )
    head = "| model | method | peer | herd tok/s | peer tok/s | speed-up | herd RSS MiB "
    print(head + "| peer RSS MiB | NF4 / bf16 weights |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for name, method, ours, theirs in rows:
        peer = {"full": "transformers", "lora": "transformers + PEFT"}.get(method, "-")

        def cell(r, key, fmt):
            return "failed" if r is None else (format(r[key], fmt) if key in r else "-")

        speed = f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x" if ours and theirs else "-"
        print(
            f"| {name} | {method} | {peer} | {cell(ours, 'tokens_per_s', ',.0f')} | "
            f"{cell(theirs, 'tokens_per_s', ',.0f') if method != 'qlora' else '-'} | {speed} | "
            f"{cell(ours, 'peak_rss_mib', ',.0f')} | "
            f"{cell(theirs, 'peak_rss_mib', ',.0f') if method != 'qlora' else '-'} | "
            f"{cell(ours, 'nf4_vs_bf16', '.3f') if ours else '-'} |"
        )


if __name__ == "__main__":
    main()
