"""Evaluation speed: `herd eval` against lm-eval's `hf` backend on the same examples.

    python benchmarks/eval.py [--mc mmlu,arc_challenge] [--limit 48]
                              [--gen gsm8k] [--gen-limit 32] [--max-new-tokens 160]
                              [--batch 8] [--threads 2]

Every task is exported as a local lm-eval task (herd.eval.tasks.write_lm_eval_task), so both
score the same prompts of the real SmolLM2-135M-Instruct in fp32 with the same threads, and
lm-eval's `hf` backend (transformers, batch `--batch`) runs through `lm_eval.simple_evaluate`
as its users run it, timed inside its request methods (task building excluded). herd is timed
twice: `herd eval` (`evaluate`), and the same lm-eval run with herd's backend (`HerdLM`). Multiple
choice must agree (same accuracy, every log-likelihood within 1e-3) or the run stops; for
generation the table shows how many greedy outputs are identical.

Measured on this project's 2-core machine (defaults):

| task | shots | n | herd eval ex/s | lm-eval --model herd ex/s | lm-eval hf ex/s | speed-up | agreement |
|---|---:|---:|---:|---:|---:|---:|---|
| MMLU | 5 | 48 | 4.61 | 5.32 | 0.94 | 4.91x | acc 35.4% both, max gap 1.3e-5 |
| MMLU | 0 | 48 | 6.48 | 5.61 | 4.37 | 1.48x | acc 20.8% both, max gap 3.1e-5 |
| ARC-Challenge | 0 | 48 | 6.32 | 7.54 | 2.46 | 2.57x | acc 39.6% both, max gap 4.2e-5 |
| GSM8K (greedy, 160 tokens) | 5 | 32 | 0.47 | 0.50 | 0.18 | 2.61x | 32/32 outputs identical |
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def timed(lm):
    """The model with a clock on its request methods: lm.seconds is the time spent scoring
    and generating, without lm-eval's task building around it."""
    lm.seconds = 0.0
    for name in ("loglikelihood", "generate_until"):
        setattr(lm, name, _clocked(lm, getattr(lm, name)))
    return lm


def _clocked(lm, method):
    def wrapper(requests, *args, **kwargs):
        start = time.perf_counter()
        out = method(requests, *args, **kwargs)
        lm.seconds += time.perf_counter() - start
        return out

    return wrapper


def lm_eval_run(lm, task: str, include: Path, batch: int):
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm.seconds = 0.0
    out = lm_eval.simple_evaluate(
        model=lm, tasks=[task], task_manager=TaskManager(include_path=str(include)),
        log_samples=True, batch_size=batch,
    )  # fmt: skip
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return lm.seconds, [s["filtered_resps"] for s in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mc", default="mmlu:5,mmlu:0,arc_challenge", help="tasks, each optionally :SHOTS"
    )
    parser.add_argument("--limit", type=int, default=48)
    parser.add_argument("--gen", default="gsm8k:5")
    parser.add_argument("--gen-limit", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--batch", type=int, default=8, help="lm-eval hf batch size")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from herd.config.embedded import embedded_path
    from herd.eval import evaluate, get_task
    from herd.eval.lm import HerdLM
    from herd.eval.tasks import write_lm_eval_task
    from herd.infer import Llama

    path = embedded_path("smollm2")
    llama = Llama.load(path, dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf = timed(HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch))
    herd_lm = timed(HerdLM(pretrained=str(path), dtype="float32", batch_size=32))
    include = Path(tempfile.mkdtemp(prefix="herd-eval-bench-"))
    rows = []
    jobs = [(t, args.limit) for t in args.mc.split(",") if t]
    jobs += [(t, args.gen_limit) for t in args.gen.split(",") if t]
    for job, limit in jobs:
        name, _, shots = job.partition(":")
        spec = get_task(name)
        shots = int(shots) if shots else spec.shots[0]
        lm_task = write_lm_eval_task(name, shots, include, limit, args.max_new_tokens)
        evaluate(llama, name, limit=2, shots=shots, max_new_tokens=8)  # warm-up
        start = time.perf_counter()
        ours = evaluate(llama, name, limit, shots, args.max_new_tokens)
        herd_s = time.perf_counter() - start
        herd_lm_s, via_lm_eval = lm_eval_run(herd_lm, lm_task, include, args.batch)
        hf_s, theirs = lm_eval_run(hf, lm_task, include, args.batch)
        n = len(ours["records"])
        if spec.kind == "choice":
            gap = max(
                abs(a - b[0])
                for record, t in zip(ours["records"], theirs)
                for a, b in zip(record["logprobs"], t)
            )
            hf_acc = (
                sum(
                    max(range(len(t)), key=lambda i: t[i][0]) == r["gold"]
                    for r, t in zip(ours["records"], theirs)
                )
                / n
            )
            if gap > 1e-3 or hf_acc != ours["acc"]["mean"]:
                sys.exit(f"{name}: herd and lm-eval's hf backend disagree (gap {gap:.1e})")
            agree = f"acc {100 * hf_acc:.1f}% both, max gap {gap:.1e}"
        else:
            same = sum(r["output"] == t[0] for r, t in zip(ours["records"], theirs))
            also = sum(a[0] == t[0] for a, t in zip(via_lm_eval, theirs))
            agree = f"{same}/{n} outputs identical ({also}/{n} via lm-eval herd)"
        rows.append((name, shots, n, n / herd_s, n / herd_lm_s, n / hf_s, agree))

    print(f"\nSmolLM2-135M fp32, {args.threads} threads, lm-eval hf batch {args.batch}\n")
    print("| task | shots | n | herd eval ex/s | lm-eval --model herd ex/s | lm-eval hf ex/s "
          "| speed-up (herd eval) | agreement |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, shots, n, ours, via, theirs, agree in rows:
        print(
            f"| {name} | {shots} | {n} | {ours:.2f} | {via:.2f} | {theirs:.2f} | "
            f"{ours / theirs:.2f}x | {agree} |"
        )


if __name__ == "__main__":
    main()
