"""The one exception type stdistill raises for bad input."""

from __future__ import annotations

from os import PathLike


class StdistillError(Exception):
    """Bad input or a failed precondition, with a one-line message.

    The message names the file (or object) and the problem, and where possible the fix.
    The CLI prints it as ``error: <message>`` and exits with status 2, never a traceback.
    """

    def __init__(self, message: str, path: str | PathLike | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)
