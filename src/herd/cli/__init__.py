"""Command-line interface; nothing imports this package."""
