"""The command line: thin typer commands over the library (``attnscan --help``)."""

from .main import app, run

__all__ = ["app", "run"]
