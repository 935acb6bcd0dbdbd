"""The one exception the data pipeline raises for problems a user can fix."""

from __future__ import annotations


class DataError(ValueError):
    """A user-facing data problem. The message is ONE line that says how to fix it."""

    def __init__(self, msg: str) -> None:
        super().__init__(" ".join(str(msg).split()))  # keep it on one line, whatever was interpolated


def one_line(exc: BaseException, limit: int = 200) -> str:
    """A library exception squeezed to one short line, for embedding in a DataError."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
