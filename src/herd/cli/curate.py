"""`herd curate`: a web-data pipeline recipe on datatrove's executors."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperGroup

from herd.cli.common import console, fail
from herd.cli.train import Overrides

Recipe = Annotated[Path, typer.Argument(help="Recipe (TOML, see recipes/curate-web.toml).")]


class RunByDefault(TyperGroup):
    """`herd curate RECIPE ...` means `herd curate run RECIPE ...`."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().resolve_command(ctx, args)


app = typer.Typer(
    cls=RunByDefault,
    no_args_is_help=True,
    help="Curate web documents (paper §3.1): `herd curate RECIPE` runs a recipe; "
    "`herd curate train-classifier RECIPE [--task domain]` trains its quality (or domain) "
    "classifier.",
)


@app.command("run")
def curate(
    recipe: Recipe,
    set_: Overrides = None,
    executor: Annotated[
        str, typer.Option(help="local (processes), slurm (sbatch jobs) or ray (a Ray cluster).")
    ] = "local",
    tasks: Annotated[
        int | None, typer.Option(help="Shards of the input (default: the recipe's).")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Tasks run at once (default: the recipe's).")
    ] = None,
    fresh: Annotated[
        bool, typer.Option(help="Delete the output and work folders first instead of resuming.")
    ] = False,
    partition: Annotated[
        str | None, typer.Option(help="Slurm partition (--executor slurm).")
    ] = None,
    slurm_time: Annotated[
        str, typer.Option(help="Slurm time limit of each job (--executor slurm).")
    ] = "12:00:00",
    quiet: Annotated[bool, typer.Option(help="Only the stats table, no datatrove logs.")] = True,
) -> None:
    """Curate web documents as the paper's §3.1 does: domain blocklist, HTML extraction, PII
    masking, URL / MinHash / line dedup, repetition and dirty-word filters, the token KL
    filter, language id, quality and domain classifiers, decontamination, the data mix, and
    token shards for `herd pretrain` -- the steps and their order
    come from the recipe's [curate] steps, each step's parameters from its own table.

    Running it again resumes: finished tasks are skipped. Removed documents go to
    OUTPUT/excluded/STEP with their reason, per-step counts to OUTPUT/stats.json and the table.
    """
    from herd.config.curate import curate_from_dict
    from herd.config.train import ConfigError, load_config
    from herd.curate import pipeline

    overrides = list(set_ or [])
    overrides += [f"curate.tasks={tasks}"] if tasks else []
    overrides += [f"curate.workers={workers}"] if workers else []
    try:
        config = load_config(recipe, overrides, build=curate_from_dict)
        if fresh:
            pipeline.clean(config)
        if quiet:
            logging.getLogger("trafilatura").setLevel(logging.ERROR)
        console.print(
            f"[bold]curate[/]: {' -> '.join(config.curate.steps)} on {config.curate.input} "
            f"({config.curate.tasks} tasks, {config.curate.workers} at a time, {executor})"
        )
        start = time.perf_counter()
        options = {"partition": partition, "time": slurm_time} if partition else {}
        if executor == "slurm" and not partition:
            fail("--executor slurm needs --partition")
        pipeline.run(config, executor, quiet=quiet, **options)
        seconds = time.perf_counter() - start
    except (ConfigError, FileNotFoundError, ValueError, ImportError) as e:
        fail(str(e))
    if executor == "slurm":
        console.print(f"submitted; logs under {config.work_dir()}/logs")
        return
    steps = pipeline.collect_stats(config)
    print_stats(steps, seconds)
    console.print(f"documents in {config.curate.output}/documents; stats in "
                  f"{pipeline.write_stats(config, steps)}")  # fmt: skip


def print_stats(steps, seconds: float) -> None:
    from rich.table import Table

    table = Table(title=f"herd curate: documents per step ({seconds:.0f} s)")
    for column in ("step", "in", "out", "s"):
        table.add_column(column, justify="left" if column == "step" else "right")
    table.add_column("removed (reason: documents); other counts")
    for s in steps:
        removed = [f"{k}: {v:,}" for k, v in sorted(s.removed.items(), key=lambda x: -x[1])]
        other = [f"{k}: {v:,}" for k, v in s.other.items()]
        table.add_row(s.step, f"{s.docs_in:,}", f"{s.docs_out:,}", f"{s.seconds:.1f}",
                      "; ".join(x for x in (", ".join(removed), ", ".join(other)) if x))  # fmt: skip
    console.print(table)


@app.command("train-classifier")
def train_classifier(
    recipe: Recipe,
    set_: Overrides = None,
    task: Annotated[
        str, typer.Option(help="quality (high / low quality) or domain (code, math, general).")
    ] = "quality",
) -> None:
    """Train the recipe's classifier for TASK: the teacher (TASK.teacher: "heuristic", or a chat
    checkpoint such as "smollm2" asked TASK.question) labels TASK.sample documents of
    TASK.train_from (default: OUTPUT/documents of an earlier run); fastText learns the labels
    from 80% of them (to TASK.model, default OUTPUT/TASK.bin) and, when TASK.transformer names
    a base checkpoint, so does that model under a linear head (OUTPUT/TASK-transformer). Each
    student's accuracy against the teacher on the other 20% is reported."""
    from herd.config.curate import curate_from_dict
    from herd.config.train import ConfigError, load_config
    from herd.curate import classify

    if task not in classify.TASKS:
        fail(f"--task {task!r}: one of {', '.join(classify.TASKS)}")
    try:
        config = load_config(recipe, list(set_ or []), build=curate_from_dict)
        q = config.steps[task]
        source = Path(q.train_from or f"{config.curate.output}/documents")
        texts = classify.read_texts(source, q.sample)
        kind = classify.TASKS[task]
        if q.teacher == "heuristic":
            teacher = kind.heuristic
        else:
            console.print(f"teacher: {q.teacher}, {len(texts)} documents")
            teacher = classify.llm_teacher(q.teacher, kind, q.question)
        out = Path(config.classifier_model(task))
        report = classify.train_classifiers(texts, kind, teacher, out, q.transformer,
                                            q.max_tokens, progress=True)  # fmt: skip
    except (ConfigError, FileNotFoundError, ValueError, ImportError) as e:
        fail(str(e))
    print_report(report, q.teacher, out)


def print_report(report, teacher: str, out: Path) -> None:
    from rich.table import Table

    counts = ", ".join(f"{k} {v}" for k, v in sorted(report.counts.items()))
    table = Table(title=f"{report.task} classifier: {report.labelled} documents labelled by the "
                  f"{teacher} teacher ({counts}); {report.held_out} held out")  # fmt: skip
    for column in ("student", "held-out accuracy", "train s"):
        table.add_column(column, justify="left" if column == "student" else "right")
    for s in report.students:
        table.add_row(s.student, f"{100 * s.accuracy:.1f}%", f"{s.seconds:.1f}")
    table.add_row("always the commonest label", f"{100 * report.majority:.1f}%", "")
    console.print(table)
    console.print(f"fastText model in {out}")
