"""`herd merge` and `herd average`: whole-checkpoint weight operations."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from herd.cli.common import console, fail

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
