"""Console output shared by the CLI commands."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err = Console(stderr=True, soft_wrap=True)


def fail(message: str) -> NoReturn:
    """Print an error and exit with status 1."""
    err.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code=1)
