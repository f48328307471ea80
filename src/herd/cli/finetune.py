"""`herd finetune`, and the whole-checkpoint weight operations `herd merge` and `herd average`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated

import typer

from herd.cli.common import console, fail
from herd.cli.train import Overrides, Resume, train

# The output options both commands share.
To = Annotated[str, typer.Option("--to", help="hf, meta or gguf.")]
Dtype = Annotated[str | None, typer.Option(help="f32, f16 or bf16 (gguf also q8_0, q4_0, q4_1).")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]


def _prepare_output(out: Path, force: bool) -> None:
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if not force:
            fail(f"{out} already exists; pass --force to replace it")
        shutil.rmtree(out) if out.is_dir() else out.unlink()


def _save(model, out: Path, to: str, dtype: str | None, tokenizer_from: str) -> None:
    from herd.checkpoint import save_model
    from herd.tokenizer.formats import find_tokenizer

    try:
        tokenizer = find_tokenizer(tokenizer_from)
    except FileNotFoundError:
        tokenizer = None
    written = save_model(model, out, format=to, dtype=dtype, tokenizer=tokenizer)
    where = "" if tokenizer else " (no tokenizer found beside the source)"
    console.print(f"wrote {len(written)} files to {out} as {to}{where}")


def finetune(
    recipe: Annotated[
        Path, typer.Argument(help="Fine-tuning recipe (TOML), e.g. recipes/sft-smollm2.toml.")
    ],
    set_: Overrides = None,
    resume: Resume = False,
) -> None:
    """Fine-tune a checkpoint on dialogs: full, LoRA or QLoRA (NF4 base).

    The recipe names the base (HF, Meta, GGUF, 'smollm2' or a herd run), the dialog files (chat
    JSONL in OpenAI's messages format, prompt/completion JSONL, ShareGPT JSON, plain text),
    what the loss trains on, and the \\[batch], \\[optim] and \\[run] keys of `herd pretrain`.
    Dialogs are packed into rows with attention kept inside each. Metrics and checkpoints land in
    RUN as for pretraining, and --resume continues a stopped or killed run exactly. A LoRA run
    also writes its adapter in PEFT's format to RUN/adapter, for `herd chat --adapter`,
    `herd merge`, PEFT or vLLM; `herd export RUN OUT` writes the model with it folded in.
    """
    import logging

    from rich.table import Table

    from herd.config.finetune import finetune_from_dict
    from herd.config.train import ConfigError, load_config
    from herd.finetune.data import DataError
    from herd.finetune.tasks import read_items
    from herd.finetune.trainer import FineTuner
    from herd.train.checkpoint import CheckpointCorrupt

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = load_config(recipe, set_ or [], build=finetune_from_dict)
        trainer = FineTuner(config, resume=resume)
        items = read_items(config.finetune.exact_match) if config.finetune.exact_match else None
    except (ConfigError, DataError, FileNotFoundError, CheckpointCorrupt, ValueError) as e:
        fail(str(e))
    f = config.finetune
    trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    console.print(
        f"fine-tuning {f.base} ({f.method}): {trained / 1e6:.2f}M of "
        f"{trainer.model_config.num_params() / 1e6:.1f}M parameters train, on {f.train_on} tokens"
    )
    for what, stats in trainer.pack_stats.items():
        console.print(
            f"{what}: {stats.dialogs} dialogs in {stats.rows} rows of {config.batch.seq_len}, "
            f"{stats.trained_tokens:,} trained tokens, "
            f"{stats.truncated} truncated, {stats.dropped} dropped"
        )
    if items:
        with console.status(f"exact match on {len(items)} held-out questions"):
            before = (trainer.step, trainer.exact_match(items))
    train(trainer, "finetune")
    if items:
        with console.status(f"exact match on {len(items)} held-out questions"):
            after = (trainer.step, trainer.exact_match(items))
        table = Table(title=f"exact match, {len(items)} held-out questions ({f.exact_match})")
        table.add_column("model")
        table.add_column("step", justify="right")
        table.add_column("exact match", justify="right")
        for name, (step, score) in (("before", before), (f"after ({f.method})", after)):
            table.add_row(name, str(step), f"{100 * score:.1f}%")
        console.print(table)
    if f.method != "full":
        console.print(f"adapter (PEFT format): {trainer.run_dir / 'adapter'}")


def distill(
    teacher: Annotated[
        str, typer.Argument(help="The teacher: any checkpoint herd reads, 'smollm2' or a run.")
    ],
    recipe: Annotated[
        Path, typer.Argument(help="Distillation recipe (TOML), e.g. recipes/distill-smollm2.toml.")
    ],
    set_: Overrides = None,
    resume: Resume = False,
) -> None:
    """Train a small student on a teacher's next-token distributions (logit distillation).

    The recipe is a fine-tuning recipe whose \\[finetune] base (default: the teacher) is the
    student's start; \\[distill] layers picks the blocks it keeps, temperature and kl_weight
    shape the loss. The student keeps the teacher's vocabulary and lands in RUN/student as an HF
    checkpoint: a draft for `herd generate --model TEACHER --draft RUN/student`. Prints the
    student's top-1 agreement with the teacher on the validation rows before and after.
    """
    import logging

    from herd.config.distill import distill_from_dict
    from herd.config.train import ConfigError, load_config
    from herd.finetune.data import DataError
    from herd.finetune.distill import STUDENT_DIR, Distiller
    from herd.train.checkpoint import CheckpointCorrupt

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = load_config(
            recipe,
            [f"distill.teacher={json.dumps(teacher)}", *(set_ or [])],
            build=distill_from_dict,
        )
        trainer = Distiller(config, resume=resume)
    except (ConfigError, DataError, FileNotFoundError, CheckpointCorrupt, ValueError) as e:
        fail(str(e))
    d = config.distill
    console.print(
        f"distilling {teacher} into {trainer.model_config.n_layers} blocks of "
        f"{config.finetune.base} ({trainer.model_config.num_params() / 1e6:.1f}M parameters), "
        f"temperature {d.temperature}, kl_weight {d.kl_weight}"
    )
    before = trainer.agreement()
    train(trainer, "distill")
    after = trainer.agreement()
    if before is not None:
        console.print(f"top-1 agreement with the teacher (validation): {before:.1%} -> {after:.1%}")
    console.print(f"student: {trainer.run_dir / STUDENT_DIR}")


def synth_task(
    out: Annotated[Path, typer.Argument(help="Directory for train.jsonl and test.jsonl.")],
    train_items: Annotated[int, typer.Option("--train", help="Training dialogs.")] = 560,
    test_items: Annotated[int, typer.Option("--test", help="Held-out questions.")] = 40,
    seed: Annotated[int, typer.Option(help="Generator seed.")] = 0,
) -> None:
    """Write a synthetic, exactly checkable SFT task: unit conversions ("Convert 45 km to m."
    -> "45000 m") as chat JSONL, training and held-out questions disjoint. Score a model on
    test.jsonl with a recipe's finetune.exact_match."""
    from herd.finetune.tasks import unit_conversions, write_dialogs

    items = unit_conversions(train_items + test_items, seed)
    write_dialogs(items[:train_items], out / "train.jsonl")
    write_dialogs(items[train_items:], out / "test.jsonl")
    console.print(
        f"unit conversions: {train_items} training dialogs in {out / 'train.jsonl'}, "
        f"{test_items} held-out in {out / 'test.jsonl'}; e.g. "
        f"{items[0].prompt[0]['content']!r} -> {items[0].answer!r}"
    )


def merge(
    base: Annotated[str, typer.Argument(help="The base checkpoint (any format, or 'smollm2').")],
    adapter: Annotated[Path, typer.Argument(help="A PEFT LoRA adapter directory.")],
    out: Annotated[Path, typer.Argument(help="Output directory (hf, meta) or .gguf file.")],
    to: To = "hf",
    dtype: Dtype = None,
    force: Force = False,
) -> None:
    """Fold a LoRA adapter into its base model's weights and write the result."""
    from herd.checkpoint import FORMATS, CheckpointError
    from herd.finetune import merge_adapter

    if to not in FORMATS:
        fail(f"--to {to!r}: choose one of {', '.join(FORMATS)}")
    _prepare_output(out, force)
    try:
        _save(merge_adapter(base, adapter), out, to, dtype, base)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        fail(str(e))


def average(
    paths: Annotated[
        list[str], typer.Argument(help="Two or more checkpoints of one architecture, then OUT.")
    ],
    weights: Annotated[
        str | None, typer.Option(help="Comma-separated weights, one per checkpoint (normalised).")
    ] = None,
    to: To = "hf",
    dtype: Dtype = None,
    force: Force = False,
) -> None:
    """Average the weights of several checkpoints (the paper's model averaging): herd average
    A B C OUT [--weights 0.5,0.25,0.25]."""
    from herd.checkpoint import FORMATS, CheckpointError
    from herd.finetune import average_models

    if len(paths) < 3:
        fail("give at least two checkpoints and the output: herd average A B OUT")
    *sources, out_arg = paths
    out = Path(out_arg)
    if to not in FORMATS:
        fail(f"--to {to!r}: choose one of {', '.join(FORMATS)}")
    try:
        parsed = None if weights is None else [float(w) for w in weights.split(",")]
    except ValueError:
        fail(f"--weights {weights!r}: expected comma-separated numbers")
    _prepare_output(out, force)
    try:
        _save(average_models(sources, parsed), out, to, dtype, sources[0])
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        fail(str(e))
