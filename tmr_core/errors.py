"""Errors a user can act on: each message says what was wrong, where, and what to do."""


class TMRError(Exception):
    """Base class for errors that jobs print as one line instead of a traceback."""


class DataFormatError(TMRError, ValueError):
    """A data file breaks its format; the message starts with ``path:line``."""

    def __init__(self, path: str, line: int | None, message: str):
        self.path, self.line = str(path), line
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
