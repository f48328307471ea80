"""The `herd` command line."""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from herd.cli import align as align_cli
from herd.cli import curate as curate_cli
from herd.cli import data as data_cli
from herd.cli import eval as eval_cli
from herd.cli import finetune as finetune_cli
from herd.cli import generate as generate_cli
from herd.cli import quantize as quantize_cli
from herd.cli import serve as serve_cli
from herd.cli import tokenizer as tokenizer_cli
from herd.cli import train as train_cli
from herd.cli.common import console, fail

app = typer.Typer(
    name="herd",
    help="herd: the Llama 3 system in PyTorch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(tokenizer_cli.app, name="tokenizer")
app.command()(generate_cli.generate)
app.command()(generate_cli.chat)
app.command()(quantize_cli.quantize)
app.command()(serve_cli.serve)
app.command()(data_cli.tokenize)
app.command()(train_cli.pretrain)
app.command()(train_cli.export)
app.add_typer(eval_cli.app, name="eval")
app.command(
    "lm-eval",
    context_settings={
        "allow_extra_args": True,
        "ignore_unknown_options": True,
        "help_option_names": [],
    },
)(eval_cli.lm_eval)
app.command()(finetune_cli.finetune)
app.command()(finetune_cli.distill)
app.command()(finetune_cli.merge)
app.command("synth-task")(finetune_cli.synth_task)
app.command()(finetune_cli.average)
app.add_typer(align_cli.app, name="reward")
app.command()(align_cli.sample)
app.command()(align_cli.dpo)
app.command()(align_cli.align)
app.add_typer(curate_cli.app, name="curate")


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def _human_count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


@app.command()
def inspect(
    path: Annotated[
        str, typer.Argument(help="HF directory, Meta directory, .gguf file, or 'smollm2'.")
    ],
) -> None:
    """Show a checkpoint's format, config, parameter count, dtypes and size on disk."""
    from herd.checkpoint import CheckpointError, describe

    try:
        info = describe(path)
    except (CheckpointError, FileNotFoundError) as e:
        fail(str(e))
    table = Table(title=str(info.path), show_header=False, title_justify="left")
    table.add_row("format", info.format)
    table.add_row("parameters", f"{info.num_params:,} ({_human_count(info.num_params)})")
    table.add_row(
        "stored types", ", ".join(f"{k}×{v}" for k, v in sorted(info.stored_types.items()))
    )
    table.add_row("size on disk", f"{_human_bytes(info.size_bytes)} in {len(info.files)} file(s)")
    for key, value in info.config.to_dict().items():
        table.add_row(key, str(value))
    console.print(table)


@app.command()
def convert(
    src: Annotated[str, typer.Argument(help="Checkpoint to read (any format, or 'smollm2').")],
    dst: Annotated[Path, typer.Argument(help="Output directory (hf, meta) or .gguf file.")],
    to: Annotated[str, typer.Option("--to", help="Output format: hf, meta or gguf.")] = "hf",
    dtype: Annotated[
        str | None,
        typer.Option(
            help="f32, f16 or bf16 (gguf also q8_0, q4_0, q4_1). Default: the source's dtype."
        ),
    ] = None,
    shards: Annotated[int, typer.Option(help="Model-parallel shards (meta format).")] = 1,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            help="Checkpoint or tokenizer file to take the tokenizer from. "
            "Default: the source's own, if it has one."
        ),
    ] = None,
    no_tokenizer: Annotated[
        bool, typer.Option("--no-tokenizer", help="Write the weights without a tokenizer.")
    ] = False,
) -> None:
    """Convert a checkpoint between Hugging Face, Meta and GGUF formats, tokenizer included."""
    from herd.checkpoint import FORMATS, CheckpointError, load_model, save_model

    if to not in FORMATS:
        fail(f"--to {to!r}: choose one of {', '.join(FORMATS)}")
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())):
        if not force:
            fail(f"{dst} already exists; pass --force to replace it")
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    start = time.perf_counter()
    load_dtype = None if dtype is None or dtype.startswith("q") else dtype
    try:
        model = load_model(src, dtype=load_dtype, progress=True)
        tok = None if no_tokenizer else _tokenizer_of(tokenizer or src, required=bool(tokenizer))
        written = save_model(
            model,
            dst,
            format=to,
            dtype=dtype,
            tokenizer=tok,
            num_shards=shards,
            progress=True,
        )
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    size = sum(f.stat().st_size for f in written)
    console.print(
        f"wrote {len(written)} file(s), {_human_bytes(size)}, to {dst} "
        f"in {time.perf_counter() - start:.1f}s"
    )


def _tokenizer_of(path: str, required: bool) -> Path | None:
    """The tokenizer file to carry into the output; a source without one converts without."""
    from herd.tokenizer.formats import find_tokenizer

    try:
        found = find_tokenizer(path)
    except FileNotFoundError as e:
        if required:
            raise
        console.print(f"no tokenizer to carry ({e})")
        return None
    console.print(f"tokenizer: {found}")
    return found


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    app()


if __name__ == "__main__":
    sys.exit(main())
