"""`herd tokenize`: text corpora into token shards for pretraining."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from herd.cli.common import console, fail


def tokenize(
    corpus: Annotated[
        list[Path],
        typer.Argument(
            help="Text (.txt/.md: one document each), JSONL or Parquet ({'text'}) "
            "files, or directories of them."
        ),
    ],
    out: Annotated[Path, typer.Argument(help="Directory for the shards.")],
    tokenizer: Annotated[
        str,
        typer.Option(help="Checkpoint or tokenizer file (tokenizer.model, tokenizer.json, .gguf)."),
    ],
    workers: Annotated[
        int | None, typer.Option(help="Processes. Default: one per CPU core.")
    ] = None,
) -> None:
    """Tokenize a corpus into uint32 shards (one per input file) with document offsets.

    Each document ends with the tokenizer's end-of-text token. Empty documents (nothing but
    whitespace) are skipped and counted; a JSONL line or Parquet row without a string "text"
    is an error naming it. Shards already written by an earlier run are kept, so an
    interrupted run picks up where it stopped.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from herd.data import tokenize_corpus

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("shards", total=None)
        try:
            shards = tokenize_corpus(
                corpus,
                out,
                tokenizer,
                workers=workers,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
        except (FileNotFoundError, ValueError, TypeError, ImportError) as e:
            fail(str(e))
    tokens = sum(s.tokens for s in shards)
    documents = sum(s.documents for s in shards)
    empty = sum(s.empty for s in shards)
    skipped = f"; {empty:,} empty document{'' if empty == 1 else 's'} skipped" if empty else ""
    console.print(
        f"{len(shards)} shards, {documents:,} documents, {tokens:,} tokens in {out}{skipped}"
    )
