"""The one exception type stdistill raises for bad input."""

from __future__ import annotations

from os import PathLike
from pathlib import Path

#: Longest problem text kept in a message (characters); longer text is cut with "...".
MAX_MESSAGE = 600


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


class StdistillError(Exception):
    """Bad input or a failed precondition, with a one-line message.

    The message names the file (or object) and the problem, and where possible the fix.
    The CLI prints it as ``error: <message>`` and exits with status 2, never a traceback.
    The problem text is kept on one line and to at most :data:`MAX_MESSAGE` characters, so a
    parser's echo of a whole line of input can never flood a terminal or a log.
    """

    def __init__(self, message: str, path: str | PathLike | None = None):
        self.path = None if path is None else str(path)
        message = one_line(message)
        super().__init__(f"{self.path}: {message}" if self.path else message)


def require_file(path: str | PathLike, what: str = "file") -> Path:
    """``path`` as a Path when it is an existing file; else StdistillError saying whether it is
    missing or a directory (``what`` names the file's role, e.g. "counts file")."""
    p = Path(path)
    if p.is_dir():
        raise StdistillError(f"{what} expected, but this is a directory", p)
    if not p.is_file():
        raise StdistillError(f"{what} does not exist", p)
    return p
