"""The `ragtune` command-line client of the gateway."""

from ragtune.cli.main import main

__all__ = ["main"]
