"""The `ragtune` command-line client of the gateway."""

from clients.cli.main import main

__all__ = ["main"]
