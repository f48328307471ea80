"""`herd quantize`: weight-only quantization of a checkpoint into a safetensors directory."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Annotated

import typer

from herd.cli.common import console, fail
from herd.quantize.int4 import DEFAULT_GROUP_SIZE


def quantize(
    src: Annotated[str, typer.Argument(help="Checkpoint to read (any format, or 'smollm2').")],
    dst: Annotated[Path, typer.Argument(help="Output directory.")],
    method: Annotated[
        str,
        typer.Option(
            help="int8, int4 (weight-only), fp8 (every linear), w8a8, w4a8, or fp8-mixed "
            "(the paper's FP8 recipe: inner blocks' feed-forward layers only)."
        ),
    ] = "int8",
    group_size: Annotated[
        int, typer.Option("--group-size", help="int4/w4a8 inputs per scale: 32, 64, 128 or 256.")
    ] = DEFAULT_GROUP_SIZE,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
) -> None:
    """Quantize a checkpoint's linear layers (int8, group-wise int4, fp8, w8a8, w4a8 or
    fp8-mixed) and save it with its tokenizer; load the result with
    `herd.quantize.load_quantized`."""
    import herd
    from herd.checkpoint import CheckpointError
    from herd.quantize import quantize_model, save_quantized
    from herd.quantize.core import check_method

    try:
        check_method(method, group_size)
    except ValueError as e:
        fail(str(e))
    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())):
        if not force:
            fail(f"{dst} already exists; pass --force to replace it")
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    start = time.perf_counter()
    try:
        model = herd.load_model(src)
    except (CheckpointError, FileNotFoundError) as e:
        fail(str(e))
    quantize_model(model, method, group_size)
    written = save_quantized(model, dst)
    written += _copy_tokenizer(src, dst)
    size = sum(f.stat().st_size for f in written)
    console.print(
        f"wrote {len(written)} file(s), {size / 2**20:.1f} MiB, {method} to {dst} "
        f"in {time.perf_counter() - start:.1f}s"
    )


def _copy_tokenizer(src: str, dst: Path) -> list[Path]:
    """The source's tokenizer as tokenizer.json in `dst`; a source without one goes without."""
    from herd.tokenizer import load_tokenizer, save_tokenizer

    try:
        return save_tokenizer(load_tokenizer(src), dst, "hf")
    except (FileNotFoundError, ValueError) as e:
        console.print(f"no tokenizer to carry ({e})")
        return []
