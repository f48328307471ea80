"""Rejection-sampling throughput: K samples per prompt, three ways, on the same model.

    python benchmarks/sample.py [--model smollm2] [--prompts 4] [-k 16] [--max-new-tokens 32]
                                [--system-tokens 400]

  herd (rejection sampling)  one request with n = K per prompt on the serving engine: the
                             first choice computes the prompt, the other K - 1 are served its
                             blocks by the prefix cache; admission reserves the whole output
                             (no preemption)
  herd (independent)         K separate requests per prompt, all submitted at once, on the
                             same engine (each computes the prompt itself)
  transformers               `generate(num_return_sequences=K)`, one prompt at a time

Prompts are a long system prompt (a few-shot block of --system-tokens tokens, as the paper's
steering prompts are) and a short question; every sample is exactly --max-new-tokens long (end
of turn ignored), so all three do the same work. Reported: samples/s, generated tokens/s,
prefix-cache hit rate, and the speedup over the independent requests.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def prompts(llama, n: int, system_tokens: int) -> list[list[int]]:
    """n prompts sharing nothing but the chat format: a numbered few-shot block, a question."""
    fmt = llama.chat_format
    out = []
    for i in range(n):
        lines, text = [], ""
        while len(llama.tokenizer.encode(text, bos=False, eos=False)) < system_tokens:
            j = len(lines)
            lines.append(f"Example {i}.{j}: {3 * j + i} plus {j + 7} is {4 * j + 7 + i}.")
            text = "\n".join(lines)
        dialog = [{"role": "system", "content": text},
                  {"role": "user", "content": f"What is {i + 12} plus {i + 30}?"}]  # fmt: skip
        out.append(list(fmt.encode_dialog(dialog, add_generation_prompt=True)))
    return out


def herd_engine(llama, ids, k, new, shared: bool) -> tuple[float, int, float]:
    from herd.infer.sampling import SamplingParams
    from herd.serve.engine import Engine, Request, run_to_completion

    engine = Engine(llama.model, llama.tokenizer, max_batch=32, max_seq_len=llama.max_seq_len,
                    preempt=not shared).start()  # fmt: skip
    params = SamplingParams(temperature=0.8, top_p=0.95)
    if shared:
        requests = [Request(id=str(i), prompt=p, max_tokens=new, params=params, n=k, seed=i,
                            stop_ids=frozenset()) for i, p in enumerate(ids)]  # fmt: skip
    else:
        requests = [Request(id=f"{i}.{j}", prompt=p, max_tokens=new, params=params, seed=i + j,
                            stop_ids=frozenset())
                    for i, p in enumerate(ids) for j in range(k)]  # fmt: skip
    start = time.perf_counter()
    try:
        run_to_completion(engine, requests)
    finally:
        engine.stop()
    seconds = time.perf_counter() - start
    s = engine.stats
    return seconds, s.generated_tokens, s.prefix_blocks_hit / max(1, s.prefix_blocks_queried)


def transformers_generate(model, ids, k, new) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = 0
    for p in ids:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([p]), do_sample=True, temperature=0.8, top_p=0.95,
                num_return_sequences=k, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
            )  # fmt: skip
        tokens += (out.shape[1] - len(p)) * k
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("-k", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--system-tokens", type=int, default=400)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from rich.console import Console
    from rich.table import Table
    from transformers import AutoModelForCausalLM

    from herd.config.embedded import embedded_path
    from herd.infer import Llama

    llama = Llama.load(args.model, max_seq_len=args.system_tokens + args.max_new_tokens + 128)
    ids = prompts(llama, args.prompts, args.system_tokens)
    path = embedded_path(args.model) if args.model == "smollm2" else None
    if path is not None:
        hf = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        ).eval()
    else:
        hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()

    n = args.prompts * args.k
    rows = []
    shared_s, shared_tok, shared_hits = herd_engine(llama, ids, args.k, args.max_new_tokens, True)
    alone_s, alone_tok, alone_hits = herd_engine(llama, ids, args.k, args.max_new_tokens, False)
    hf_s, hf_tok = transformers_generate(hf, ids, args.k, args.max_new_tokens)
    rows.append(("herd (rejection sampling)", shared_s, shared_tok, shared_hits))
    rows.append(("herd (independent requests)", alone_s, alone_tok, alone_hits))
    rows.append(("transformers generate(num_return_sequences)", hf_s, hf_tok, None))

    table = Table(
        title=f"{args.model}: {args.prompts} prompts of ~{len(ids[0])} tokens x K={args.k}, "
        f"{args.max_new_tokens} new tokens each, {args.threads} threads"
    )
    for column in ("method", "samples/s", "tokens/s", "prefix hits", "vs independent"):
        table.add_column(column, justify="right" if column != "method" else "left")
    for name, seconds, tokens, hits in rows:
        table.add_row(
            name, f"{n / seconds:.2f}", f"{tokens / seconds:.1f}",
            "-" if hits is None else f"{100 * hits:.0f}%", f"{alone_s / seconds:.2f}x",
        )  # fmt: skip
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
