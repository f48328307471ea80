"""`herd pretrain` and `herd export`: train from a recipe, and hand the result to other tools."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Annotated

import typer

from herd.cli.common import console, fail

# The recipe options `herd pretrain` and `herd finetune` share.
Overrides = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override a recipe key: section.key=value (repeatable), "
        "e.g. --set optim.steps=100 --set run.dir=runs/try",
    ),
]
Resume = Annotated[
    bool,
    typer.Option(
        "--resume", help="Continue from the newest complete checkpoint in run.dir (if any)."
    ),
]


def pretrain(
    recipe: Annotated[Path, typer.Argument(help="Training recipe (TOML), e.g. recipes/tiny.toml.")],
    set_: Overrides = None,
    resume: Resume = False,
    resume_from: Annotated[
        Path | None, typer.Option(help="Continue from this checkpoint directory.")
    ] = None,
) -> None:
    """Pretrain a Llama 3 model from a recipe.

    Prints loss, learning rate, tokens/s and MFU as it goes; every step is also written to
    RUN/metrics.jsonl and RUN/tensorboard. Checkpoints land in RUN/checkpoints; a run that was
    stopped or killed continues with --resume, exactly as if it had not been interrupted.

    On many processes, launch with torchrun; the recipe's \\[parallel] table (tp, cp, pp,
    dp_shard, dp_replicate, pp_schedule, ...) lays them out, e.g.
    `torchrun --standalone --nproc-per-node 4 -m herd pretrain recipes/tiny.toml --set
    parallel.pp=2`. With torchrun --max-restarts N and --resume, a job that lost a rank
    restarts from its last checkpoint. See docs/scaling.md.
    """
    from herd.config.train import ConfigError, load_config
    from herd.train.checkpoint import CheckpointCorrupt
    from herd.train.trainer import Trainer

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = load_config(recipe, set_ or [])
        trainer = Trainer(config, resume=resume_from or resume)
    except (ConfigError, FileNotFoundError, CheckpointCorrupt, ValueError) as e:
        fail(str(e))
    train(trainer, "pretrain")


def train(trainer, name: str) -> None:
    """Run a built Trainer to its last step with a progress bar and a line every log_every
    steps (the other ranks of a torchrun job train quietly)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from herd.train.trainer import TrainingDiverged

    config = trainer.config
    if not trainer.is_main:  # the other ranks of a torchrun job train quietly
        try:
            trainer.fit()
        except TrainingDiverged:
            raise typer.Exit(code=1) from None
        except RuntimeError as e:
            _peer_failed(e)
        trainer.close()
        return
    n = trainer.model_config.num_params()
    layout = ", ".join(f"{k} {v}" for k, v in vars(trainer.dims).items() if v > 1)
    if trainer.pipeline is not None:
        layout += f" ({config.parallel.pp_schedule})"
    console.print(
        f"{n / 1e6:.1f}M parameters, {trainer.device.type}"
        f"{f' ({layout})' if layout else ''}, "
        f"{'bf16 autocast' if trainer.amp_dtype else 'fp32'}, attention {trainer.attention}; "
        f"run directory {trainer.run_dir}"
    )
    if trainer.step:
        console.print(f"resuming at step {trainer.step}")
    every = max(1, config.run.log_every)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        "{task.fields[stats]}",
        console=console,
    ) as bar:
        task = bar.add_task(name, total=config.optim.steps, completed=trainer.step, stats="")

        def on_step(step: int, r: dict) -> None:
            stats = (
                f"loss {r['loss']:.4f}  lr {r['lr']:.2e}  {r['tokens_per_s']:,.0f} tok/s  "
                f"MFU {100 * r['mfu']:.1f}%"
            )
            for key, label in (("reward_accuracy", "reward acc"), ("pair_accuracy", "pair acc")):
                if key in r:  # preference tuning's accuracy of the step's pairs
                    stats += f"  {label} {100 * r[key]:.0f}%"
            bar.update(task, completed=step, stats=stats)
            if "val_loss" in r or step % every == 0:
                line = f"step {step}: {stats}  grad norm {r['grad_norm']:.3f}"
                if "val_loss" in r:
                    line += f"  [bold]val loss {r['val_loss']:.4f}[/]"
                if r["skipped"]:
                    line += "  [yellow]skipped (non-finite)[/]"
                bar.console.print(line)

        try:
            trainer.fit(on_step)
        except TrainingDiverged as e:
            fail(str(e))
        except RuntimeError as e:
            _peer_failed(e)
    # only after a clean finish: leaving the group waits on ranks that may be gone
    trainer.close()
    last = trainer.checkpoints.latest()
    console.print(f"done: {trainer.step} steps, {trainer.tokens:,} tokens; checkpoint {last}")


def _peer_failed(error: RuntimeError) -> None:
    """In a torchrun job a collective fails when another rank dies: say so in one line (torchrun
    then names the rank that failed first) instead of a traceback per rank. Any other error (a
    bug, an out-of-memory) keeps its traceback."""
    import torch.distributed as dist

    from herd.train.parallel import is_communication_failure

    if not dist.is_initialized() or not is_communication_failure(error):
        raise error
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    fail(
        f"rank {dist.get_rank()}: a collective failed ({first[:200]}); another rank has "
        "probably died: torchrun's report names it. The checkpoints are intact; run again "
        "with --resume (or launch with --max-restarts N to do it automatically)."
    )


def export(
    run_dir: Annotated[Path, typer.Argument(help="A `herd pretrain` run directory.")],
    out: Annotated[Path, typer.Argument(help="Output directory (hf, meta) or .gguf file.")],
    to: Annotated[str, typer.Option("--to", help="hf, meta or gguf.")] = "hf",
    step: Annotated[int | None, typer.Option(help="Checkpoint step. Default: the newest.")] = None,
    dtype: Annotated[
        str | None,
        typer.Option(help="f32, f16 or bf16 (gguf also q8_0, q4_0, q4_1). Default: f32."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
) -> None:
    """Write a trained model with its tokenizer as Hugging Face, Meta or GGUF, for
    transformers, llama.cpp, vLLM or `herd generate`."""
    from herd.checkpoint import FORMATS, save_model
    from herd.finetune.trainer import is_finetune_run, load_finetuned
    from herd.train.checkpoint import CheckpointCorrupt, load_run_model

    if to not in FORMATS:
        fail(f"--to {to!r}: choose one of {', '.join(FORMATS)}")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if not force:
            fail(f"{out} already exists; pass --force to replace it")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    try:
        if is_finetune_run(run_dir):  # an adapter run: its base with the adapter folded in
            model, source = load_finetuned(run_dir, step)
        else:
            model, source = load_run_model(run_dir, step)
        written = save_model(model, out, format=to, dtype=dtype, tokenizer=run_dir / "tokenizer")
    except (FileNotFoundError, CheckpointCorrupt, ValueError) as e:
        fail(str(e))
    console.print(f"exported {source} as {to}: {len(written)} files in {out}")
