"""Multiple-choice scoring speed: herd's shared-context rows vs transformers scoring one row per
choice (the scheme of lm-eval's `hf` backend: context + continuation per request, batched).

    python benchmarks/eval.py [--tasks mmlu,arc_challenge,hellaswag] [--limit 64]
                              [--batch 8] [--threads 2]

Both score the same questions of the real SmolLM2-135M-Instruct in fp32 with the same threads,
and must agree: every choice's log-likelihood within 1e-3 and the same accuracy, or the run
stops. Reported: questions per second and the accuracy both found.

Measured on this project's 2-core machine (48 questions each, 0-shot):

    task           herd q/s  transformers q/s  speed-up  acc (both)  max gap
    mmlu               3.35              1.03     3.25x       20.8%   2.5e-5
    arc_challenge      3.89              1.73     2.25x       39.6%   3.8e-5
    hellaswag          3.31              1.64     2.02x       41.7%   7.6e-5
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F


def transformers_scores(model, tokenizer, questions, batch: int) -> list[list[float]]:
    """Every (context, choice) as its own row, right-padded, `batch` rows per forward."""
    requests = []
    for qi, q in enumerate(questions):
        spaces = len(q.context) - len(q.context.rstrip())
        head = tokenizer(q.context[: len(q.context) - spaces])["input_ids"]
        for choice in q.choices:
            ids = tokenizer(q.context + choice)["input_ids"]
            requests.append((qi, ids, len(head)))
    scores = [[] for _ in questions]
    for at in range(0, len(requests), batch):
        part = requests[at : at + batch]
        width = max(len(ids) for _, ids, _ in part)
        tokens = torch.zeros(len(part), width, dtype=torch.long)
        attention = torch.zeros(len(part), width, dtype=torch.long)
        for r, (_, ids, _) in enumerate(part):
            tokens[r, : len(ids)], attention[r, : len(ids)] = torch.tensor(ids), 1
        with torch.no_grad():
            logprobs = F.log_softmax(model(tokens, attention_mask=attention).logits.float(), -1)
        for r, (qi, ids, start) in enumerate(part):
            picked = logprobs[r, start - 1 : len(ids) - 1].gather(
                1, torch.tensor(ids[start:])[:, None]
            )
            scores[qi].append(float(picked.sum()))
    return scores


def accuracy(questions, scores) -> float:
    return sum(
        max(range(len(s)), key=s.__getitem__) == q.gold for q, s in zip(questions, scores)
    ) / len(questions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="mmlu,arc_challenge,hellaswag")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="transformers rows per forward")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from herd.config.embedded import embedded_path
    from herd.eval import get_task
    from herd.eval.score import score_choices
    from herd.infer import Llama

    path = embedded_path("smollm2")
    llama = Llama.load(path, dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    rows = []
    for task in args.tasks.split(","):
        questions = get_task(task).load(0)[: args.limit]
        score_choices(llama.model, llama.tokenizer, questions[:2])  # warm-up
        start = time.perf_counter()
        ours = score_choices(llama.model, llama.tokenizer, questions)
        herd_s = time.perf_counter() - start
        start = time.perf_counter()
        theirs = transformers_scores(hf, tok, questions, args.batch)
        hf_s = time.perf_counter() - start
        gap = max(abs(a - b) for o, t in zip(ours, theirs) for a, b in zip(o.logprobs, t))
        ours_acc = accuracy(questions, [o.logprobs for o in ours])
        if gap > 1e-3 or ours_acc != accuracy(questions, theirs):
            sys.exit(f"{task}: the engines disagree (largest log-likelihood gap {gap:.1e})")
        choices = sum(len(q.choices) for q in questions) / len(questions)
        rows.append(
            (
                task,
                len(questions),
                choices,
                len(questions) / herd_s,
                len(questions) / hf_s,
                ours_acc,
                gap,
            )
        )
    print(f"\nmultiple-choice scoring, SmolLM2-135M fp32, {args.threads} threads\n")
    print(
        "| task | questions | choices | herd q/s | transformers q/s | speed-up | acc (both) | max gap |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for task, n, k, ours, theirs, acc, gap in rows:
        print(
            f"| {task} | {n} | {k:.1f} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f}x | "
            f"{100 * acc:.1f}% | {gap:.1e} |"
        )


if __name__ == "__main__":
    main()
