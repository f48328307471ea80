"""`herd tokenizer ...`: train a small vocabulary, look at how text tokenizes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from herd.cli.common import console, fail

if TYPE_CHECKING:
    from herd.tokenizer import Tokenizer

app = typer.Typer(
    help="Train and inspect tokenizers.", no_args_is_help=True, pretty_exceptions_enable=False
)


@app.command()
def train(
    corpus: Annotated[
        list[Path],
        typer.Argument(help="Text files, JSONL files with a 'text' field, or directories of them."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory to write the tokenizer to.")],
    vocab_size: Annotated[
        int, typer.Option("--vocab-size", help="Total ids, the 12 special tokens included.")
    ] = 4096,
    min_frequency: Annotated[
        int, typer.Option(help="Merge only pairs seen at least this often.")
    ] = 2,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite an existing tokenizer.")
    ] = False,
) -> None:
    """Train a byte-level BPE tokenizer (Llama 3 pattern and special tokens) for tiny models.

    The output directory holds tokenizer.json, tokenizer_config.json and generation_config.json;
    herd.load_tokenizer and transformers' AutoTokenizer both read it.
    """
    from herd.tokenizer.train import corpus_files, read_documents, save_trained, train_bpe

    if (out / "tokenizer.json").exists() and not force:
        fail(f"{out / 'tokenizer.json'} already exists; pass --force to replace it")
    try:
        files = corpus_files(corpus)
        tokenizer = train_bpe(read_documents(files), vocab_size, min_frequency)
        written = save_trained(tokenizer, out)
    except (FileNotFoundError, ValueError, TypeError) as e:
        fail(str(e))
    console.print(
        f"trained a {tokenizer.get_vocab_size()}-token vocabulary on {len(files)} file(s); "
        f"wrote {', '.join(p.name for p in written)} to {out}"
    )


@app.command()
def encode(
    text: Annotated[str, typer.Argument(help="Text to tokenize.")],
    tokenizer: Annotated[
        str,
        typer.Option(
            "--tokenizer",
            "-t",
            help="'llama3' (the official one), 'smollm2', or any checkpoint / tokenizer file.",
        ),
    ] = "llama3",
    special: Annotated[
        bool, typer.Option("--special", help="Parse special-token text such as <|eot_id|>.")
    ] = False,
    chat: Annotated[
        bool,
        typer.Option("--chat", help="Encode TEXT as a user message in the model's chat format."),
    ] = False,
) -> None:
    """Show the token ids and pieces of TEXT, and the tokenizer's special ids."""
    from herd.tokenizer import chat_format, llama3, load_tokenizer

    try:
        tok = llama3() if tokenizer == "llama3" else load_tokenizer(tokenizer)
        if chat:
            ids = chat_format(tok).encode_dialog([{"role": "user", "content": text}])
        else:
            ids = tok.encode(text, special=special)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    console.print(
        f"vocab {tok.vocab_size:,}  bos {tok.bos_id}  eos {tok.eos_id}  stop {list(tok.stop_ids)}"
    )
    table = Table("#", "id", "piece", show_edge=False)
    for position, token_id in enumerate(ids):
        table.add_row(str(position), str(token_id), _piece(tok, token_id))
    console.print(table)
    console.print(f"{len(ids)} tokens for {len(text.encode())} bytes")


def _piece(tok: Tokenizer, token_id: int) -> str:
    """A token's text, or its raw bytes when they are only part of a character."""
    if not tok.byte_level:
        return repr(tok.decode([token_id]))
    data = tok.token_bytes(token_id)
    try:
        return repr(data.decode())
    except UnicodeDecodeError:
        return repr(data)
