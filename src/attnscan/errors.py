"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class AttnscanError(Exception):
    """A problem with the user's input or environment, phrased so the message says what to do.

    The message is a single line; the CLI prints ``error: <message>`` and exits with code 2.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
